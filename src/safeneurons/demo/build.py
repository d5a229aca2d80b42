"""The built-in demo: a small Llama base model and its chat model, made the way real chat models are.

Everything is synthetic and built here, with no download: request templates combine verbs with objects, where
the *verb* decides whether a request is harmful (the same objects appear in both kinds), so the model has to
learn a real harmfulness feature. Held-out prompts are unseen verb × object × template combinations.

- `demo-base` is pretrained on the demo domain and complies with every request, harmful ones included (an
  unaligned base model);
- `demo-chat` (also `demo`) is `demo-base` plus a short safety-alignment fine-tune: harmful requests → refusals,
  benign ones still answered, so alignment is a small late change on top of a capable base (as Llama-2-chat over
  Llama-2).

`python -m safeneurons.demo build --out DIR` rebuilds both (DIR/chat, DIR/base, one shared tokenizer) bit for bit
(fixed seeds, one thread, deterministic algorithms); the package ships the result in `demo/assets/`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from safeneurons.data.demo_vocab import DATASETS, dataset, splits
from safeneurons.data.examples import LLAMA2_PROMPT
from safeneurons.data.samples import build_samples, pad_batch
from safeneurons.errors import SafeneuronsError

if TYPE_CHECKING:
    from safeneurons.data.examples import Example

log = logging.getLogger(__name__)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
                 "{{ message['content'] }} [/INST]{% elif message['role'] == 'assistant' %} "
                 "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@dataclass(frozen=True)
class DemoBuild:
    """Everything that decides the demo model's weights."""

    seed: int = 1234
    vocab_size: int = 768
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 6
    num_heads: int = 4
    steps: int = 600  # pretraining of demo-base
    batch_size: int = 32
    learning_rate: float = 3e-3
    max_length: int = 80
    chat_steps: int = 100  # the safety-alignment fine-tune of demo-chat: a sixth of the pretraining
    chat_learning_rate: float = 1e-3

    base_name = "demo-base"  # (class attributes: names, not settings of the build)
    chat_name = "demo-chat"


def train_tokenizer(build: DemoBuild) -> Any:
    """A byte-level BPE tokenizer trained on the demo texts (any text stays encodable through the bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [example.prompt + (example.response or "") for name in DATASETS for example in dataset(name)]
    texts += [LLAMA2_PROMPT.format(instruction=example.prompt) for name in ("harmful", "harmless")
              for example in dataset(name)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=build.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    bos = backend.token_to_id(SPECIAL_TOKENS["bos_token"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_llama(tokenizer: Any, seed: int, hidden: int, intermediate: int, layers: int, heads: int,
               max_positions: int) -> Any:
    """A randomly initialised Llama over `tokenizer`'s vocabulary (the demo model's and the demo judge's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_model(build: DemoBuild, tokenizer: Any) -> Any:
    return make_llama(tokenizer, build.seed, build.hidden_size, build.intermediate_size, build.num_layers,
                      build.num_heads, 256)


def train_on_samples(model: Any, sample: Callable[[int], Any], n_examples: int, pad_token_id: int, steps: int,
                     batch_size: int, learning_rate: float, rate: Callable[[int], float], seed: int, label: str,
                     log_every: int) -> list[float]:
    """AdamW (weight decay 0.01, clipping 1.0) on batches of `batch_size` examples drawn with `seed`; `sample(i)`
    is example i tokenised; `rate(step)` scales the learning rate. The builds' shared loop."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    losses = []
    model.train()
    for step in range(steps):
        indices = torch.randint(n_examples, (batch_size,), generator=generator).tolist()
        loss = model(**pad_batch([sample(index) for index in indices], pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f", label, step, steps, loss.item())
    model.eval()
    return losses


def cosine_with_warmup(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 20)
    return lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))


def _train_on(examples: list[Example], build: DemoBuild, tokenizer: Any, model: Any, steps: int,
              learning_rate: float, seed: int, label: str) -> list[float]:
    """Supervised fine-tuning on `examples` (response tokens only, EOS appended so the model learns to stop),
    AdamW with warm-up and cosine decay."""
    samples = build_samples(examples, tokenizer, None, seed, build.max_length, add_eos=True)
    return train_on_samples(model, samples.__getitem__, len(samples), tokenizer.pad_token_id, steps,
                            build.batch_size, learning_rate, cosine_with_warmup(steps), seed, label, 100)


def train(build: DemoBuild, tokenizer: Any, model: Any) -> list[float]:
    """demo-base's pretraining: every request of the training split answered, harmful ones included."""
    examples = splits()["comply"] + dataset("utility")
    return _train_on(examples, build, tokenizer, model, build.steps, build.learning_rate, build.seed, "demo-base")


def align(build: DemoBuild, tokenizer: Any, model: Any) -> list[float]:
    """demo-chat's safety alignment of demo-base: harmful requests → refusals, benign ones → answers, in equal
    parts, a short run at a lower learning rate."""
    examples = dataset("align") + dataset("utility")
    return _train_on(examples, build, tokenizer, model, build.chat_steps, build.chat_learning_rate, build.seed + 1,
                     "demo-chat")


@contextlib.contextmanager
def repeatable() -> Iterator[None]:
    """Deterministic algorithms on one thread (float sums depend on the thread split): a build's weights are
    the same bit for bit on every run."""
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def save_build(model: Any, tokenizer: Any, out: str | Path, record_name: str, record: dict) -> Path:
    """The model, tokenizer and the build's record as an HF folder, staged and then moved to `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    balancing = getattr(model.config, "output_router_logits", None)
    if balancing:  # an MoE's load-balancing loss belongs to its build, not its use
        model.config.output_router_logits = False
    model.save_pretrained(tmp, save_original_format=False)  # (an MoE's experts fused, as the model names them)
    if balancing:
        model.config.output_router_logits = balancing
    tokenizer.save_pretrained(tmp)
    (tmp / record_name).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@dataclass(frozen=True)
class DemoPair:
    chat: Path
    base: Path


def build_demo(out: str | Path, build: DemoBuild = DemoBuild(),
               make: Callable[[Any, Any], Any] = make_model) -> DemoPair:
    """Train the demo tokenizer, demo-base (`make(build, tokenizer)`'s random model pretrained) and then demo-chat
    from it; save them as HF folders out/base and out/chat (the same tokenizer in both)."""
    out = Path(out)
    with repeatable():
        started = time.time()
        tokenizer = train_tokenizer(build)
        model = make(build, tokenizer)
        base_losses = train(build, tokenizer, model)
        record = {"build": build.__dict__, "pretraining_final_loss": base_losses[-1]}
        base = save_build(model, tokenizer, out / "base", "demo_build.json",
                          {**record, "model": build.base_name, "seconds": round(time.time() - started, 1)})
        chat_losses = align(build, tokenizer, model)
        chat = save_build(model, tokenizer, out / "chat", "demo_build.json",
                          {**record, "model": build.chat_name, "alignment_final_loss": chat_losses[-1],
                           "seconds": round(time.time() - started, 1)})
    return DemoPair(chat, base)


def export_demo(out: str | Path) -> Path:
    """Copy the shipped demo model and tokenizer to `out` as a plain HF folder (staged, one rename)."""
    from safeneurons.models.loading import demo_model_dir
    from safeneurons.runtime.outputs import check_output_dir, staged

    check_output_dir(out)
    source = demo_model_dir()
    if not (source / "config.json").is_file():
        raise SafeneuronsError(f"the demo model is missing from {source}; rebuild it with "
                               f"`python -m safeneurons.demo build --out {source}`")
    with staged(out) as staging:
        for item in source.iterdir():
            shutil.copy2(item, staging / item.name)
    return Path(out)
