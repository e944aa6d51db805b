"""Attention-only transformers: read off their weights exactly, train, save and load back."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.models.adapters import adapters
from mechscope.models.hooked import HookedModel
from mechscope.models.tiny import byte_tokenizer
from mechscope.toy.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM
from mechscope.toy.train_attn_only import (
    AttnOnlyTrainConfig,
    bigram_table,
    icl_score,
    phase_change_step,
    skip_trigrams,
    train_attn_only,
)


def _model(n_layers: int, **kw) -> HookedModel:
    torch.manual_seed(0)
    config = AttnOnlyConfig(
        hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2, initializer_range=0.2, **kw
    )
    return HookedModel(AttnOnlyForCausalLM(config).eval(), byte_tokenizer(), adapters()["attn_only"])


@pytest.mark.parametrize("positional", ["learned", "none"])
def test_zero_layer_model_is_its_bigram_table(positional):
    model = _model(0, positional=positional)
    table = bigram_table(model)
    for token in (5, 97, 200):
        logits = model(torch.tensor([[token]]))[0, 0]
        torch.testing.assert_close(table[token], logits.log_softmax(-1))
    with pytest.raises(ValueError, match="0 layers"):
        bigram_table(_model(1))


def test_skip_trigrams_come_from_the_circuits():
    model = _model(1)
    rows = skip_trigrams(model, k=3)
    assert len(rows) == 2 * 3 and {r[0] for r in rows} == {0, 1}
    scores = [r[4] for r in rows if r[0] == 0]
    assert scores == sorted(scores, reverse=True)


def test_training_lowers_the_loss_records_history_and_saves(tmp_path):
    cfg = AttnOnlyTrainConfig(
        n_layers=2, d_model=32, n_heads=2, n_ctx=64, steps=60, eval_every=30, batch_size=8, lr=1e-2, warmup=10
    )
    text = "the cat sat on the mat. " * 400
    model, history = train_attn_only(cfg, text=text, out_dir=tmp_path / "run")
    assert [r["step"] for r in history] == [0, 30, 60]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0
    assert {"icl_score", "induction", "previous_token", "k_composition", "induction_head"} <= set(history[-1])
    # the tracked K-composition is the composition table's entry for the two named heads
    from mechscope.circuits.composition import composition_scores

    comp, row = composition_scores(model), history[-1]
    (la, ha), (lb, hb) = (map(int, row[k][1:].split("H")) for k in ("previous_token_head", "induction_head"))
    assert la < lb
    expected = comp.scores[1, la, ha, lb, hb] - comp.baseline[1]
    assert row["k_composition"] == pytest.approx(expected.item(), abs=1e-6)
    again = ms.load_model(str(tmp_path / "run"))
    tokens = model.to_tokens("the cat")
    assert torch.equal(again(tokens), model(tokens))
    assert isinstance(icl_score(model, model.to_tokens([text[:63]])), float)


def test_bad_training_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        AttnOnlyTrainConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="share of rows"):
        AttnOnlyTrainConfig(repeat_fraction=1.5)


def test_phase_change_step_and_figure():
    from mechscope.viz.phase_change import render_phase_change_svg

    rows = [
        dict(
            step=100 * i, val_loss=3.0 - 0.1 * i, icl_score=-0.05 * i, induction=v, previous_token=0.1 + v / 2
        )
        for i, v in enumerate([0.02, 0.03, 0.05, 0.40, 0.60, 0.62])
    ]
    assert phase_change_step(rows) == 300  # first step at or past halfway from 0.02 to 0.62
    flat = [r | {"induction": 0.02 + 0.01 * (r["step"] == 500)} for r in rows]
    assert phase_change_step(flat) is None
    svg = render_phase_change_svg(rows, 300)
    assert svg.startswith("<svg") and svg.count("<polyline") == 4 and "phase change, step 300" in svg
    with pytest.raises(ValueError, match="at least one layer"):
        render_phase_change_svg([{"step": 0, "val_loss": 1.0, "icl_score": 0.0}])


def test_repeated_rows_repeat_at_varying_distances():
    from mechscope.toy.train_attn_only import _batches

    cfg = AttnOnlyTrainConfig(n_ctx=64, batch_size=64, repeat_fraction=1.0)
    ids = torch.randint(0, 256, (5000,))
    rows = next(_batches(ids, cfg, torch.Generator().manual_seed(0), 256))
    assert rows.shape == (64, 64) and (rows[:, 0] == 256).all()
    periods = {next(p for p in range(1, 63) if torch.equal(r[p:], r[:-p])) for r in rows[:, 1:]}
    assert min(periods) >= 8 and max(periods) <= 31 and len(periods) > 5  # no fixed offset to learn
    plain = next(_batches(ids, AttnOnlyTrainConfig(n_ctx=64, batch_size=8), torch.Generator(), 256))
    assert all(any(r[i] != r[i + 31] for i in range(1, 32)) for r in plain)


def test_cli_trains_saves_and_draws_the_curves(tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    out = tmp_path / "run"
    args = ["toy", "attn-only", "--layers", "2", "--steps", "4", "--d-model", "16", "--heads", "2"]
    args += ["--n-ctx", "32", "--batch-size", "2", "--repeat-fraction", "0.5", "--eval-every", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["repeat_fraction"] == 0.5 and [r["step"] for r in report["history"]] == [0, 2, 4]
    assert (out / "phase_change.svg").read_text().startswith("<svg")
    assert ms.load_model(str(out)).cfg.n_layers == 2


def test_text_too_short_for_a_validation_window_says_how_much_is_needed():
    # a tenth of the text is held out and must hold one n_ctx window (was: a bare torch.randint error)
    cfg = AttnOnlyTrainConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=64, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=r"500 bytes.*at least 640.*smaller n_ctx"):
        train_attn_only(cfg, text="x" * 500)
