"""Toy models: superposition (Elhage et al. 2022) and, later, attention-only transformers."""
