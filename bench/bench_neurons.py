"""Dynamic neuron patching on the demo pair: what patching costs next to plain generation, and ours (the source
model on its own KV cache, one new token per step) against the cache-free reference loop (both models re-run on
the whole prefix at every step). demo-chat's MLP neurons all take demo-base's values; greedy, stopping at EOS.
Prints the timings, the ratios and whether the texts agree; the sides take turns, best of --repeats rounds."""
from __future__ import annotations

import argparse

import torch

from safeneurons.data.samples import load_prompts
from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.interventions.neuron_patching import patched_neurons
from safeneurons.models.loading import load_model_and_tokenizer
from timing import interleaved


def cache_free(model, source, tokenizer, prompt: str, neurons: dict[int, list[int]], steps: int) -> str:
    """The reference: every step both models read the whole prefix; `model`'s neurons take `source`'s values."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    kept, handles = {}, []
    for layer, columns in neurons.items():
        index = torch.tensor(columns)
        handles.append(source.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, layer=layer: kept.__setitem__(layer, args[0])))
        handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, layer=layer, index=index: (args[0].index_copy(2, index, kept[layer][..., index]),)))
    with torch.no_grad():
        for _ in range(steps):
            source(ids, use_cache=False)
            token = model(ids, use_cache=False).logits[0, -1].argmax()
            if token.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    for handle in handles:
        handle.remove()
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chat, tokenizer = load_model_and_tokenizer("demo-chat")
    base, _ = load_model_and_tokenizer("demo-base")
    prompts = load_prompts("demo-harmful", tokenizer, args.prompts)
    every = {layer: list(range(chat.config.intermediate_size)) for layer in range(chat.config.num_hidden_layers)}
    decoding = Decoding(args.max_new_tokens)

    def patched(source, batch_size):
        with patched_neurons(chat, source, every):
            return [texts[0] for texts in generate(chat, tokenizer, prompts, decoding, batch_size)]

    sides = interleaved({
        "plain": lambda: [texts[0] for texts in generate(chat, tokenizer, prompts, decoding, 16)],
        "self-patched": lambda: patched(chat, 16),
        "patched": lambda: patched(base, 16),
        "patched, batch 1": lambda: patched(base, 1),
        "cache-free reference": lambda: [cache_free(chat, base, tokenizer, prompt, every, args.max_new_tokens)
                                         for prompt in prompts]}, args.repeats)
    wall = {label: timing.wall for label, timing in sides.items()}
    print(f"{len(prompts)} prompts, at most {args.max_new_tokens} new tokens, every MLP neuron of demo-chat patched")
    print(f"plain {wall['plain']:.2f} s; patched by itself (the same texts: "
          f"{sides['self-patched'].value == sides['plain'].value}) {wall['self-patched']:.2f} s, ratio "
          f"{wall['self-patched'] / wall['plain']:.1f}x")
    print(f"patched from demo-base, batch 16: {wall['patched']:.2f} s; batch 1: {wall['patched, batch 1']:.2f} s; "
          f"cache-free reference (batch 1): {wall['cache-free reference']:.2f} s, ratio "
          f"{wall['cache-free reference'] / wall['patched, batch 1']:.1f}x; the same texts: "
          f"{sides['patched, batch 1'].value == sides['cache-free reference'].value}")


if __name__ == "__main__":
    main()
