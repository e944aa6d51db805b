"""The ``mechscope`` command on tiny models: JSON outputs checked against independent computations."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app
from mechscope.models.adapters import adapters

runner = CliRunner()


def _json(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_models_lists_every_registered_alias():
    aliases = {row["alias"] for row in _json(["models", "--json"])}
    assert {f"tiny-{f}" for f in adapters()} | {"smollm2-135m", "gemma3-270m"} <= aliases


def test_info_gives_every_hook_point_with_its_shape():
    out = _json(["info", "tiny-gpt2", "--json"])
    model = ms.load_model("tiny-gpt2")
    assert list(out["hook_points"]) == model.hook_names
    assert out["hook_points"]["blocks.0.attn.hook_pattern"] == [2, 4, 5, 5]
    assert out["facts"]["n_layers"] == 2


@pytest.mark.parametrize("prompt", ["hello", "hello <b>"])
def test_lens_top_prediction_is_the_models_argmax(tmp_path, prompt):
    html = tmp_path / "lens.html"
    out = _json(["lens", "tiny-llama", prompt, "--json", "--html", str(html), "--top-k", "3"])
    model = ms.load_model("tiny-llama")
    expected = model.tokenizer.decode([int(model(prompt)[0, -1].argmax())])
    final = [r for r in out["lens"] if r["stage"] == "final_post" and r["rank"] == 1][0]
    assert final["token"] == expected
    assert {r["rank"] for r in out["lens"]} == {1, 2, 3}
    assert out["html"] == str(html.resolve())
    page = html.read_text()
    assert "http" not in page and "<script" not in page
    if "<" in prompt:
        assert "<b>" not in page and "&lt;" in page


def test_lens_table_names_the_html_file(tmp_path):
    html = tmp_path / "lens.html"
    result = runner.invoke(app, ["lens", "tiny-gpt2", "hi", "--html", str(html)])
    assert result.exit_code == 0, result.output
    assert "Prediction:" in result.output and "final_post" in result.output
    assert html.name in result.output and html.exists()


def test_lens_pos_outside_the_prompt_is_a_clean_error(tmp_path):
    result = runner.invoke(
        app, ["lens", "tiny-llama", "hi", "--pos", "99", "--html", str(tmp_path / "x.html")]
    )
    assert result.exit_code == 2
    assert "pos 99" in result.output and "Traceback" not in result.output


def test_heads_json_has_a_layers_by_heads_table_per_detector(tmp_path):
    out = _json(
        ["heads", "tiny-gpt2", "--json", "--seq-len", "8", "--batch", "2", "--html", str(tmp_path / "h.html")]
    )
    assert set(out["scores"]) == {"previous_token", "duplicate_token", "induction", "ov_copying"}
    assert all(len(v) == 2 and len(v[0]) == 4 for v in out["scores"].values())
    assert out["top_compositions"] and (tmp_path / "h.html").exists()


def test_toy_superposition_json(tmp_path):
    html = tmp_path / "toy.html"
    out = _json(["toy", "superposition", "--sparsity", "0", "--steps", "2000", "--json", "--html", str(html)])
    assert out["instances"][0]["represented"] == 2
    assert out["html"] == str(html.resolve()) and 'class="geometry"' in html.read_text()


def test_bad_model_is_one_clean_line_and_exit_code_2():
    result = runner.invoke(app, ["info", "no-such-model"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert all(a in result.output for a in ["smollm2-135m", *(f"tiny-{f}" for f in adapters())])


def test_error_messages_are_not_read_as_markup():
    result = runner.invoke(app, ["lens", "[red]nope[/red]", "hi"])
    assert result.exit_code == 2
    assert "[red]nope[/red]" in result.output
