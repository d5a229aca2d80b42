"""Workflows that chain stages: the pipeline study, the ablation sweep, and the memory plan."""
