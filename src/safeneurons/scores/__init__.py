"""`safeneurons score`: find the safety-critical weights (or neurons) of a model with wanda, wandg (SNIP) or random.

Scores (design §2), for every Linear of the decoder layers:
- wanda: ``S = |W| * sqrt(mean over samples of Σ_response-tokens x_j²)``;
- wandg: ``S = |W| * Σ_samples |∂L_sample/∂W|`` with the loss on the response tokens only, fp32 accumulator;
- random: uniform scores, a baseline with the same counts.
Safety-critical = the highest scores: per output row the top ``int(cols × ratio)`` (granularity ``weight``), or
whole output rows ranked by their summed score (``neuron``); with a utility data set, per matrix the top-q
fraction by safety score minus the top-p fraction by utility score (set difference).

How the work is split (N ranks): samples are dealt round-robin, every rank runs the same number of forward (and
backward) passes (padded with a dummy sample that contributes nothing, so ZeRO-3's collectives stay in step).
Per-sample gradients are never materialised as ``param.grad``: forward hooks keep a Linear's input X, tensor hooks
its output gradient dY, and each rank adds ``|dY^T X|`` (the sample's |∂L/∂W|) of its own samples into local fp32
sums. After the passes each sum is reduced once to the rank that owns the Linear's layer (layers round-robin): the
traffic is 4 bytes per scored weight per rank for the whole run, not per pass. The sums of all Linears need
4 bytes per scored weight on every rank; when that exceeds `score_memory` the Linears are taken in rounds that fit
(the passes run once per round). Owners fetch the full weight of one Linear at a time from the ZeRO-3 partitions,
select, and write their masks as one shard each. `batch_size` > 1 runs several samples per pass (the |gradient| is
still taken per sample), which amortises ZeRO-3's parameter gathers over the batch.
"""
