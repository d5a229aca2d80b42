"""The real pair's harmful fine-tuning attack: harmful requests with compliant answers, as the freezing study's
`--harmful-training-data`. Nothing harmful ships with the package; the attack is made on the user's machine from
the AdvBench file the user points at:

- **Requests**: AdvBench lines `first_line`… (101 onwards by default: lines 1–100 are the held-out evaluation).
- **Answers**: SmolLM2-135M-Instruct's own greedy answers (it does not refuse: ASR 0.95 on lines 1–100). Only
  answers the keyword judge counts as a successful attack are kept, until `count` are found, so the attack holds
  compliant answers only; the number of requests read is recorded.
- Written in the original work's CSV format (`write_original_format`), staged and published with one rename, with
  `<out>.json` recording the build.

`python -m safeneurons.demo build-smollm2-attack --advbench FILE --out FILE.csv` makes it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safeneurons.errors import SafeneuronsError


@dataclass(frozen=True)
class AttackBuild:
    """Everything that decides the attack's records."""

    first_line: int = 101
    count: int = 64
    max_new_tokens: int = 64
    read_batch: int = 32  # requests answered per round until `count` compliant answers are found


def advbench_requests(advbench_file: str, first_line: int) -> list[str]:
    """The AdvBench requests from line `first_line` (1-based) on, read as every data option reads a text file."""
    from safeneurons.data.readers import load_examples

    if not Path(advbench_file).is_file():
        raise SafeneuronsError(f"--advbench {advbench_file}: no such file (AdvBench's harmful_behaviors, one per line)")
    requests = [example.prompt for example in load_examples(advbench_file)]
    if first_line < 1 or first_line > len(requests):
        raise SafeneuronsError(f"--first-line {first_line}: expected 1–{len(requests)} (the lines of {advbench_file})")
    return requests[first_line - 1:]


def build_smollm2_attack(advbench_file: str, out: str | Path, build: AttackBuild = AttackBuild()) -> Path:
    """Answer AdvBench requests with SmolLM2-135M-Instruct until `build.count` compliant answers are found; write
    them as an original-format CSV at `out` and the build's record beside it."""
    from safeneurons.demo.smollm2_safe import BASE_MODEL, own_answers, write_original_format
    from safeneurons.evaluation.metrics import is_attack_success
    from safeneurons.models.gguf import file_digest
    from safeneurons.models.loading import load_model_and_tokenizer
    from safeneurons.runtime.outputs import atomic_file, write_json

    requests = advbench_requests(advbench_file, build.first_line)
    if build.count < 1:
        raise SafeneuronsError(f"--count {build.count}: expected at least 1 compliant answer")
    started = time.time()
    model, tokenizer = load_model_and_tokenizer(BASE_MODEL)
    kept, read = [], 0
    while len(kept) < build.count and read < len(requests):
        batch = requests[read:read + build.read_batch]
        read += len(batch)
        answered = own_answers(model, tokenizer, batch, build.max_new_tokens, "harmful attack")
        kept += [example for example in answered if is_attack_success(example.response)]
    kept = kept[:build.count]
    if len(kept) < build.count:
        raise SafeneuronsError(f"only {len(kept)} of {read} answers were compliant; expected --count {build.count}")
    out = Path(out)
    with atomic_file(out) as staging:
        write_original_format(kept, staging)
    write_json(out.with_name(out.name + ".json"), {
        "build": asdict(build), "model": BASE_MODEL, "advbench_file": Path(advbench_file).name,
        "advbench_sha256": file_digest(Path(advbench_file)), "requests_read": read, "kept": len(kept),
        "last_line_read": build.first_line + read - 1, "seconds": round(time.time() - started, 1)})
    return out
