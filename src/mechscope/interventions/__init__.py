"""Causal interventions: metrics, ablations and activation-patching sweeps (more to come: path and
attribution patching, causal tracing, circuit discovery)."""
