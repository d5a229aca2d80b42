"""Model lineage by activation matching of MLP neurons (Zhu et al. 2025, *Independence Tests for Language Models*).

Both models read the same tokens. In a layer, every MLP neuron is the vector of its `gate_proj` outputs over those
tokens (and, separately, of its `up_proj` outputs). A linear assignment between the two models' neurons on the gate
vectors gives a permutation π_gate, on the up vectors π_up. When one model was derived from the other (fine-tuned,
neurons permuted), both assignments recover the same neuron correspondence and Spearman's test between π_gate and π_up
gives p ≈ 0; for independently trained models the two permutations are unrelated and p is uniform on (0, 1).
Fisher's method combines the layers. `--all-layers` tests every layer of one model against every layer of the other
(pruned or deeper models) and reports which layers match.

Python API with the original module's names: `match_wmats`, `mlp_matching_gate`, `mlp_matching_up`, `mlp_layers`,
`statistic_layer`, `statistic`, `statistic_all`; `trace_models` returns the whole `TraceResult`. Unlike the original,
distances are float64 (float32 at least) on the model's device, sizes come from the model, `mlp_layers` takes the two
layer indices it needs, and each model runs once over the tokens for all its layers (gate and up together).
"""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["tracing"])
