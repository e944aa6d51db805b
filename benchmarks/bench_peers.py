"""The peers (TransformerLens v3+ bridge, nnsight) against plain ``transformers``, same method as
``bench_core.py``: smollm2-135m, CPU, one thread, inference mode, alternating repeats in one
process, ``ratio = median(peer) / median(plain)``.

Runs in its own virtual environment (the peers pin their own dependencies), for example:

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install torch==2.13.0          # the CPU wheel first, so no CUDA build is pulled
    /tmp/peers-venv/bin/pip install transformer-lens nnsight
    HF_HUB_OFFLINE=1 /tmp/peers-venv/bin/python benchmarks/bench_peers.py \\
        --model-dir ~/.cache/mechscope/converted/SmolLM2-135M-Instruct.Q4_1-<key>

``--model-dir`` is the safetensors directory mechscope writes on its first load of smollm2-135m
(a normal HF directory). This script does not import mechscope; it does load its host_memory file
to keep freed memory as ``load_model`` does (``--glibc-defaults`` leaves the allocator alone).

Equivalents measured (each peer's own idiom):
    b  TL: run_with_cache(names_filter=resid_pre|resid_post|attn_out|mlp_out|attn.hook_pattern)
       nnsight: trace saving every layer's input and output, self_attn output and pattern,
       mlp output (HF eager attention, the only HF path that returns the pattern)
    c  TL: run_with_cache() (every hook point); nnsight: tracer.cache() (every module's output,
       eager attention so the patterns are among them)
    d  TL: generate(stop_at_eos=False, greedy) inside model.hooks(...) with the steering hook;
       nnsight: model.generate(..., min_new_tokens=32) with the steering edit on every step
The plain baseline is always a separate, untouched HF model with its default (SDPA) attention;
TransformerLens switches the model it wraps to eager attention, so its forward is also timed
against plain eager HF (reported as ``vs eager``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
from collections.abc import Callable

import torch
from _timing import compare, describe, machine
from transformers import AutoModelForCausalLM, AutoTokenizer

SEED = 0
SHAPES = {"8x128": (8, 128), "1x32": (1, 32)}
CACHED_B = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern")
STEER_LAYER = 10
PROMPT_LEN, NEW_TOKENS = 16, 32


def tokens(vocab: int, batch: int, pos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (batch, pos), generator=g)


def steering_vector(d_model: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(d_model, generator=g) * 0.1


def load(model_dir: str, attn: str | None = None):
    kw = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kw).eval()


def plain_generate(hf, prompt):
    mask = torch.ones_like(prompt)
    pad = hf.generation_config.pad_token_id
    pad = hf.generation_config.eos_token_id if pad is None else pad
    return lambda: hf.generate(
        input_ids=prompt,
        attention_mask=mask,
        pad_token_id=pad,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )


# ---------------------------------------------------------------------------- TransformerLens
def transformer_lens_workloads(
    model_dir: str, tok, plain_hf
) -> dict[tuple[str, str], tuple[Callable, Callable]]:
    from transformer_lens.model_bridge import TransformerBridge

    wrapped = load(model_dir)
    bridge = TransformerBridge.boot_transformers(model_dir, hf_model=wrapped, tokenizer=tok)
    vocab, d_model = plain_hf.config.vocab_size, plain_hf.config.hidden_size
    work = {}
    for shape, (b, p) in SHAPES.items():
        x = tokens(vocab, b, p)

        def plain(x=x):
            return plain_hf(input_ids=x, use_cache=False).logits

        work[("b", shape)] = (
            plain,
            lambda x=x: bridge.run_with_cache(x, names_filter=lambda n: n.endswith(CACHED_B)),
        )
        work[("c", shape)] = (plain, lambda x=x: bridge.run_with_cache(x))
    prompt = tokens(vocab, 1, PROMPT_LEN)
    vec = steering_vector(d_model)

    def steer(x, hook):
        return x + vec

    def tl_generate():
        with bridge.hooks(fwd_hooks=[(f"blocks.{STEER_LAYER}.hook_resid_post", steer)]):
            return bridge.generate(
                prompt,
                max_new_tokens=NEW_TOKENS,
                stop_at_eos=False,
                do_sample=False,
                verbose=False,
                return_type="tokens",
            )

    work[("d", "gen")] = (plain_generate(plain_hf, prompt), tl_generate)
    # Context: TL forces eager attention on the model it wraps; this row times a bare bridge
    # forward against plain HF loaded with eager attention.
    eager_hf = load(model_dir, "eager")
    x = tokens(vocab, *SHAPES["8x128"])
    work[("fwd vs eager", "8x128")] = (
        lambda: eager_hf(input_ids=x, use_cache=False).logits,
        lambda: bridge(x),
    )
    return work


# ---------------------------------------------------------------------------- nnsight
def nnsight_workloads(model_dir: str, tok, plain_hf) -> dict[tuple[str, str], tuple[Callable, Callable]]:
    from nnsight import LanguageModel

    eager = LanguageModel(load(model_dir, "eager"), tokenizer=tok)  # patterns need HF's eager path
    sdpa = LanguageModel(load(model_dir), tokenizer=tok)
    vocab, d_model = plain_hf.config.vocab_size, plain_hf.config.hidden_size
    n_layers = plain_hf.config.num_hidden_layers
    work = {}
    for shape, (b, p) in SHAPES.items():
        x = tokens(vocab, b, p)

        def plain(x=x):
            return plain_hf(input_ids=x, use_cache=False).logits

        def trace_b(x=x):
            saved = []
            with eager.trace(x):
                for i in range(n_layers):
                    layer = eager.model.layers[i]
                    saved.append(layer.input.save())  # resid_pre
                    attn = layer.self_attn.output  # (attn_out, pattern)
                    saved += [attn[0].save(), attn[1].save(), layer.mlp.output.save(), layer.output.save()]
                logits = eager.output.logits.save()
            return logits, saved

        def trace_c(x=x):
            with eager.trace(x) as tracer:
                cache = tracer.cache()
                logits = eager.output.logits.save()
            return logits, cache

        work[("b", shape)] = (plain, trace_b)
        work[("c", shape)] = (plain, trace_c)
    prompt = tokens(vocab, 1, PROMPT_LEN)
    vec = steering_vector(d_model)

    def nn_generate():
        with sdpa.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        ) as tracer:
            for _ in tracer.iter[:NEW_TOKENS]:  # one forward per new token
                sdpa.model.layers[STEER_LAYER].output[:] += vec
            ids = tracer.result.save()
        return ids

    work[("d", "gen")] = (plain_generate(plain_hf, prompt), nn_generate)
    return work


PEERS = {"transformer_lens": transformer_lens_workloads, "nnsight": nnsight_workloads}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "transformer-lens", "nnsight"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _host_memory():
    """mechscope's host_memory module, loaded from its file (it imports nothing of mechscope), so
    that the peers run under the same allocator setting as mechscope's own benchmark."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "src", "mechscope", "models", "host_memory.py")
    spec = importlib.util.spec_from_file_location("host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir", required=True, help="HF directory of smollm2-135m (mechscope's converted cache)"
    )
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated of " + ", ".join(PEERS))
    p.add_argument("--quick", action="store_true", help="few repeats")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per side at 8x128 (default 11, quick 2)"
    )
    p.add_argument("--json", help="also write every raw timing to this file")
    p.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's allocator as it is (default: keep freed memory, as mechscope's load_model does)",
    )
    args = p.parse_args()

    torch.set_num_threads(1)
    kept = False if args.glibc_defaults else _host_memory().keep_freed_memory()
    print(f"host memory: {'freed memory kept for reuse' if kept else 'glibc defaults'}")
    repeats = args.repeats or (2 if args.quick else 11)
    model_dir = os.path.expanduser(args.model_dir)
    info = machine()
    info["keep_freed_memory"] = kept
    print(f"machine: {info}\nversions: {versions()}")
    print(f"{repeats} repeats per side at 8x128 (x6 at 1x32, x3 for generation), interleaved\n")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    plain_hf = load(model_dir)
    results = []
    with torch.inference_mode():
        for peer in args.peers.split(","):
            try:
                work = PEERS[peer](model_dir, tok, plain_hf)
            except Exception as e:  # a peer that cannot wrap this model is reported, not fatal
                print(f"{peer}: could not set up ({type(e).__name__}: {e})")
                traceback.print_exc()
                continue
            for (config, shape), (plain, cand) in work.items():
                try:
                    if config == "d":  # both sides must produce the same number of tokens
                        n_plain, n_peer = plain().shape[-1], cand().shape[-1]
                        assert n_plain == n_peer == PROMPT_LEN + NEW_TOKENS, (n_plain, n_peer)
                    reps = {"8x128": repeats, "1x32": repeats * 6, "gen": repeats * 3}[shape]
                    r = compare(plain, cand, reps, warmup=1 if shape == "8x128" else 3)
                except Exception as e:
                    print(f"{peer} ({config}) {shape}: failed ({type(e).__name__}: {e})")
                    continue
                r.update(peer=peer, config=config, shape=shape)
                results.append(r)
                print(f"{peer:>16} ({config}) {shape:>6}: {describe(r)}", flush=True)
            del work
            gc.collect()
    print(
        "\n| peer | config | shape | plain ms | peer ms | ratio | 95% interval | CPU ratio | sys ms plain / peer |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|---:|")
    for r in results:
        lo, hi = r["ci95"]
        print(
            f"| {r['peer']} | ({r['config']}) | {r['shape']} | {r['plain_median_s'] * 1e3:.1f} "
            f"| {r['cand_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {lo:.3f}-{hi:.3f} | {r['cpu_ratio']:.3f} "
            f"| {r['plain_sys_median_s'] * 1e3:.0f} / {r['cand_sys_median_s'] * 1e3:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "versions": versions(), "repeats": repeats, "timings": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
