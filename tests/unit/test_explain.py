"""``mechscope explain``: the report's numbers are the library's numbers, recomputed here independently."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app

runner = CliRunner()
PROMPT, CORRUPT = "the cat sat on the mat", "the cat sat on the hat"


def test_explain_json_and_report(tmp_path):
    html = tmp_path / "report.html"
    args = ["explain", "tiny-llama", PROMPT, "--answer", "t", "--wrong", "s", "--corrupt", CORRUPT]
    result = runner.invoke(app, [*args, "--subject", "cat", "--json", "--html", str(html)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model = ms.load_model("tiny-llama")
    t, s = model.to_single_token("t"), model.to_single_token("s")
    logits = model(PROMPT)[0, -1]
    assert abs(out["metric"] - float(logits[t] - logits[s])) < 1e-4
    assert out["predictions"][0]["token"] == model.tokenizer.decode([int(logits.argmax())])
    corrupt_logits = model(CORRUPT)[0, -1]
    assert abs(out["metric_corrupted"] - float(corrupt_logits[t] - corrupt_logits[s])) < 1e-4
    # Denoising resid_pre at layer 0 at the one differing position restores the clean metric.
    n_pos = len(model.to_tokens(PROMPT)[0])
    grid = torch.tensor(out["patching"]["resid_pre"]["normalised"])
    assert grid.shape == (model.cfg.n_layers, n_pos) and out["patching"]["resid_pre"]["axes"] == [
        "layer",
        "pos",
    ]
    differs = int((model.to_tokens(PROMPT) != model.to_tokens(CORRUPT)).nonzero()[0, 1])
    assert abs(grid[0, differs].item() - 1) < 1e-4 and grid[0, :differs].abs().max() < 1e-4
    assert set(out["patching"]) == set(out["attribution"]) == {"resid_pre", "attn_out", "mlp_out", "z"}
    assert len(out["patching"]["z"]["values"][0]) == model.cfg.n_heads
    assert -1 <= out["attribution_vs_patching"]["resid_pre"]["correlation"] <= 1
    trace = out["causal_trace"]
    assert trace["subject_positions"] == [4, 5, 6] and len(trace["state"]) == model.cfg.n_layers
    assert abs(trace["clean"] - float(logits.softmax(-1)[t])) < 1e-5
    page = html.read_text()
    assert "http" not in page and page.count("<iframe") >= 9 and "Causal tracing" in page


def test_explain_bad_input_is_one_clean_error(tmp_path):
    html = str(tmp_path / "r.html")
    base = ["explain", "tiny-llama", PROMPT, "--answer", "t", "--html", html]
    for extra, words in [
        (["--corrupt", "a much longer corrupted prompt"], "align token by token"),
        (["--wrong", "two tokens"], "token"),
    ]:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert words in result.output
