"""mechscope's overhead against plain ``transformers`` on smollm2-135m (CPU, one thread).

Every number is a ratio measured in one process: the plain HF call and the mechscope call are
run in alternating order, repeat after repeat, and ``ratio = median(mechscope) / median(plain)``.

    .venv/bin/python benchmarks/bench_core.py            # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # a smoke run (~3 min)

Configurations (targets from the issue in brackets):
    a  no-op hooks (return None) on every hook point outside attention, nothing cached  [<= 1.02x]
       a-reg: the forward while they are registered (added before the timing, removed after it)
       a:     ``with model.hooks(...)`` around the forward, i.e. attaching and detaching them too
    b  run_with_cache of resid_pre, resid_post, attn_out, mlp_out and attn.hook_pattern [<= 1.05x]
    c  run_with_cache of every hook point (names=None)                                  [<= 1.20x]
    d  model.generate with a steering hook at blocks.10.hook_resid_post vs
       hf_model.generate, greedy, 16-token prompt, 32 new tokens                         [<= 1.05x]
    hf-b  context, not mechscope: what plain transformers itself costs to return the patterns
       and the residual stream (a second copy of the model with eager attention, called with
       output_attentions=True, output_hidden_states=True), against the same plain SDPA forward

``load_model`` tells glibc to keep freed memory for reuse (mechscope.models.host_memory), which
applies to the plain side too; ``MECHSCOPE_KEEP_FREED_MEMORY=0`` runs everything with glibc's defaults.

Memory is measured in a fresh subprocess per configuration (see ``--child``), with glibc told to
mmap every allocation over 64 KiB (so freed tensors leave RSS at once). After loading the model
and a tiny warm-up forward, the peak-RSS mark is reset (``/proc/self/clear_refs``), the
configuration runs once with its result kept alive, and the peak RSS (``VmHWM``, the counter
behind ``ru_maxrss``) minus the RSS before the run is the peak growth; the RSS still held
afterwards (result alive) is reported too. For the caching configurations the child also sums
the cached tensors' bytes, naively (every name) and by unique storage
(``untyped_storage().data_ptr()``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable

import torch
from _timing import compare, describe, machine

import mechscope as ms
from mechscope.models.host_memory import ENV, keep_freed_memory

MODEL = "smollm2-135m"
SEED = 0
SHAPES = {"8x128": (8, 128), "1x32": (1, 32)}
ATTN_INTERNAL = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern")
CACHED_B = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern")
TARGETS = {"a-reg": 1.02, "a": 1.02, "b": 1.05, "c": 1.20, "d": 1.05, "hf-b": None}
STEER_AT = "blocks.10.hook_resid_post"
PROMPT_LEN, NEW_TOKENS = 16, 32


# ---------------------------------------------------------------------------- the workloads
def tokens(model: ms.HookedModel, batch: int, pos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


def steering_vector(model: ms.HookedModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(model.cfg.d_model, generator=g) * 0.1


def not_attn_internal(name: str) -> bool:
    return not name.endswith(ATTN_INTERNAL)


def cached_b(name: str) -> bool:
    return name.endswith(CACHED_B)


def noop(x, hook):
    return None


_EAGER: dict = {}


def eager_copy(model: ms.HookedModel):
    """The same weights as a plain HF model with eager attention (loaded once)."""
    if not _EAGER:
        from transformers import AutoModelForCausalLM

        _EAGER["m"] = AutoModelForCausalLM.from_pretrained(
            model.hf_model.name_or_path, local_files_only=True, attn_implementation="eager"
        ).eval()
    return _EAGER["m"]


def workloads(model: ms.HookedModel, config: str, shape: str | None) -> tuple[Callable, Callable]:
    """``(plain, mechscope)`` zero-argument callables for one configuration."""
    hf = model.hf_model
    if config == "d":
        prompt = tokens(model, 1, PROMPT_LEN)
        mask = torch.ones_like(prompt)
        vec = steering_vector(model)
        gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        pad = model.tokenizer.pad_token_id
        pad = model.tokenizer.eos_token_id if pad is None else pad

        def steer(x, hook):
            return x + vec

        def plain():
            return hf.generate(input_ids=prompt, attention_mask=mask, pad_token_id=pad, use_cache=True, **gen)

        def cand():
            return model.generate(prompt, hooks={STEER_AT: steer}, return_tokens=True, **gen)

        return plain, cand

    x = tokens(model, *SHAPES[shape])

    def plain():
        return hf(input_ids=x, use_cache=False).logits

    if config == "a":

        def cand():
            with model.hooks({not_attn_internal: noop}):
                return model(x)

    elif config == "a-reg":

        def cand():
            return model(x)

        cand.setup = lambda: model.add_hook(not_attn_internal, noop)  # see compare(cand_setup=)

    elif config == "b":

        def cand():
            return model.run_with_cache(x, names=cached_b)

    elif config == "c":

        def cand():
            return model.run_with_cache(x, names=None)

    elif config == "hf-b":
        eager = eager_copy(model)

        def cand():
            return eager(input_ids=x, use_cache=False, output_attentions=True, output_hidden_states=True)

    else:
        raise ValueError(config)
    return plain, cand


# ---------------------------------------------------------------------------- memory (child side)
def _status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def cache_bytes(cache) -> dict:
    tensors = [cache[n] for n in cache]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return {
        "cache_names": len(tensors),
        "cache_storages": len(storages),
        "cache_naive_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "cache_unique_bytes": sum(storages.values()),
    }


def child(config: str, shape: str | None) -> dict:
    """Run one configuration once in this fresh process; report its memory."""
    torch.set_num_threads(1)
    model = ms.load_model(MODEL)
    with torch.inference_mode():
        model.hf_model(input_ids=tokens(model, 1, 4), use_cache=False)  # lazy initialisation
        # "plain" is the plain forward (the same for a, b and c); "plain-d" plain generation.
        base = {"plain": "a", "plain-d": "d"}.get(config, config)
        plain, cand = workloads(model, base, shape)
        fn = plain if config.startswith("plain") else cand
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS mark (Linux >= 4.0)
            reset = True
        except OSError:
            reset = False
        before = _status_kib("VmRSS")
        out = fn()
        # VmHWM is the counter ru_maxrss reads, but ru_maxrss also keeps the *parent's* peak across
        # fork + exec, so a child of a big process would report that; VmHWM is this process' alone.
        peak = _status_kib("VmHWM")
        held = _status_kib("VmRSS")
        ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "config": config,
        "shape": shape,
        "peak_reset": reset,
        "rss_before_mib": before / 1024,
        "peak_growth_mib": (peak - before) / 1024,
        "held_growth_mib": (held - before) / 1024,
        "ru_maxrss_mib": ru_maxrss / 1024,
    }
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], ms.ActivationCache):
        result.update(cache_bytes(out[1]))
    return result


def measure_memory(config: str, shape: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config]
    if shape:
        cmd += ["--shape", shape]
    # Every allocation over 64 KiB gets its own mmap, returned to the OS when freed, so RSS follows
    # the live tensors instead of glibc's reuse of heap freed earlier (e.g. while loading).
    # load_model's keep_freed_memory would override that, so it is off in the children.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MECHSCOPE_KEEP_FREED_MEMORY": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {config} {shape} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def fmt_target(target: float | None) -> str:
    return "-" if target is None else f"<= {target}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repeats, memory on the small shape only")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per side at 8x128 (default 11, quick 3)"
    )
    p.add_argument(
        "--configs", default="a-reg,a,b,c,d,hf-b", help="comma-separated of a-reg, a, b, c, d, hf-b"
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated of " + ", ".join(SHAPES))
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-timing", action="store_true", help="skip the timings (memory only)")
    p.add_argument("--json", help="also write every raw timing and memory number to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.shape)))
        return

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    repeats = args.repeats or (3 if args.quick else 11)
    shapes = args.shapes.split(",")
    configs = args.configs.split(",")
    info = machine()
    print(f"machine: {info}")
    print(
        f"model {MODEL}; {repeats} repeats per side at 8x128 (x6 at 1x32, x3 for generation), "
        "interleaved; ratio = median(mechscope) / median(plain) [bootstrap 95% interval]\n"
    )

    model = ms.load_model(MODEL)  # also tells glibc to keep freed memory, for both sides alike
    kept = keep_freed_memory()
    print(f"host memory: {'freed memory kept for reuse' if kept else 'glibc defaults'} ({ENV})")
    info["keep_freed_memory"] = kept
    n_a = sum(map(not_attn_internal, model.hook_names))
    n_b = sum(map(cached_b, model.hook_names))
    print(f"hook points: {len(model.hook_names)}; (a) hooks {n_a}; (b) caches {n_b}; (c) caches all\n")

    jobs = [(c, s) for c in ("a-reg", "a", "b", "c", "hf-b") if c in configs for s in shapes]
    if "d" in configs:
        jobs.append(("d", None))
    if args.no_timing:
        jobs = []
    results = []
    with torch.inference_mode():
        for config, shape in jobs:
            plain, cand = workloads(model, config, shape)
            if config == "d":  # both sides must produce the same number of tokens
                assert plain().shape == cand().shape == (1, PROMPT_LEN + NEW_TOKENS)
            # the small shapes are ~20x faster, so they get more repeats for the same time
            reps = {"8x128": repeats, "1x32": repeats * 6, None: repeats * 3}[shape]
            setup = getattr(cand, "setup", None)
            r = compare(plain, cand, reps, warmup=1 if shape == "8x128" else 3, cand_setup=setup)
            r.update(config=config, shape=shape or f"gen 1x{PROMPT_LEN}+{NEW_TOKENS}", target=TARGETS[config])
            results.append(r)
            print(f"({config:>4}) {r['shape']:>12}: {describe(r)}", flush=True)
    del model
    gc.collect()

    memory = []
    if not args.no_memory:
        print("\nmemory (fresh subprocess each; MiB; peak = VmHWM after reset - VmRSS before):")
        mem_shapes = ["1x32"] if args.quick else shapes
        mem_jobs = []
        for shape in mem_shapes:
            fwd = [c for c in "abc" if c in configs]
            mem_jobs += [("plain", shape)] * bool(fwd) + [(c, shape) for c in fwd]
        if "d" in configs:
            mem_jobs += [("plain-d", None), ("d", None)]
        for variant, shape in mem_jobs:
            m = measure_memory(variant, shape)
            memory.append(m)
            extra = ""
            if "cache_unique_bytes" in m:
                extra = (
                    f"  cache: {m['cache_names']} names, {m['cache_storages']} storages, "
                    f"naive {m['cache_naive_bytes'] / 2**20:.1f} MiB, "
                    f"unique {m['cache_unique_bytes'] / 2**20:.1f} MiB"
                )
            print(
                f"{variant:>8} {shape or 'gen':>6}: peak +{m['peak_growth_mib']:8.1f}  "
                f"held +{m['held_growth_mib']:8.1f}{extra}",
                flush=True,
            )

    print("\nsummary:")
    print(
        "| config | shape | plain ms | mechscope ms | ratio | 95% interval | CPU ratio "
        "| sys ms plain / mechscope | target | met |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---|")
    for r in results:
        met = "-" if r["target"] is None else "yes" if r["ratio"] <= r["target"] else "no"
        lo, hi = r["ci95"]
        print(
            f"| ({r['config']}) | {r['shape']} | {r['plain_median_s'] * 1e3:.1f} "
            f"| {r['cand_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {lo:.3f}-{hi:.3f} | {r['cpu_ratio']:.3f} "
            f"| {r['plain_sys_median_s'] * 1e3:.0f} / {r['cand_sys_median_s'] * 1e3:.0f} "
            f"| {fmt_target(r['target'])} | {met} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "repeats": repeats, "timings": results, "memory": memory}, f, indent=1
            )


if __name__ == "__main__":
    main()
