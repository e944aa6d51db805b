"""Circuits read off the weights and head behaviour: factored matrices, QK/OV, composition, detectors, logit lens."""
