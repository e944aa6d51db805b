"""The induction-head phase change of a two-layer attention-only run, as a figure and a summary.

Reads a checkpoint written by ``mechscope toy attn-only --layers 2 ... --out DIR`` (its
``history.jsonl``, ``train_cfg.json`` and weights), and writes ``attn_only_phase_change.svg`` (loss,
in-context-learning score, best induction / previous-token scores against step) and
``attn_only_phase_change.json`` (the phase-change step, the scores before and after it, and the
final model's per-head scores and K-composition table) to ``--out``.

Usage: .venv/bin/python scripts/attn_only_phase_change.py DIR [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import mechscope as ms
from mechscope.circuits.composition import MODES, composition_scores
from mechscope.circuits.head_detectors import head_scores
from mechscope.toy.train_attn_only import offline_text, phase_change_step
from mechscope.viz.phase_change import render_phase_change_svg

KEYS = ("val_loss", "icl_score", "induction", "previous_token", "k_composition")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = p.parse_args()
    torch.set_num_threads(1)

    history = [json.loads(line) for line in (args.checkpoint / "history.jsonl").read_text().splitlines()]
    step = phase_change_step(history)
    by_step = {r["step"]: r for r in history}
    steps = sorted(by_step)
    summary: dict = {
        "train_cfg": json.loads((args.checkpoint / "train_cfg.json").read_text()),
        "phase_change_step": step,
    }
    if step is not None:  # the last evaluation before the rise, the phase-change step, the end
        i = steps.index(step)
        start = next(
            s for s in reversed(steps[:i]) if by_step[s]["induction"] < history[0]["induction"] + 0.02
        )
        summary["rows"] = {
            name: {k: by_step[s][k] for k in ("step", *KEYS)}
            for name, s in (("start", 0), ("before", start), ("phase_change", step), ("end", steps[-1]))
        }

    model = ms.load_model(str(args.checkpoint))
    common = torch.tensor(list(offline_text().encode("utf-8"))).bincount(minlength=256).topk(64).indices
    scores = head_scores(model, seq_len=32, batch=16, vocab=common)
    comp = composition_scores(model)
    k = MODES.index("K")
    summary["final_heads"] = {name: s.tolist() for name, s in scores.items()}
    summary["k_composition_layer0_to_layer1"] = comp.scores[k, 0, :, 1, :].tolist()
    summary["k_composition_baseline"] = comp.baseline[k].item()
    summary["top_k_composition"] = comp.top("K", 5)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attn_only_phase_change.svg").write_text(render_phase_change_svg(history, step))
    (args.out / "attn_only_phase_change.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "train_cfg"}, indent=1))


if __name__ == "__main__":
    main()
