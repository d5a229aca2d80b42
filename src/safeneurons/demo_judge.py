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

import argparse
import functools
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .data import Example, pad_batch, tokenize_example
from .demo import ANSWER, BENIGN_VERBS, HARMFUL_VERBS, OBJECTS, REFUSALS, TEMPLATES, dataset
from .judges import HARMBENCH_PROMPT, parse_harmbench

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


def make_judge_model(build: JudgeBuild, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=build.hidden_size,
                         intermediate_size=build.intermediate_size, num_hidden_layers=build.num_layers,
                         num_attention_heads=build.num_heads, num_key_value_heads=build.num_heads,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(build.seed)
    return LlamaForCausalLM(config)


def train_judge(build: JudgeBuild, tokenizer: Any, model: Any) -> list[float]:
    """Supervised training on the answer tokens only (AdamW, constant rate after a short warm-up)."""
    examples = judge_examples(held_out=False, rng=random.Random(build.seed))
    sample = functools.lru_cache(maxsize=None)(  # tokenised when first drawn: most examples never are
        lambda index: tokenize_example(tokenizer, examples[index], build.max_length, add_eos=True))
    generator = torch.Generator().manual_seed(build.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.learning_rate, weight_decay=0.01)
    warmup = max(1, build.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    model.train()
    for step in range(build.steps):
        indices = torch.randint(len(examples), (build.batch_size,), generator=generator).tolist()
        loss = model(**pad_batch([sample(index) for index in indices], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == build.steps - 1:
            log.info("demo judge step %d/%d loss %.4f", step, build.steps, loss.item())
    model.eval()
    return losses


def held_out_accuracy(model: Any, tokenizer: Any, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per kind on the held-out requests, judged exactly as `eval` judges (greedy, parsed)."""
    from .evaluate import Decoding, generate
    from .judges import ANSWER_TOKENS

    examples = judge_examples(held_out=True, rng=random.Random(0))
    outputs = generate(model, tokenizer, [example.prompt for example in examples],
                       Decoding(max_new_tokens=ANSWER_TOKENS["harmbench"]), batch_size)
    correct = {kind: [] for kind in KINDS}
    for index, (example, texts) in enumerate(zip(examples, outputs)):
        correct[KINDS[index % len(KINDS)]].append(parse_harmbench(texts[0]).harmful == (example.response == YES))
    return {kind: sum(flags) / len(flags) for kind, flags in correct.items()}


def build_judge(out: str | Path, build: JudgeBuild = JudgeBuild()) -> Path:
    """Train the demo judge on the demo tokenizer and save it as an HF folder at `out`."""
    from .models import load_tokenizer

    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread split; one thread makes the build repeatable
    try:
        started = time.time()
        tokenizer = load_tokenizer("demo")
        model = make_judge_model(build, tokenizer)
        losses = train_judge(build, tokenizer, model)
        accuracy = held_out_accuracy(model, tokenizer)
        out = Path(out)
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "demo_judge_build.json").write_text(json.dumps(
            {"build": asdict(build), "final_loss": losses[-1], "held_out_accuracy": accuracy,
             "seconds": round(time.time() - started, 1)}, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m safeneurons.demo_judge", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=JudgeBuild.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(build_judge(args.out, JudgeBuild(steps=args.steps)))


if __name__ == "__main__":
    main()
