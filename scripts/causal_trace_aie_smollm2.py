"""Reproduce docs/figures/causal_trace_aie_smollm2.{svg,html,json}: ROME's average indirect effects.

Meng et al. (2022), Figure 2 on the default model: causal-trace the facts the model knows (hidden
state; MLP and attention with a window of 10 layers), the subject corrupted by Gaussian noise of
3 x the std of the subjects' token embeddings, and average the indirect effects by ROME's token
category and layer.

The facts are mechscope's hand-written ``known_facts.json`` (not ROME's ``known_1000``), kept when
the answer's first token is the model's top-1 prediction, as ROME kept the facts its model got
right; they are traced in a seeded random order (so that a time budget samples every relation) until
``--budget-minutes`` of tracing are spent. Each trace is appended to ``--work`` as it finishes, so an
interrupted run resumes where it stopped (it records the settings and refuses others; delete it to
start over). One CPU thread by default.

Usage: .venv/bin/python scripts/causal_trace_aie_smollm2.py [--budget-minutes 10] [--samples 3]
"""

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

import mechscope as ms
from mechscope.interventions.causal_trace import (
    CATEGORIES,
    CausalTrace,
    average_indirect_effect,
    category_samples,
    causal_trace,
    noise_scale,
)
from mechscope.interventions.known_facts import facts_known_by, load_known_facts

figures = Path(__file__).resolve().parent.parent / "docs" / "figures"
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--samples", type=int, default=3, help="noise draws per prompt (ROME: 10)")
parser.add_argument("--window", type=int, default=10)
parser.add_argument("--seed", type=int, default=0, help="order of the facts; fact i's noise: seed + known_id")
parser.add_argument("--budget-minutes", type=float, default=10.0, help="stop starting traces after this")
parser.add_argument("--limit", type=int, default=None, help="trace at most N known facts")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--work", type=Path, default=Path("/tmp/causal_trace_aie_smollm2.jsonl"))
parser.add_argument("--out", type=Path, default=figures / "causal_trace_aie_smollm2")
args = parser.parse_args()
torch.set_num_threads(args.threads)

model = ms.load_model("smollm2-135m")
candidates = load_known_facts()
known = facts_known_by(model, candidates)
print(f"{len(known)} of {len(candidates)} candidate facts known (answer's first token is the top-1)")
# ROME: 3 x the std of the embeddings of the subjects' tokens, over the whole fact set.
noise = noise_scale(model, [f.subject for f in known], k=3.0)
order = list(known)
random.Random(args.seed).shuffle(order)
order = order[: args.limit]
settings = {"samples": args.samples, "window": args.window, "seed": args.seed, "noise": noise}

done: dict[int, dict] = {}
if args.work.exists():
    lines = [json.loads(line) for line in args.work.read_text().splitlines() if line]
    if lines and lines[0] != settings:
        raise SystemExit(f"{args.work} was made with {lines[0]}, not {settings}: delete it or pass --work")
    done = {r["known_id"]: r for r in lines[1:]}
else:
    args.work.write_text(json.dumps(settings) + "\n")


def _rows(values: torch.Tensor) -> list[list[float | None]]:
    """Rounded rows; None where a category had no token (NaN is not JSON)."""
    return [[None if math.isnan(x) else round(x, 5) for x in row] for row in values.tolist()]


traces: list[CausalTrace] = []
facts = []
t_traced, seconds = 0.0, []
for fact in order:
    if fact.known_id in done:
        r = done[fact.known_id]
        kinds = {k: torch.tensor(r[k]) for k in ("state", "mlp", "attn")}
        trace = CausalTrace(
            kinds, r["clean"], r["corrupted"], r["tokens"], r["subject_positions"], r["answer"], r["window"]
        )
        seconds.append(r["seconds"])
    else:
        if sum(seconds) > 60 * args.budget_minutes:  # over this and earlier runs
            break
        t0 = time.time()
        # The answer is the model's top-1 token, which facts_known_by checked is the fact's first token.
        trace = causal_trace(
            model,
            fact.prompt,
            fact.subject,
            window=args.window,
            samples=args.samples,
            noise=noise,
            seed=args.seed + fact.known_id,
        )
        dt = time.time() - t0
        t_traced += dt
        seconds.append(dt)
        first = model.tokenizer.encode(fact.answer, add_special_tokens=False)[0]
        if model.tokenizer.decode([first]) != trace.answer:
            raise SystemExit(f"{fact.prompt!r}: traced {trace.answer!r}, expected {fact.answer!r}")
        with args.work.open("a") as f:
            f.write(json.dumps({"known_id": fact.known_id, "seconds": dt, **trace.to_json()}) + "\n")
        print(
            f"[{len(traces) + 1}] {dt:5.1f} s  {fact.prompt!r} -> {trace.answer!r}: "
            f"clean {trace.clean:.3f}, corrupted {trace.corrupted:.3f}",
            flush=True,
        )
    traces.append(trace)
    facts.append(fact)

aie = average_indirect_effect(traces)
# ROME's error bars: the std of a category's pooled rows over the square root of their number.
stderr, rows = {}, {}
for kind in aie:
    samples = category_samples(traces, kind)
    rows[kind] = [len(s) for s in samples]
    stderr[kind] = torch.stack(
        [
            s.std(0) / math.sqrt(len(s)) if len(s) > 1 else torch.full_like(aie[kind][0], math.nan)
            for s in samples
        ]
    )
clean = torch.tensor([t.clean for t in traces])
corrupted = torch.tensor([t.corrupted for t in traces])


def _peak(kind: str, category: int) -> dict:
    row = aie[kind][category]
    layer = int(row.nan_to_num(float("-inf")).argmax())
    return {
        "layer": layer,
        "aie": round(float(row[layer]), 4),
        "stderr": round(float(stderr[kind][category, layer]), 4),
    }


result = {
    "model": "smollm2-135m",
    "method": "ROME causal tracing (Meng et al. 2022): indirect effect = p(answer | corrupted subject, one "
    "state restored) - p(answer | corrupted subject); pooled per ROME token category and layer",
    **settings,
    "noise_k": 3.0,
    "candidates": len(candidates),
    "known": len(known),
    "traced": len(traces),
    "categories": list(CATEGORIES),
    "rows_per_category": rows["state"],
    "average_clean": round(float(clean.mean()), 4),
    "average_corrupted": round(float(corrupted.mean()), 4),
    "average_total_effect": round(float((clean - corrupted).mean()), 4),
    "peaks": {
        "state at last subject token": _peak("state", 2),
        "state at last token": _peak("state", 5),
        "mlp at last subject token": _peak("mlp", 2),
        "mlp at last token": _peak("mlp", 5),
        "attn at last subject token": _peak("attn", 2),
        "attn at last token": _peak("attn", 5),
    },
    "aie": {k: _rows(v) for k, v in aie.items()},
    "aie_stderr": {k: _rows(v) for k, v in stderr.items()},
    "seconds_per_trace": {
        "median": round(sorted(seconds)[len(seconds) // 2], 1),
        "total": round(sum(seconds), 1),
        "threads": args.threads,
    },
    "facts": [
        {
            "known_id": f.known_id,
            "relation_id": f.relation_id,
            "prompt": f.prompt,
            "subject": f.subject,
            "answer": t.answer,
            "clean": round(t.clean, 4),
            "corrupted": round(t.corrupted, 4),
            "subject_positions": t.subject,
            "n_tokens": len(t.str_tokens),
        }
        for f, t in zip(facts, traces, strict=True)
    ],
}
# One line per list of numbers, so the file reads as tables.
text = re.sub(
    r"\[\s+([^\[\]{}]*?)\s+\]",
    lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
    json.dumps(result, indent=1),
)
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.with_suffix(".json").write_text(text + "\n")

from mechscope.viz.causal_trace import render_average_trace_html, render_average_trace_svg  # noqa: E402

title = f"SmolLM2-135M-Instruct: average indirect effect over {len(traces)} known facts"
args.out.with_suffix(".svg").write_text(
    render_average_trace_svg(aie, n_prompts=len(traces), window=args.window, title=title)
)
page = render_average_trace_html(
    aie,
    n_prompts=len(traces),
    total_effect=result["average_total_effect"],
    window=args.window,
    stderr=stderr,
    title=title,
)
args.out.with_suffix(".html").write_text(page)
print(
    f"{len(traces)} facts; average total effect {result['average_total_effect']:.3f}; "
    f"{sum(seconds):.0f} s of tracing ({t_traced:.0f} s this run)"
)
print(json.dumps(result["peaks"], indent=1))
