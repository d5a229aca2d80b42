"""The distributed runtime: launch and collectives, ZeRO-3 parameter views, DeepSpeed configs, memory sizes,
checkpoint files, result files staged and published with one rename, and resume markers."""
