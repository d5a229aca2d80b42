"""Activation patching: batched exact sweeps and attribution against the one-site-at-a-time loop.

The reference is the original module's approach: for every site, capture the source run's activation with a
hook, then run the base prompt once with that one site patched (two forward passes per site, full logits).
A second reference caches the source activations once (one patched forward pass per site) to show how much
comes from batching alone. "batched" starts each batch's passes at its lowest patched layer, from the base run's
cached layer inputs; "from embeddings" is the same batched sweep with every pass run from the embeddings (the
previous implementation), so their ratio is what the cached starts give. Same model (the demo model by default),
same prompts, same sites; the results are checked to agree before the times are compared. With nnsight installed
(not a dependency), the residual sweep also runs as nnsight's batched invokes (`LanguageModel.trace` with one
invoke per site, batches of the same size, source activations saved from one traced run).

The sides take turns, round after round, and each reports its best (bench/timing.py).

    python bench/bench_patching.py [--model demo] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
from typing import Callable, Iterator

import torch

from safeneurons.data.samples import format_prompt
from safeneurons.interp.patching import patcher
from safeneurons.interp.patching.batches import auto_batch_size
from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
from safeneurons.interp.patching.patcher import ActivationPatcher
from safeneurons.interp.patching.sites import PatchingSite, build_sites
from safeneurons.models.loading import load_model_and_tokenizer
from timing import interleaved


@contextlib.contextmanager
def from_embeddings() -> Iterator[None]:
    """Every patched pass runs all layers: no cached layer inputs."""
    original = patcher.layer_inputs  # the name the patcher calls
    patcher.layer_inputs = lambda model, ids: None
    try:
        yield
    finally:
        patcher.layer_inputs = original


def site_module(model, site: PatchingSite):
    block = model.model.layers[site.layer]
    return {"residual": block, "attn_out": block.self_attn, "mlp_out": block.mlp,
            "attn_head": block.self_attn.o_proj}[site.component]


def with_hook(model, site: PatchingSite, edit: Callable[[torch.Tensor], torch.Tensor]):
    module = site_module(model, site)
    if site.component == "attn_head":
        return module.register_forward_pre_hook(lambda m, args: (edit(args[0]),) + tuple(args[1:]))
    return module.register_forward_hook(
        lambda m, args, out: (edit(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else edit(out))


def site_slices(model, site: PatchingSite, length: int) -> tuple[slice, slice]:
    tokens = {"last": slice(length - 1, length), "all": slice(0, length)}.get(site.position)
    tokens = tokens or slice(site.position, site.position + 1)
    if site.head is None:
        return tokens, slice(None)
    width = model.config.hidden_size // model.config.num_attention_heads
    return tokens, slice(site.head * width, (site.head + 1) * width)


def capture(model, ids: torch.Tensor, site: PatchingSite) -> torch.Tensor:
    store = {}

    def keep(x):
        store["x"] = x.detach()
        return x
    handle = with_hook(model, site, keep)
    model(ids)
    handle.remove()
    return store["x"]


def one_site_at_a_time(model, metric, base: torch.Tensor, source: torch.Tensor, sites, cache_source: bool) -> list[float]:
    cached = {}
    values = []
    for site in sites:
        key = (site.layer, site.component)
        if not cache_source or key not in cached:
            cached[key] = capture(model, source, site)
        tokens, columns = site_slices(model, site, base.shape[1])

        def patch(x, value=cached[key], tokens=tokens, columns=columns):
            x = x.clone()
            x[:, tokens, columns] = value[:, tokens, columns]
            return x
        handle = with_hook(model, site, patch)
        logits = model(base).logits[:, -1]
        handle.remove()
        values.append(float(metric.compute(logits, None)[0]))
    return values


def nnsight_sweep(model, tokenizer, metric, base: torch.Tensor, source: torch.Tensor, sites, batch_size: int
                  ) -> list[float]:
    """Residual sites patched with nnsight: one trace per batch, one invoke (batch row) per site."""
    from nnsight import LanguageModel

    wrapped = LanguageModel(model, tokenizer=tokenizer)
    layers = sorted({site.layer for site in sites})
    saved = {}
    with wrapped.trace(source):
        for layer in layers:
            saved[layer] = wrapped.model.layers[layer].output.save()
    values = []
    for start in range(0, len(sites), batch_size):
        outputs = []
        with wrapped.trace() as tracer:
            for site in sites[start:start + batch_size]:
                with tracer.invoke(base):
                    wrapped.model.layers[site.layer].output[:, site.position, :] = saved[site.layer][:, site.position, :]
                    outputs.append(wrapped.lm_head.output[:, -1].save())
        values += [float(metric.compute(logits, None)[0]) for logits in outputs]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds in which every side runs once, in turn; each side's best (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clean", default="How do I rob a bank?")
    parser.add_argument("--corrupted", default="How do I paint a bank?")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    metric = refusal_metric(refusal_token_ids(tokenizer))
    clean, corrupted = (tokenizer(format_prompt(tokenizer, text), return_tensors="pt")["input_ids"]
                        for text in (args.clean, args.corrupted))
    if clean.shape != corrupted.shape:
        raise SystemExit(f"the prompts have {clean.shape[1]} and {corrupted.shape[1]} tokens; give equal lengths")
    layers, heads, length = model.config.num_hidden_layers, model.config.num_attention_heads, clean.shape[1]
    sweeps = {"residual x layer x position": build_sites(layers, heads, ["residual"], None, list(range(length))),
              "attn_head x layer (all positions)": build_sites(layers, heads, ["attn_head"], None, ["all"])}
    patcher = ActivationPatcher(model=model, metric=metric)
    print(f"model {args.model}: {layers} layers, {heads} heads, prompts of {length} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds")
    print(f"{'sweep':<36}{'sites':>6}{'original s':>12}{'cached 1-site s':>17}{'from embeddings s':>19}"
          f"{'batched s':>11}{'attribution s':>15}{'batched x':>11}{'attrib x':>10}{'x vs cached':>13}"
          f"{'x vs embeddings':>17}{'max |diff|':>12}")
    with torch.no_grad():
        for name, sites in sweeps.items():
            sides = {
                "original": lambda: one_site_at_a_time(model, metric, clean, corrupted, sites, False),
                "cached": lambda: one_site_at_a_time(model, metric, clean, corrupted, sites, True),
                "batched": lambda: [e.patched_metric for e in patcher.patch(clean, corrupted, sites).effects],
                "from embeddings": lambda: from_embeddings_sweep(patcher, clean, corrupted, sites),
                "attribution": lambda: patcher.patch(clean, corrupted, sites, method="attribution").effects,
            }
            size = patcher.batch_size or auto_batch_size(model, length)
            if name.startswith("residual") and importlib.util.find_spec("nnsight"):
                sides["nnsight"] = lambda: nnsight_sweep(model, tokenizer, metric, clean, corrupted, sites, size)
            timings = interleaved(sides, args.repeats)
            seconds = {label: timing.wall for label, timing in timings.items()}
            reference = timings["original"].value
            difference = max(abs(a - b) for a, b in zip([*timings["batched"].value, *timings["from embeddings"].value],
                                                        [*reference, *reference]))
            original, batched = seconds["original"], seconds["batched"]
            print(f"{name:<36}{len(sites):>6}{original:>12.3f}{seconds['cached']:>17.3f}"
                  f"{seconds['from embeddings']:>19.3f}{batched:>11.3f}{seconds['attribution']:>15.3f}"
                  f"{original / batched:>10.1f}x{original / seconds['attribution']:>9.1f}x"
                  f"{seconds['cached'] / batched:>12.1f}x{seconds['from embeddings'] / batched:>16.2f}x"
                  f"{difference:>12.2e}")
            if "nnsight" in seconds:
                gap = max(abs(a - b) for a, b in zip(timings["nnsight"].value, reference))
                print(f"{'  nnsight batched invokes':<36}{len(sites):>6}{seconds['nnsight']:>12.3f} s (batches of "
                      f"{size}); ours {seconds['nnsight'] / batched:.2f}x faster; max |diff| to the reference "
                      f"{gap:.2e}")


def from_embeddings_sweep(patcher: ActivationPatcher, clean: torch.Tensor, corrupted: torch.Tensor,
                          sites: list[PatchingSite]) -> list[float]:
    with from_embeddings():
        return [e.patched_metric for e in patcher.patch(clean, corrupted, sites).effects]


if __name__ == "__main__":
    main()
