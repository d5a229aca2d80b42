"""Evaluation: attack success rate on harmful prompts, refusal rate on harmless ones, perplexity on a text set.

Prompts are split across the ranks (round-robin) and the generations gathered to rank 0 in prompt order;
perplexity sums each rank's token losses and token counts, so the value does not depend on the rank count.
Under ZeRO-3 (`--deepspeed`, the model partitioned over the ranks) every forward pass is collective: ranks run
their batches in lock-step (`generate(synced_gpus=True)`, and a rank with fewer batches runs stand-in batches
whose results are dropped), so ranks with fewer or shorter prompts keep serving the others' parameter gathers.
"""
