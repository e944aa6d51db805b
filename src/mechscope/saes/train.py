"""Training an SAE: Adam with LR warm-up and decay, sparsity warm-up, dead-latent tracking, checkpoints.

:meth:`Trainer.fit` is a short loop over named steps. A run lives in one directory::

    out/
      run.json        the SAE config, this TrainConfig and the source's identity (a resume must match)
      metrics.jsonl   one line per ``log_every`` steps: losses, L0, FVU of the batch, dead fraction, LR
      checkpoint/     the latest checkpoint: SAE (native format), Adam state, step and dead-latent counters
      sae/            the trained SAE (native format), written at the end

**Resuming is re-running.** A run whose directory holds a checkpoint continues from it: the source gives
the same batches from the same step (:mod:`mechscope.saes.sources`), the optimizer and counters are
restored, and ``metrics.jsonl`` is cut back to the checkpoint, so a killed-and-resumed run ends with the
same weights and the same log as an uninterrupted one. A checkpoint is written to ``checkpoint.tmp/`` and
renamed into place, so a kill mid-write leaves the previous one whole.

**Data parallel.** Under ``torchrun`` (``torch.distributed`` initialised), every process reads the same
global batch, trains on its ``1/world_size`` slice, and gradients and dead-latent counts are averaged /
combined across processes before each step, so the result equals one process on the whole batch (to
float rounding; BatchTopK's batch-wide selection and threshold are per process, like its peers'). Only
rank 0 writes files.

Schedules (Anthropic, April 2024 update; Gao et al. 2024): the LR rises linearly over the first
``lr_warmup`` fraction of steps and falls linearly to 0 over the last ``lr_decay`` fraction; the sparsity
coefficient (kinds with one: ReLU's L1, JumpReLU's L0) rises linearly from 0 over the first
``sparsity_warmup`` fraction. A latent is *dead* once it has not fired for ``dead_tokens`` tokens; TopK
kinds feed the dead mask to AuxK.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mechscope.models.errors import MechscopeError
from mechscope.saes.arch import make_sae
from mechscope.saes.arch.sparse import active_latents
from mechscope.saes.distributed import rank_and_world
from mechscope.saes.formats import native
from mechscope.saes.sae import SAE, SAEConfig, init_b_dec, init_normalisation
from mechscope.saes.sources import ActivationSource, Batch


class ResumeMismatchError(MechscopeError, ValueError):
    """A run directory holds a run with another SAE, training config or source."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run (the SAE's own shape and kind are its :class:`SAEConfig`)."""

    n_tokens: int = 1 << 22
    """Training tokens; steps = ``n_tokens // batch_size``."""
    batch_size: int = 4096
    """Tokens per step (the global batch under torchrun)."""
    lr: float = 4e-4
    """Adam's peak learning rate."""
    beta1: float = 0.9
    beta2: float = 0.999
    lr_warmup: float = 0.01
    """Fraction of steps over which the LR rises linearly from 0."""
    lr_decay: float = 0.2
    """Fraction of steps at the end over which the LR falls linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of steps over which the sparsity coefficient rises linearly from 0."""
    dead_tokens: int = 1 << 20
    """A latent that has not fired for this many tokens is dead."""
    grad_clip: float | None = None
    """Clip the gradient's global norm to this (None: no clipping)."""
    b_dec_init: str = "geometric_median"
    """``geometric_median``, ``mean`` or ``zeros``."""
    init_tokens: int = 8192
    """Rows used to set the input normalisation and ``b_dec``."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and at the end)."""
    log_every: int = 10
    """Steps between lines of ``metrics.jsonl``."""
    seed: int = 0
    """Seed of the batch order (the SAE's weight seed is ``SAEConfig.seed``)."""

    def __post_init__(self):
        for name in ("n_tokens", "batch_size", "dead_tokens", "init_tokens", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_tokens < self.batch_size:
            raise ValueError(f"n_tokens ({self.n_tokens}) is less than one batch ({self.batch_size})")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction of the steps, in [0, 1]; got {getattr(self, name)}")
        if self.lr_warmup + self.lr_decay > 1:
            raise ValueError("lr_warmup + lr_decay exceed the whole run")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros; got {self.b_dec_init!r}")

    @property
    def steps(self) -> int:
        return self.n_tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based)."""
        n = self.steps
        warm, decay = self.lr_warmup * n, self.lr_decay * n
        factor = 1.0
        if warm > 0 and step < warm:
            factor = (step + 1) / warm
        if decay > 0 and step >= n - decay:
            factor = min(factor, (n - step) / decay)
        return self.lr * factor

    def sparsity_at(self, step: int) -> float:
        warm = self.sparsity_warmup * self.steps
        return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)


class TrainProgress(NamedTuple):
    step: int
    steps: int
    metrics: dict[str, float | int]
    """The latest logged metrics."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Trainer:
    """Trains ``sae`` on ``source`` into the run directory ``out`` (see the module docstring)."""

    def __init__(self, sae: SAE, source: ActivationSource, cfg: TrainConfig, out: str | Path):
        d_in, d_out = source.widths
        if (sae.cfg.d_in, sae.cfg.d_out) != (d_in, d_out):
            raise ValueError(
                f"the SAE is {sae.cfg.d_in} -> {sae.cfg.d_out} wide but {source.hook} gives rows of {d_in}"
                + (f" and {source.out_hook} of {d_out}" if source.out_hook else "")
            )
        self.sae, self.source, self.cfg, self.out = sae, source, cfg, Path(out)
        self.rank, self.world = rank_and_world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {self.world}")
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.step = 0
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        self.metrics: dict[str, float | int] = {}

    # ------------------------------------------------------------------ run record
    def _record(self) -> dict[str, Any]:
        return {
            "sae": self.sae.cfg.to_dict(),
            "train": asdict(self.cfg),
            "source": self.source.identity(),
            "world_size": self.world,
        }

    def _check_or_write_record(self) -> None:
        path = self.out / "run.json"
        want = json.loads(json.dumps(self._record()))
        if path.exists():
            have = json.loads(path.read_text())
            diff = sorted(k for k in want if have.get(k) != want[k])
            if diff:
                raise ResumeMismatchError(
                    f"{self.out} holds a run with a different {', '.join(diff)}; "
                    "use another output directory, or delete this one to start over"
                )
        elif self.rank == 0:
            native.write_json_atomic(path, want)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _initialise(self) -> None:
        """Input normalisation and ``b_dec`` from ``init_tokens`` rows of a separately seeded order."""
        n = self.cfg.init_tokens
        if hasattr(self.source, "__len__"):  # an in-memory source may hold fewer rows
            n = min(n, len(self.source))
        batch = next(iter(self.source.batches(n, seed=self.cfg.seed + 1)))
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
        init_normalisation(self.sae, x, y if self.sae.cfg.is_transcoder else None)
        if self.cfg.b_dec_init != "zeros":
            init_b_dec(self.sae, y, self.cfg.b_dec_init)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        if self.rank == 0:
            tmp, final, old = (self.out / n for n in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
            shutil.rmtree(tmp, ignore_errors=True)
            native.save(self.sae, tmp)
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
            save_file({"since_fired": self.since_fired.cpu()}, tmp / "counters.safetensors")
            native.write_json_atomic(tmp / "state.json", {"step": self.step})
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)  # a kill after the last save's renames left it
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(self.out)
            shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()

    def _load_checkpoint(self) -> bool:
        for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
            root = self.out / name
            if (root / "state.json").exists():
                break
        else:
            return False
        saved = native.load(root, device=self.sae.device)
        self.sae.load_state_dict(saved.state_dict())
        self.opt.load_state_dict(torch.load(root / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.since_fired = load_file(root / "counters.safetensors")["since_fired"].to(self.sae.device)
        self.step = json.loads((root / "state.json").read_text())["step"]
        return True

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint (written before a kill), so the log equals an unbroken run's."""
        path = self.out / "metrics.jsonl"
        if self.rank or not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        tmp.replace(path)

    # ------------------------------------------------------------------ one step
    def _local(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        if self.world > 1:
            x = x.chunk(self.world)[self.rank]
            y = None if y is None else y.chunk(self.world)[self.rank]
        dev = self.sae.device
        return x.to(dev), None if y is None else y.to(dev)

    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        for p in self.sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def train_step(self, batch: Batch) -> dict[str, float | int]:
        cfg, sae = self.cfg, self.sae
        x, y = self._local(batch)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        dead = self.since_fired >= cfg.dead_tokens
        out = sae(x, y, dead_mask=dead)
        sparsity = cfg.sparsity_at(self.step)
        loss = sae.total_loss(out.losses, sparsity)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._all_reduce_grads()
        sae.project_decoder_grad_()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        sae.apply_constraints_()
        with torch.no_grad():
            fired, _ = active_latents(out.acts)
            if self.world > 1:
                fired = fired.to(torch.uint8)
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
            self.since_fired.add_(cfg.batch_size).masked_fill_(fired, 0)
        self.step += 1
        if self.step % cfg.log_every and self.step != cfg.steps:
            return self.metrics
        return self._measure(out, x, y, loss, dead, sparsity)

    @torch.no_grad()
    def _measure(self, out, x, y, loss, dead, sparsity) -> dict[str, float | int]:
        target = (x if y is None else y).to(torch.float64)
        n = len(target)
        # Per-process sums (means times n), so one all-reduce gives the global batch's numbers exactly.
        sums = torch.cat(
            [
                torch.stack(
                    [
                        (out.recon.double() - target).pow(2).sum(),
                        target.pow(2).sum(),
                        active_latents(out.acts)[1].double(),
                        loss.detach().double() * n,
                        *(v.detach().double() * n for v in out.losses.values()),
                    ]
                ),
                target.sum(0),
            ]
        )
        if self.world > 1:
            dist.all_reduce(sums)
        n *= self.world
        err, sq, l0, total, *parts = (
            sums[: 4 + len(out.losses)]
            / torch.tensor([1, 1, n, n] + [n] * len(out.losses), device=sums.device)
        ).tolist()
        var = sq - float(sums[4 + len(out.losses) :].pow(2).sum()) / n  # sum ||y - mean||^2
        self.metrics = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "lr": self.cfg.lr_at(self.step - 1),
            "sparsity_scale": sparsity,
            "loss": total,
            **{f"loss_{k}": v for k, v in zip(out.losses, parts, strict=True)},
            "l0": l0,
            "fvu": err / var if var > 0 else math.nan,
            "dead_fraction": float(dead.float().mean()),
        }
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(self.metrics) + "\n")
        return self.metrics

    # ------------------------------------------------------------------ the loop
    def fit(self, progress: Callable[[TrainProgress], None] | None = None) -> SAE:
        """Train to ``cfg.steps`` (resuming from a checkpoint in ``out`` if there is one); return the SAE."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_or_write_record()
        if self._load_checkpoint():
            self._truncate_log()
        else:
            self._initialise()
            if self.rank == 0:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.sae.train()
        batches: Iterator[Batch] = self.source.batches(cfg.batch_size, seed=cfg.seed, start_step=self.step)
        t0, step0 = time.perf_counter(), self.step
        while self.step < cfg.steps:
            metrics = self.train_step(next(batches))
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._save_checkpoint()
            if progress is not None:
                rate = (self.step - step0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                progress(TrainProgress(self.step, cfg.steps, {**metrics, "tokens_per_s": rate}))
        self.sae.eval()
        if self.rank == 0:
            native.save(self.sae, self.out / "sae")
        return self.sae


def train_sae(
    source: ActivationSource,
    sae: SAE | SAEConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> SAE:
    """Train an SAE (a fresh one from ``sae`` if it is a config) on ``source`` into ``out``; resumable."""
    if isinstance(sae, SAEConfig):
        sae = make_sae(sae)
    if device is not None:
        sae = sae.to(device)
    return Trainer(sae, source, cfg, out).fit(progress)
