"""Harvests tiny-llama over a few pydoc topics; run by test_distributed.py alone and under torchrun."""

import sys

import torch

import mechscope as ms
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, pydoc_corpus
from mechscope.saes.distributed import init_from_env
from mechscope.saes.harvest import HarvestConfig, harvest

torch.set_num_threads(1)
init_from_env()
docs = [d for d in pydoc_corpus() if d.text.isascii()][:12]
corpus = Corpus.from_documents(docs, {"kind": "test", "name": "pydoc12"})
cfg = HarvestConfig(
    hooks=("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"),
    n_tokens=32 * 45,
    contexts=ContextConfig(context_length=32, seed=1),
    batch_size=4,
    shard_tokens=256,
)
harvest(ms.load_model("tiny-llama"), corpus, sys.argv[1], cfg)
