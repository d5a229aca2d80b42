"""`smollm2-safe`: SmolLM2-135M-Instruct (which does not refuse) with a short safety alignment in real language,
shipped as a LoRA adapter (`demo/assets/smollm2_safe/`, PEFT's files) and merged into the de-quantized model at
load (`models.adapters`). The recipe was fixed from its principle before any experiment and is not tuned:

- **Refusals**: `n_harmful` records of the original work's `align` file, the file the build is pointed at
  (Llama-2-chat's refusals of AdvBench lines 101–520; the shipped adapter was built from `align_short`), drawn with
  `seed`. Each `[INST] … [/INST]` instruction is put in SmolLM2's own ChatML template, with the refusal as the
  response. AdvBench lines 1–100 stay held out.
- **Benign answers**: the requests of `benign_requests.txt` (64 everyday requests written for this build), each
  answered by SmolLM2-135M-Instruct itself (greedy, `benign_max_new_tokens`), so training on them keeps what the
  model already does for benign requests. They are written beside the adapter as `benign_answers.csv`, the
  original work's CSV format, which serves as the pair's utility set (set difference, perplexity).
- **Training**: PEFT LoRA (r 8, α 16, no dropout) on every attention and MLP projection; AdamW at 2e-4 with
  warm-up and cosine decay; the loss on response tokens only, with EOS (`<|im_end|>`) appended; batches of 8 for
  `epochs` passes; one thread and deterministic algorithms, so the adapter is the same bit for bit on every run.

`python -m safeneurons.demo build-smollm2-safe --align FILE --out DIR` rebuilds it.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safeneurons.data.examples import Example
from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2_safe"
BENIGN_REQUESTS = ASSETS / "benign_requests.txt"
BUILD_FILE = "smollm2_safe_build.json"
BENIGN_ANSWERS = "benign_answers.csv"  # the benign half of the training data: a utility set in the original format
BASE_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class SafeBuild:
    """Everything that decides the adapter's weights."""

    n_harmful: int = 128
    benign_max_new_tokens: int = 96
    lora_r: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 2e-4
    max_length: int = 160
    seed: int = 0
    benign_limit: int | None = None  # the first N benign requests (all by default; tests build on fewer)


def harmful_examples(align_file: str, n: int, seed: int) -> list[Example]:
    """`n` refusals of the align file, each instruction taken out of its Llama-2 `[INST]` prompt."""
    from safeneurons.data.readers import load_examples
    from safeneurons.data.samples import llama2_instruction, select

    chosen = []
    for example in select(load_examples(align_file), n, seed):
        instruction = llama2_instruction(example.prompt)
        if instruction is None or not example.response:
            raise SafeneuronsError(f"{align_file}: a record is not an [INST] … [/INST] prompt with a refusal "
                                   f"({example.prompt[:60]!r}); expected the original work's align format")
        chosen.append(Example(instruction, example.response.strip()))
    return chosen


def own_answers(model: Any, tokenizer: Any, requests: list[str], max_new_tokens: int, desc: str) -> list[Example]:
    """Each request answered by the model itself (greedy, in its chat template)."""
    from safeneurons.data.samples import format_prompt
    from safeneurons.evaluation.generation import Decoding, generate

    answers = generate(model, tokenizer, [format_prompt(tokenizer, request) for request in requests],
                       Decoding(max_new_tokens=max_new_tokens), batch_size=16, desc=desc)
    return [Example(request, texts[0].strip()) for request, texts in zip(requests, answers)]


def benign_examples(model: Any, tokenizer: Any, build: SafeBuild) -> list[Example]:
    """The benign requests answered by the model itself."""
    requests = [line.strip() for line in BENIGN_REQUESTS.read_text().splitlines() if line.strip()]
    return own_answers(model, tokenizer, requests[:build.benign_limit], build.benign_max_new_tokens, "benign answers")


def write_original_format(examples: list[Example], path: Path) -> Path:
    """The examples as the original work's CSV (`,prompt,response,text`, Llama-2 `[INST]` prompts), which every
    data option reads (a ChatML model gets them back in its own template)."""
    import csv

    from safeneurons.data.examples import LLAMA2_PROMPT

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "prompt", "response", "text"])
        for index, example in enumerate(examples):
            prompt, response = LLAMA2_PROMPT.format(instruction=example.prompt), " " + example.response
            writer.writerow([index, prompt, response, prompt + " " + response])
    return path


def train_adapter(model: Any, tokenizer: Any, examples: list[Example], build: SafeBuild) -> tuple[Any, list[float]]:
    """The LoRA-wrapped model trained on `examples`; its losses."""
    import torch
    from peft import LoraConfig, get_peft_model

    from safeneurons.data.samples import build_samples
    from safeneurons.demo.build import cosine_with_warmup, train_on_samples

    lora = LoraConfig(r=build.lora_r, lora_alpha=build.lora_alpha, lora_dropout=0.0,
                      target_modules=list(build.targets), task_type="CAUSAL_LM")
    torch.manual_seed(build.seed)  # PEFT draws lora_A's initial values from the global generator
    wrapped = get_peft_model(model, lora)
    samples = build_samples(examples, tokenizer, None, build.seed, build.max_length, add_eos=True)
    steps = math.ceil(build.epochs * len(samples) / build.batch_size)
    losses = train_on_samples(wrapped, samples.__getitem__, len(samples), tokenizer.pad_token_id, steps,
                              build.batch_size, build.learning_rate, cosine_with_warmup(steps), build.seed,
                              "smollm2-safe", 5)
    return wrapped, losses


def build_smollm2_safe(align_file: str, out: str | Path, build: SafeBuild = SafeBuild()) -> Path:
    """Train the adapter on `align_file` and SmolLM2's own benign answers; write PEFT's adapter files and the
    build's record into `out` (staged, one rename)."""
    from safeneurons.demo.build import repeatable
    from safeneurons.models.gguf import GGUF_ALIASES, file_digest, gguf_file_of
    from safeneurons.models.loading import load_model_and_tokenizer
    from safeneurons.runtime.outputs import staged

    if not Path(align_file).is_file():
        raise SafeneuronsError(f"--align {align_file}: no such file (the original work's align CSV)")
    harmful = harmful_examples(align_file, build.n_harmful, build.seed)
    started = time.time()
    with repeatable():
        model, tokenizer = load_model_and_tokenizer(BASE_MODEL)
        benign = benign_examples(model, tokenizer, build)
        wrapped, losses = train_adapter(model, tokenizer, harmful + benign, build)
    wrapped.peft_config["default"].base_model_name_or_path = BASE_MODEL  # the alias, not this machine's cache
    with staged(out) as staging:
        wrapped.save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        write_original_format(benign, staging / BENIGN_ANSWERS)
        (staging / BUILD_FILE).write_text(json.dumps({
            "build": asdict(build), "base_model": GGUF_ALIASES[BASE_MODEL][1],
            "base_sha256": file_digest(gguf_file_of(BASE_MODEL)), "align_file": Path(align_file).name,
            "align_sha256": file_digest(Path(align_file)), "n_harmful": len(harmful), "n_benign": len(benign),
            "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": round(time.time() - started, 1)}, indent=2) + "\n")
    return Path(out)
