"""Reproduce docs/causal-trace-smollm2.{html,json}: ROME's causal trace of one fact on the default model."""

import json
import time
from pathlib import Path

import torch

import mechscope as ms
from mechscope.interventions.causal_trace import causal_trace

torch.set_num_threads(1)
docs = Path(__file__).resolve().parent.parent / "docs"
model = ms.load_model("smollm2-135m")
t0 = time.time()
trace = causal_trace(
    model, "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris", samples=5
)
print(f"traced in {time.time() - t0:.0f} s; clean {trace.clean:.3f}, corrupted {trace.corrupted:.3f}")
(docs / "causal-trace-smollm2.html").write_text(trace.to_html())
(docs / "causal-trace-smollm2.json").write_text(json.dumps(trace.to_json()))
