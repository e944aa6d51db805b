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
    assert {"icl_score", "induction", "previous_token"} <= set(history[-1])
    again = ms.load_model(str(tmp_path / "run"))
    tokens = model.to_tokens("the cat")
    assert torch.equal(again(tokens), model(tokens))
    assert isinstance(icl_score(model, model.to_tokens([text[:63]])), float)


def test_bad_training_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        AttnOnlyTrainConfig(d_model=30, n_heads=4)
