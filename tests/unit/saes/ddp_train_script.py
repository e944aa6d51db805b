"""Trains a small TopK SAE on synthetic rows; run by test_distributed.py alone and under torchrun."""

import sys

import torch

from mechscope.saes.distributed import init_from_env
from mechscope.saes.sae import SAEConfig
from mechscope.saes.sources import TensorSource
from mechscope.saes.train import TrainConfig, train_sae

torch.set_num_threads(1)
init_from_env()
g = torch.Generator().manual_seed(0)
dirs = torch.nn.functional.normalize(torch.randn(40, 12, generator=g), dim=-1)
x = ((torch.rand(4000, 40, generator=g) < 0.08) * torch.rand(4000, 40, generator=g)) @ dirs
cfg = TrainConfig(
    n_tokens=256 * 30, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=10, dead_tokens=512
)
train_sae(TensorSource(x), SAEConfig(d_in=12, d_sae=48, kind="topk", k=3, k_aux=6), cfg, sys.argv[1])
