"""Causal interventions: metrics, ablations, activation patching sweeps, path patching, attribution
patching, circuit discovery (EAP) with faithfulness, and the ``explain`` report."""
