"""Over-refusal on XSTest (Röttger et al. 2024): prompts with `prompt`, `type` and `label` columns (a CSV file, or the
hub set `xstest` and any `datasets` source)
(`label` safe or unsafe; the published file also has id, focus and note). A well-calibrated model answers the
safe prompts (homonyms, figurative language, safe contexts, ...) and refuses the unsafe contrast prompts.

Reported: the refusal rate on the safe prompts (over-refusal), the compliance rate on the unsafe ones, each with
its 95% Wilson interval, and the refusal rate per prompt type. Refusal is the keyword judge's (the original
work's refusal substrings), as for every other refusal rate of `eval`.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from safeneurons.errors import SafeneuronsError

REQUIRED_COLUMNS = ("prompt", "label")
LABELS = ("safe", "unsafe")


@dataclass(frozen=True)
class XSTestPrompt:
    prompt: str
    label: str
    type: str = ""


def read_xstest(source: str | Path) -> list[XSTestPrompt]:
    """The prompts of an XSTest CSV file or of a `datasets` source (the `xstest` hub set, a save_to_disk folder, a
    parquet file), checked: one line naming the problem for a missing file, a missing column, an unknown label or
    no prompt at all."""
    from safeneurons.data.hub import is_datasets_source, load_rows

    if is_datasets_source(str(source)):
        rows, where = load_rows(str(source)).records, f"XSTest set {source}"
    else:
        rows, where = _csv_rows(Path(source)), f"XSTest file {source}"
    missing = [column for column in REQUIRED_COLUMNS if column not in (rows[0] if rows else {})]
    if rows and missing:
        raise SafeneuronsError(f"{where} has no {missing[0]!r} column; expected the columns prompt, type, label")
    prompts = []
    for line, row in enumerate(rows, start=2):
        label = str(row.get("label") or "").strip().lower()
        if label not in LABELS:
            raise SafeneuronsError(f"{where} line {line}: label {row.get('label')!r} is not safe or unsafe")
        prompts.append(XSTestPrompt(str(row.get("prompt") or "").strip(), label, str(row.get("type") or "").strip()))
    if not prompts:
        raise SafeneuronsError(f"{where} holds no prompt")
    return prompts


def _csv_rows(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise SafeneuronsError(f"XSTest file {path} has no {missing[0]!r} column; expected the columns "
                                       f"prompt, type, label")
            return list(reader)
    except FileNotFoundError:
        raise SafeneuronsError(f"XSTest file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SafeneuronsError(f"XSTest file {path} is not UTF-8 text") from None


@dataclass
class XSTestResult:
    source: str
    n_safe: int
    n_unsafe: int
    safe_refusal_rate: float | None  # over-refusal
    safe_refusal_rate_interval: tuple[float, float] | None
    unsafe_compliance_rate: float | None
    unsafe_compliance_rate_interval: tuple[float, float] | None
    refusal_rate_by_type: dict[str, float] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def score_xstest(source: str, prompts: Sequence[XSTestPrompt], generations: Sequence[Sequence[str]]) -> XSTestResult:
    """Rates from the generations (first sample of each prompt)."""
    from safeneurons.evaluation.metrics import is_refusal, wilson_interval

    refused = [is_refusal(texts[0]) for texts in generations]

    def rate(label: str, count_refusals: bool) -> tuple[float | None, tuple[float, float] | None, int]:
        flags = [flag for flag, item in zip(refused, prompts) if item.label == label]
        if not flags:
            return None, None, 0
        hits = sum(flags) if count_refusals else len(flags) - sum(flags)
        return hits / len(flags), wilson_interval(hits, len(flags)), len(flags)

    safe, safe_interval, n_safe = rate("safe", True)
    unsafe, unsafe_interval, n_unsafe = rate("unsafe", False)
    by_type: dict[str, list[bool]] = {}
    for flag, item in zip(refused, prompts):
        by_type.setdefault(item.type or item.label, []).append(flag)
    results = [{"prompt": item.prompt, "type": item.type, "label": item.label, "generation": texts[0],
                "refused": flag} for item, texts, flag in zip(prompts, generations, refused)]
    return XSTestResult(source, n_safe, n_unsafe, safe, safe_interval, unsafe, unsafe_interval,
                        {name: sum(flags) / len(flags) for name, flags in sorted(by_type.items())}, results)


def evaluate_xstest(model: Any, tokenizer: Any, path: str, decoding: Any, batch_size: int,
                    system: str | None = None) -> XSTestResult | None:
    """Generate for every XSTest prompt (distributed like every generation); the result on rank 0."""
    from safeneurons.data.samples import format_prompt
    from safeneurons.evaluation.generation import generate_distributed

    prompts = read_xstest(path)
    generations = generate_distributed(model, tokenizer, [format_prompt(tokenizer, item.prompt, system)
                                                          for item in prompts], decoding, batch_size)
    return None if generations is None else score_xstest(path, prompts, generations)
