"""mechscope on a CUDA GPU: bench_core.py's overhead configurations against plain ``transformers``, and
the SAE training step with the sparse TopK kernels against the dense maths.

1. **Overhead** (a: no-op hooks on every point outside attention, attached and detached around each
   forward; a-reg: the same hooks registered before the timing; b: cache resid_pre/resid_post/
   attn_out/mlp_out + patterns; c: cache every point; d: ``generate`` with a steering hook, 16-token
   prompt, 32 new tokens, greedy; hf-eager, a reference without mechscope: transformers' own eager
   attention against its SDPA, the kernels b and c's eager path is up against), each as
   ``median(mechscope) / median(plain HF)`` from interleaved repeats in one process
   (``_timing.compare``; every call ends with ``torch.cuda.synchronize()``), with the absolute
   medians and the peak CUDA memory above the model's (``max_memory_allocated``).
2. **SAE training**: one TopK step (forward, AuxK, backward, Adam) on the sparse kernels against the same
   step on the dense maths (``sae.sparse_kernels`` forced), tokens/s of each; batch 4096. What it found
   set ``mechscope.saes.arch.sparse.CUDA_MIN_D_SAE``.

The model is an alias or a directory; ``--random-like DIR`` builds a model with the configuration and
tokenizer in DIR and random weights (seed 0): the same shapes and the same work as the trained model,
for a machine the weights cannot reach.

Usage: python benchmarks/bench_gpu.py [--model smollm2-135m | --random-like DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from _timing import compare, describe, machine
from bench_core import NEW_TOKENS, PROMPT_LEN, STEER_AT, TARGETS, cached_b, noop, not_attn_internal

import mechscope as ms

SHAPES = {"8x128": (8, 128), "1x32": (1, 32), "32x512": (32, 512)}


def random_like(config_dir: Path, out: Path) -> Path:
    """A model directory with ``config_dir``'s configuration and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
    for f in config_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn):
    def run():
        out = fn()
        sync()
        return out

    return run


def workloads(model: ms.HookedModel, config: str, shape: str):
    hf, dev = model.hf_model, model.device
    g = torch.Generator().manual_seed(0)
    if config == "d":
        prompt = torch.randint(0, model.cfg.d_vocab, (1, PROMPT_LEN), generator=g).to(dev)
        vec = (torch.randn(model.cfg.d_model, generator=g) * 0.1).to(dev)
        gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        pad = model.tokenizer.pad_token_id or model.tokenizer.eos_token_id

        def plain():
            mask = torch.ones_like(prompt)
            return hf.generate(input_ids=prompt, attention_mask=mask, pad_token_id=pad, use_cache=True, **gen)

        def cand():
            return model.generate(
                prompt, hooks={STEER_AT: lambda x, hook: x + vec}, return_tokens=True, **gen
            )

        return plain, cand
    x = torch.randint(0, model.cfg.d_vocab, SHAPES[shape], generator=g).to(dev)

    def plain():
        return hf(input_ids=x, use_cache=False).logits

    if config == "hf-eager":  # no mechscope: HF's own eager attention against its SDPA (the plain side)
        eager = copy.deepcopy(hf)
        eager.config._attn_implementation = "eager"
        return plain, lambda: eager(input_ids=x, use_cache=False).logits

    def cand_a():
        with model.hooks({not_attn_internal: noop}):
            return model(x)

    def cand_a_reg():
        return model(x)

    cand_a_reg.setup = lambda: model.add_hook(not_attn_internal, noop)  # registered untimed

    cands = {
        "a-reg": cand_a_reg,
        "a": cand_a,
        "b": lambda: model.run_with_cache(x, names=cached_b),
        "c": lambda: model.run_with_cache(x, names=None),
    }
    return plain, cands[config]


def peak_mib(fn, setup=None) -> float:
    """CUDA memory a call allocates at its peak beyond what was allocated before it (its result kept)."""
    if not torch.cuda.is_available():
        return float("nan")  # a smoke run on the CPU (--device cpu)
    undo = setup() if setup else None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    if undo is not None:
        undo()
    return peak / 2**20


@torch.inference_mode()
def overhead(model: ms.HookedModel, repeats: int, configs: list[str], shapes: list[str]) -> list[dict]:
    rows = []
    for config in configs:
        for shape in ("1x32",) if config == "d" else shapes:
            plain, cand = workloads(model, config, shape)
            setup = getattr(cand, "setup", None)
            plain, cand = synced(plain), synced(cand)
            r = compare(plain, cand, repeats=repeats, warmup=3, cand_setup=setup)
            r.update(config=config, shape="generate" if config == "d" else shape, target=TARGETS.get(config))
            r["plain_peak_mib"], r["cand_peak_mib"] = peak_mib(plain), peak_mib(cand, setup)
            print(
                f"{config} {r['shape']:>8}  {describe(r)}  peak {r['plain_peak_mib']:.0f}/{r['cand_peak_mib']:.0f} MiB",
                flush=True,
            )
            rows.append({k: v for k, v in r.items() if not k.endswith("_s") or k.endswith("median_s")})
    return rows


def sae_step(d_in: int, expansion: int, k: int, batch: int, repeats: int, device: str) -> dict:
    from mechscope.saes.arch import make_sae
    from mechscope.saes.sae import SAEConfig

    sae = make_sae(SAEConfig(d_in=d_in, d_sae=expansion * d_in, kind="topk", k=k)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in, device=device)
    dead = torch.rand(expansion * d_in, device=device) < 0.05

    def step(sparse: bool):
        def run():
            sae.sparse_kernels = sparse  # forced either way (by default the width decides on CUDA)
            opt.zero_grad(set_to_none=True)
            out = sae(x, dead_mask=dead)
            sae.total_loss(out.losses).backward()
            opt.step()
            sync()

        return run

    r = compare(step(False), step(True), repeats=repeats, warmup=3)
    row = {
        "d_in": d_in,
        "d_sae": expansion * d_in,
        "k": k,
        "batch": batch,
        "dense_tokens_per_s": batch / r["plain_median_s"],
        "sparse_tokens_per_s": batch / r["cand_median_s"],
        "sparse_over_dense_time": r["ratio"],
        "ci95": r["ci95"],
        "dense_peak_mib": peak_mib(step(False)),
        "sparse_peak_mib": peak_mib(step(True)),
    }
    print(
        f"SAE d_sae {row['d_sae']:>6} k {k}: dense {row['dense_tokens_per_s']:,.0f} tok/s, "
        f"sparse {row['sparse_tokens_per_s']:,.0f} tok/s (time ratio {r['ratio']:.3f}), "
        f"peak {row['dense_peak_mib']:.0f}/{row['sparse_peak_mib']:.0f} MiB",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-like", type=Path, help="config + tokenizer directory: random weights")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json")
    p.add_argument(
        "--device", default="cuda", help="cpu: a quick smoke run of this script, no numbers to keep"
    )
    p.add_argument(
        "--configs", default="a-reg,a,b,c,d", help="comma-separated of a-reg, a, b, c, d, hf-eager"
    )
    p.add_argument("--no-tf32", action="store_true", help="plain float32 matmuls")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sae-expansions", default="8,32,128")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (bench_core.py measures the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32  # on: what a GPU user runs with
    with tempfile.TemporaryDirectory() as tmp:
        name = str(random_like(a.random_like, Path(tmp))) if a.random_like else a.model
        model = ms.load_model(name, device=a.device)
        gpu = torch.cuda.get_device_name() if a.device == "cuda" else None
        result = {"machine": machine(), "gpu": gpu, "tf32": not a.no_tf32}
        result["model"] = f"random weights like {a.random_like.name}" if a.random_like else a.model
        print(result, flush=True)
        result["overhead"] = overhead(model, a.repeats, a.configs.split(","), a.shapes.split(","))
        del model
    expansions = [int(e) for e in a.sae_expansions.split(",") if e]
    result["sae"] = [sae_step(576, e, 32, 4096, a.repeats, a.device) for e in expansions]
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
