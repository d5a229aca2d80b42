"""Safety neurons as causal units (Chen et al. 2024): the MLP's intermediate units addressed by (layer, neuron).
Their sets live in `masks.neurons` (from indexes, from a `score` mask file, the top k% of a ranking, random),
their dynamic patching during generation in `interventions.neuron_patching`; here, the rankings that choose them:
`contrast`, Chen et al.'s activation contrast of an aligned model against its base.
"""
