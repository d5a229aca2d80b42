"""The whole study in one command: score → fine-tune the arms under each attack and seed → re-score → compare →
evaluate → report, with refusal curves over training.

Arms: `plain` (nothing frozen), `safety_frozen` (the safety-critical weights frozen), `setdiff_frozen` (safety minus
utility, the set difference) and `random_frozen` (a random mask of the same size per matrix frozen, the control),
next to `base` (no fine-tuning). Each fine-tuned arm runs under every attack — `benign` (the utility data) and
`harmful` (a few harmful requests with compliant answers, Qi et al. 2023) — and every seed of `--seeds` (the seed
orders the fine-tuning data); the refusal rate is measured every `--eval-every` steps during fine-tuning.
`--extension-arms` adds the seed's extensions: `partial_frozen` (freeze strength 0.5), `dynamic_frozen` (re-scored every --rescore-every steps,
union), `safety_loss` (the scoring data's loss added to every step), `lora_plain` and `lora_protected` (LoRA on
q/v without and with the safety mask). Each arm is evaluated for refusal
rate / attack success on held-out harmful prompts, refusal rate on harmless prompts (over-refusal) and perplexity
on a utility text set, so the summary says whether freezing protected safety.

Every stage writes into `results_path/<stage>/` and, once its outputs are complete, a `DONE` file holding the
stage's settings; a re-run with the same settings skips it (`--force` redoes everything). With no `--model` on a
machine without CUDA or without the Llama-2 weights, the embedded default runs: the demo model and data, CPU.
"""
