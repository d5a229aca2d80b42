"""Utility: zero-shot accuracy through the lm-evaluation-harness, on the model in memory.

`lm-eval` 0.4.x is the optional extra `safeneurons[eval]` (the original work pins 0.3.0, which no longer runs
with current transformers). The original work's seven tasks are ORIGINAL_TASKS; any task the harness knows, or
one defined in a folder of task YAML files (`include_path`), can be named. Without ZeRO-3, rank 0 runs the
harness; under ZeRO-3 every rank runs the same requests in the same order, so that every forward pass finds
the other ranks at the same parameter gathers.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

ORIGINAL_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")


def parse_tasks(text: str) -> tuple[str, ...]:
    """`--lm-eval-tasks boolq,rte` (or `original`: the original work's seven)."""
    if text.strip() == "original":
        return ORIGINAL_TASKS
    tasks = tuple(task.strip() for task in text.split(",") if task.strip())
    if not tasks:
        raise SafeneuronsError(f"--lm-eval-tasks {text!r} names no task")
    return tasks


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """lm-eval is installed and knows every task (before any model loads)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SafeneuronsError("--lm-eval-tasks needs the lm-evaluation-harness: pip install 'safeneurons[eval]'") \
            from None
    known = set(TaskManager(include_path=include_path).all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise SafeneuronsError(f"lm-eval task {unknown[0]!r} is not known to the harness"
                               f"{'' if include_path is None else f' nor defined in {include_path}'}")


def zero_shot_accuracy(model: Any, tokenizer: Any, tasks: Sequence[str], batch_size: int = 16,
                       limit: int | None = None, include_path: str | None = None) -> dict[str, dict] | None:
    """Per task: accuracy (and length-normalised accuracy where the task has it) with the harness's standard
    errors, zero-shot; on rank 0 (None elsewhere). Collective under ZeRO-3."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from safeneurons.runtime import distributed
    from safeneurons.runtime.zero3 import is_zero3_partitioned

    if not distributed.is_main() and not is_zero3_partitioned(model):
        return None
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(model=harness, tasks=list(tasks), num_fewshot=0, limit=limit, log_samples=False,
                                 task_manager=TaskManager(include_path=include_path), random_seed=0)
    except Exception as error:  # a task whose data cannot be read (offline) fails here: say which, in one line
        raise SafeneuronsError(f"lm-eval could not run {', '.join(tasks)}: {str(error).splitlines()[0]}") from None
    if not distributed.is_main():
        return None
    results = {}
    for task in tasks:
        values = output["results"][task]
        results[task] = {metric: values[f"{metric},none"] for metric in METRICS if f"{metric},none" in values}
        results[task].update({f"{metric}_stderr": values[f"{metric}_stderr,none"] for metric in METRICS
                              if f"{metric}_stderr,none" in values})
        results[task]["n"] = output.get("n-samples", {}).get(task, {}).get("effective")
    return results
