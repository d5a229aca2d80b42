"""`safeneurons finetune`: fine-tuning with the safety-critical weights frozen, bit for bit.

Two training loops share one schedule and one report: a plain torch loop (single process, AdamW) and a DeepSpeed
engine loop (ZeRO stages 0-3, any launcher). The frozen weights (`freezing.freeze`) are attached to the
optimizer's step, so the same mechanism also serves the HF Trainer (`trainer.py`, also `--engine trainer`) and
accelerate. The result is a normal HF model folder (gathered from the ZeRO-3 partitions on rank 0, written
atomically) with `freeze_report.json`.
"""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["finetune"])
