"""``mechscope steer`` / ``steer-sweep`` on a tiny model: JSON checked against the library."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app
from mechscope.steering import actadd, generate

runner = CliRunner()


def test_steer_json_matches_the_library():
    args = ["steer", "tiny-llama", "I hate you", "--pos", "Love", "--neg", "Hate", "--layer", "1"]
    result = runner.invoke(app, [*args, "--coeff", "8", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model = ms.load_model("tiny-llama")
    g = generate(model, "I hate you", actadd(model, "Love", "Hate", 1, coeff=8.0), max_new_tokens=5)
    assert out["generations"] == [{"unsteered": g.unsteered[10:], "steered": g.steered[10:]}]
    assert out["hook"] == "blocks.1.hook_resid_pre" and out["positions"] == "0..3"


def test_steer_length_mismatch_without_pad_exits_with_a_message():
    args = ["steer", "tiny-llama", "x", "--pos", "ab", "--neg", "abc", "--layer", "0", "--pad", ""]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "different token lengths" in result.output


def test_steer_sweep_json_and_html(tmp_path):
    html = tmp_path / "s.html"
    args = [
        "steer-sweep",
        "tiny-llama",
        "--pos",
        "Love",
        "--neg",
        "Hate",
        "--concept",
        "L",
        "--layers",
        "0,1",
    ]
    result = runner.invoke(app, [*args, "--coeffs", "1,3", "--html", str(html), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["hook"], r["coeff"]) for r in rows] == [
        (f"blocks.{layer}.hook_resid_pre", c) for layer in (0, 1) for c in (1.0, 3.0)
    ]
    assert "random_effect" in rows[0] and html.read_text().count("<svg") == 3
    bad = runner.invoke(app, [*args, "--coeffs", "1,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output
