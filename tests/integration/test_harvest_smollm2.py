"""Harvesting SmolLM2 over the embedded default corpus: a few thousand tokens, checked end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import default_corpus
from mechscope.saes.harvest import HarvestConfig, harvest

HOOKS = ("blocks.3.hook_resid_post", "blocks.1.mlp.hook_post")


@pytest.fixture(scope="module")
def store(smollm2, tmp_path_factory):
    cfg = HarvestConfig(
        hooks=HOOKS,
        n_tokens=4096,
        contexts=ContextConfig(context_length=128),
        batch_size=8,
        shard_tokens=2048,
    )
    return harvest(smollm2, "default", tmp_path_factory.mktemp("store"), cfg)


def test_store_facts(smollm2, store):
    assert store.n_tokens == 4096 and store.n_shards == 2 and store.complete
    assert store.hooks == {HOOKS[0]: smollm2.cfg.d_model, HOOKS[1]: smollm2.cfg.d_mlp}
    # SmolLM2 prepends no BOS; documents are separated by <|endoftext|>, its pre-training separator.
    assert store.identity["bos"] is None
    assert store.identity["separator"] == smollm2.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert store.identity["model"] == "smollm2-135m" and store.identity["corpus"]["name"] == "default"
    store.verify()


def test_rows_equal_a_full_run_with_cache(smollm2, store):
    ids = torch.stack([store.context_tokens(c) for c in range(4)])  # the first batch of shard 0
    _, cache = smollm2.run_with_cache(ids, list(HOOKS))
    for h in HOOKS:
        assert torch.equal(store.shard(h, 0)[: 4 * 128], cache[h].flatten(0, 1))


def test_rows_trace_back_to_the_corpus_text(smollm2, store):
    docs = list(default_corpus())
    tok = smollm2.tokenizer
    checked, ids_of = 0, {}
    for row in np.random.default_rng(0).choice(store.n_tokens, 200, replace=False).tolist():
        loc = store.locate(row)
        if loc.document < 0:
            continue
        doc = docs[loc.document]
        assert loc.source == doc.source
        if loc.document not in ids_of:  # an independent tokenisation of the whole document
            ids_of[loc.document] = tok(doc.text, add_special_tokens=False)["input_ids"]
        assert ids_of[loc.document][loc.token_offset] == loc.token
        if doc.text.isascii():
            assert doc.text[loc.char_offset :].startswith(tok.decode([loc.token]))
            checked += 1
    assert checked > 100


def test_training_batches(store):
    a, b = next(store.batches(list(HOOKS), 256, seed=0))
    assert a.shape == (256, 576) and b.shape == (256, 1536) and a.dtype == torch.float32
    rows = next(store.row_order(seed=0))[:256]
    assert torch.equal(a, store.read(HOOKS[0], rows))
    assert (store.index_rows(rows)[:, 1] >= 0).all()  # no separator rows
