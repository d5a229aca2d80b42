"""Safety neurons as causal units (Chen et al. 2024): the MLP's intermediate units addressed by (layer, neuron).
Their sets live in `masks.neurons` (from indexes, from a `score` mask file, the top k% of a ranking, random),
their dynamic patching during generation in `interventions.neuron_patching`. Here: `contrast`, Chen et al.'s
activation contrast of an aligned model against its base; `rankings`, our weight scores per neuron and their set
difference; `study`, every ranking's top k% patched both ways against random neurons, with the verdict; `report`,
its tables, figure and files; `run`, the `neurons` command's library call.
"""
