"""Interpretability: activation patching of refusal circuits and model lineage by activation matching."""
