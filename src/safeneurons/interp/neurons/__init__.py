"""Safety neurons as causal units (Chen et al. 2024): the MLP's intermediate units addressed by (layer, neuron),
patched from another model of the same structure during generation, and the rankings that choose them.

- `sets`: neuron sets per layer — from indexes, from a `score` mask file, the top k% of a ranking, random;
- `dynamic`: dynamic patching — at every generated token the source model runs on the same prefix and the chosen
  neurons of the patched model take its values;
- `contrast`: Chen et al.'s activation contrast, a neuron ranking from two models' activations;
- `rankings`, `study`, `report`: the study that patches each ranking's top-k% sets both ways and compares them.
"""
