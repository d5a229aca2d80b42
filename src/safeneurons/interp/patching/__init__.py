"""Activation patching of refusal circuits: which layers, components, heads and token positions carry refusal.

A *site* is one activation of one run: a decoder layer's output (`residual`), its attention output (`attn_out`),
its MLP output (`mlp_out`) or one head's slice of the input to `o_proj` (`attn_head`), at the last token, at every
token at once (`all`) or at one token index (negative indexes count from the end). Patching runs the *base*
prompt with the site's activation taken from the *source* prompt and measures a metric at the last position:

- noising: base = clean, source = corrupted; effect = (clean − patched) / (clean − corrupted)
- denoising: base = corrupted, source = clean; effect = (patched − corrupted) / (clean − corrupted)
- interchange: base = the first prompt, source = the second; effect = (patched − base) / (source − base)

Exact patching puts many sites in one forward pass: the batch holds copies of the base run, row r with site r
patched from the source run's cached activations (both runs cached once, every layer). `attribution` estimates
every site at once from one forward and one backward of the base run: (a_source − a_base) · ∂metric/∂a
(Syed et al. 2023). Sites are split across ranks and the results gathered; under ZeRO-3 every rank runs the
same number of forward passes. The refusal direction (Arditi et al. 2024) is the difference of the mean residual
at the last prompt token between harmful and harmless prompts.
"""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["patching"])
