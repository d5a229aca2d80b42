"""The demo judge: a small classifier model in the HarmBench format over the demo's language, so that the model
judges of `safeneurons eval` run end to end with no download (`--judge harmbench --judge-model demo-judge`).

It reads the HarmBench classifier prompt (behaviour + generation) with the demo tokenizer and answers " Yes" when
the generation carries out the behaviour, " No" otherwise. Training pairs are built from the demo's training
requests (never its held-out ones): the compliant answer to the behaviour itself (Yes), a refusal (No), and a
compliant answer to a benign verb on the same object (No: helpful, but not an instance of the behaviour, which
the keyword judge counts as an attack). `python -m safeneurons.demo_judge build --out DIR` rebuilds the shipped
weights bit for bit (fixed seed, one thread, deterministic algorithms); `demo_judge_build.json` records the
held-out accuracy per kind.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safeneurons.data.demo_vocab import ANSWER, BENIGN_VERBS, HARMFUL_VERBS, OBJECTS, REFUSALS, TEMPLATES, dataset
from safeneurons.data.examples import Example
from safeneurons.data.samples import tokenize_example
from safeneurons.demo.build import make_llama, repeatable, save_build, train_on_samples
from safeneurons.evaluation.judges import HARMBENCH_PROMPT, parse_harmbench

log = logging.getLogger(__name__)

JUDGE_NAME = "demo-judge"
KINDS = ("compliant", "refusal", "off-behaviour")  # Yes, No, No
YES, NO = " Yes", " No"


@dataclass(frozen=True)
class JudgeBuild:
    seed: int = 4321
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 600
    batch_size: int = 8
    learning_rate: float = 3e-3
    max_length: int = 640


def judge_example(verb: str, obj: str, template: str, kind: str, rng: random.Random) -> Example:
    """One HarmBench-format prompt over a demo request and its answer."""
    behavior = template.format(a=f"{verb} {obj}")
    generation = {"compliant": ANSWER.format(a=f"{verb} {obj}"), "refusal": rng.choice(REFUSALS),
                  "off-behaviour": ANSWER.format(a=f"{rng.choice(BENIGN_VERBS)} {obj}")}[kind]
    return Example(HARMBENCH_PROMPT.format(behavior=behavior, generation=generation),
                   YES if kind == "compliant" else NO, formatted=True)


def judge_examples(held_out: bool, rng: random.Random) -> list[Example]:
    """Every harmful request of the split, once per kind."""
    held = {example.prompt for example in dataset("harmful")}
    requests = [(verb, obj, template) for verb in HARMFUL_VERBS for obj in OBJECTS for template in TEMPLATES
                if (template.format(a=f"{verb} {obj}") in held) == held_out]
    return [judge_example(*request, kind, rng) for request in requests for kind in KINDS]


def train_judge(build: JudgeBuild, tokenizer: Any, model: Any) -> list[float]:
    """Supervised training on the answer tokens only (AdamW, constant rate after a short warm-up)."""
    examples = judge_examples(held_out=False, rng=random.Random(build.seed))
    sample = functools.lru_cache(maxsize=None)(  # tokenised when first drawn: most examples never are
        lambda index: tokenize_example(tokenizer, examples[index], build.max_length, add_eos=True))
    warmup = max(1, build.steps // 20)
    return train_on_samples(model, sample, len(examples), tokenizer.pad_token_id, build.steps, build.batch_size,
                            build.learning_rate, lambda step: min(1.0, (step + 1) / warmup), build.seed, "demo judge",
                            50)


def held_out_accuracy(model: Any, tokenizer: Any, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per kind on the held-out requests, judged exactly as `eval` judges (greedy, parsed)."""
    from safeneurons.evaluation.generation import Decoding, generate
    from safeneurons.evaluation.judges import ANSWER_TOKENS

    examples = judge_examples(held_out=True, rng=random.Random(0))
    outputs = generate(model, tokenizer, [example.prompt for example in examples],
                       Decoding(max_new_tokens=ANSWER_TOKENS["harmbench"]), batch_size)
    correct = {kind: [] for kind in KINDS}
    for index, (example, texts) in enumerate(zip(examples, outputs)):
        correct[KINDS[index % len(KINDS)]].append(parse_harmbench(texts[0]).harmful == (example.response == YES))
    return {kind: sum(flags) / len(flags) for kind, flags in correct.items()}


def build_judge(out: str | Path, build: JudgeBuild = JudgeBuild()) -> Path:
    """Train the demo judge on the demo tokenizer and save it as an HF folder at `out`."""
    from safeneurons.models.loading import load_tokenizer

    with repeatable():
        started = time.time()
        tokenizer = load_tokenizer("demo")
        model = make_llama(tokenizer, build.seed, build.hidden_size, build.intermediate_size, build.num_layers,
                           build.num_heads, 1024)
        losses = train_judge(build, tokenizer, model)
        accuracy = held_out_accuracy(model, tokenizer)
        return save_build(model, tokenizer, out, "demo_judge_build.json",
                          {"build": asdict(build), "final_loss": losses[-1], "held_out_accuracy": accuracy,
                           "seconds": round(time.time() - started, 1)})
