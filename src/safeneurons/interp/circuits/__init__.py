"""Edge-level refusal circuits: the graph of heads and MLPs (graph), prompt pairs of different lengths (pairs),
per-receiver patching in one forward (forward), EAP, EAP-IG and exact edge scores (scores), circuits and their
faithfulness against random ones (faithfulness), the study's result (analysis), its overlap with the
safety-critical weights (overlap), the circuit removed during generation (removal), the layer-sharded version
(sharded), its files (report) and `circuit` as one call (run)."""
