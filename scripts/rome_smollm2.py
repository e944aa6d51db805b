"""Reproduce docs/rome-smollm2.json (reported in docs/rome.md): ROME edits of five facts that
SmolLM2-135M-Instruct knows, with the layer picked by the causal trace; one fact at every fourth layer;
and that fact's update with and without the key covariance.

Defaults throughout (RomeConfig(): 20 prefixes, 20 Adam steps, covariance over 100k tokens of the
embedded corpus, cached in $MECHSCOPE_CACHE/rome). One CPU thread; about 30-40 minutes the first
time (the covariances dominate), a few minutes once they are cached.

    python scripts/rome_smollm2.py [--no-sweep] [--no-ablation]
"""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import mechscope as ms
from mechscope.probes.rome import Edit, EditRequest, RomeConfig, compute_value, rank_one_update, rome
from mechscope.probes.rome_eval import evaluate_edit
from mechscope.probes.rome_keys import context_prefixes, key_covariance

torch.set_num_threads(1)
DOCS = Path(__file__).resolve().parent.parent / "docs"
# (template, subject, the model's answer, new object, paraphrases, neighbours: other subjects, same relation)
FACTS = [
    (
        "{} is located in the city of",
        "The Eiffel Tower",
        " Paris",
        " Rome",
        [
            "The Eiffel Tower can be found in the city of",
            "Where is the Eiffel Tower? It is in the city of",
            "The city where the Eiffel Tower stands is",
        ],
        [
            "The Louvre is located in the city of",
            "The Statue of Liberty is located in the city of",
            "The Kremlin is located in the city of",
            "The Golden Gate Bridge is located in the city of",
        ],
    ),
    (
        "{} is located in the country of",
        "The Colosseum",
        " Italy",
        " Japan",
        ["The Colosseum can be found in the country of", "The country where the Colosseum stands is"],
        [
            "The Eiffel Tower is located in the country of",
            "The Kremlin is located in the country of",
            "The Great Wall is located in the country of",
            "The Taj Mahal is located in the country of",
        ],
    ),
    (
        "{} is a famous painting by",
        "The Mona Lisa",
        " Leonardo",
        " Picasso",
        ["The Mona Lisa was painted by", "The Mona Lisa is a painting by the artist"],
        [
            "The Starry Night is a famous painting by",
            "The Scream is a famous painting by",
            "The Night Watch is a famous painting by",
        ],
    ),
    (
        "The mother tongue of {} is",
        "Vladimir Putin",
        " Russian",
        " French",
        ["Vladimir Putin's native language is", "Vladimir Putin was born speaking"],
        [
            "The mother tongue of Angela Merkel is",
            "The mother tongue of Xi Jinping is",
            "The mother tongue of Pedro Sanchez is",
        ],
    ),
    (
        "The official language of {} is",
        "Mexico",
        " Spanish",
        " English",
        ["In Mexico, the official language is", "People in Mexico officially speak"],
        [
            "The official language of France is",
            "The official language of Germany is",
            "The official language of Russia is",
        ],
    ),
]
SWEEP_LAYERS = (2, 6, 10, 14, 18, 22, 26)
ABLATION_LAYER = 14  # where the causal trace puts the Eiffel Tower fact


def run(model, fact, cfg):
    template, subject, old, new, paraphrases, neighbours = fact
    times = {}
    t0 = time.perf_counter()

    def progress(stage, done, total):
        times[stage] = round(time.perf_counter() - t0, 1)

    edit = rome(model, template, subject, new, cfg, progress=progress)
    ev = evaluate_edit(
        edit,
        paraphrases=paraphrases,
        neighbours=neighbours,
        old=old,
        generation_prompts=[template, paraphrases[0], "{} is", neighbours[0]],
    )
    times["total"] = round(time.perf_counter() - t0, 1)
    return {"edit": edit.to_json(), "evaluation": ev.to_json(), "seconds_at_end_of_stage": times}


def covariance_ablation(model, fact, layer):
    """One v* (the same δ), three updates: C over 100k tokens, over 20k tokens, and C = I (no C)."""
    template, subject, old, new, paraphrases, neighbours = fact
    cfg = RomeConfig(layer=layer)
    request = EditRequest.make(template, subject, new)
    prefixes = context_prefixes(model, cfg.prefix_lengths, cfg.prefixes_per_length, seed=cfg.seed)
    value = compute_value(model, request, layer, prefixes, cfg)
    W = model.weights.blocks[layer].W_out.detach().float()
    out = []
    for name, C in [
        ("C, 100k tokens", key_covariance(model, layer, n_tokens=100_000)),
        ("C, 20k tokens", key_covariance(model, layer, n_tokens=20_000)),
        ("C = I (no covariance)", torch.eye(model.cfg.d_mlp, dtype=torch.float64)),
    ]:
        edit = Edit(model, request, layer, rank_one_update(W, C, value.key, value.value), value)
        ev = evaluate_edit(
            edit, paraphrases=paraphrases, neighbours=neighbours, old=old, generation_prompts=[]
        )
        out.append({"covariance": name, "edit": edit.to_json(), "evaluation": ev.to_json()})
        print(name, line(out[-1]), flush=True)
    return out


def line(r):
    s, e = r["evaluation"]["summary"], r["edit"]
    eff = r["evaluation"]["efficacy"]
    return (
        f"{e['prompt']!r} -> {e['target']!r} layer {e['layer']}: p(new) {eff['p_new_before']:.3f} -> "
        f"{eff['p_new_after']:.3f}, p(old) {eff['p_old_before']:.3f} -> {eff['p_old_after']:.3f}; "
        f"paraphrases {s['paraphrase_success']:.2f}; neighbours kept {s['neighbours_kept']:.2f}, "
        f"prefer own {s['neighbours_prefer_own']:.2f}, KL {s['neighbour_kl']:.3f}"
        + (
            ""
            if s["fluency_after"] is None
            else f"; fluency {s['fluency_before']:.2f} -> {s['fluency_after']:.2f}"
        )
    )


def main():
    model = ms.load_model("smollm2-135m")
    known = []
    for fact in FACTS:
        prompt = fact[0].replace("{}", fact[1])
        top = model.tokenizer.decode([int(model(prompt)[0, -1].argmax())])
        print(f"{prompt!r}: top {top!r}, expected {fact[2]!r}", "ok" if top == fact[2] else "SKIPPED")
        if top == fact[2]:
            known.append(fact)
    results = {"config": asdict(RomeConfig()), "facts": [], "sweep": [], "covariance_ablation": []}

    def save():  # after every edit, so an interrupted run keeps what it has
        (DOCS / "rome-smollm2.json").write_text(json.dumps(results, indent=1))

    for fact in known:
        results["facts"].append(run(model, fact, RomeConfig()))
        print(line(results["facts"][-1]), flush=True)
        save()
    if "--no-sweep" not in sys.argv:
        for layer in SWEEP_LAYERS:
            results["sweep"].append(run(model, FACTS[0], RomeConfig(layer=layer)))
            print(line(results["sweep"][-1]), flush=True)
            save()
    if "--no-ablation" not in sys.argv:
        results["covariance_ablation"] = covariance_ablation(model, FACTS[0], ABLATION_LAYER)
        save()


if __name__ == "__main__":
    main()
