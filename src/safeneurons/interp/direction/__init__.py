"""The refusal direction (Arditi et al. 2024): candidates at every layer and post-instruction position, the
original's selection, directional ablation, activation addition, weight orthogonalization and their evaluation."""
