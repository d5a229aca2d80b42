"""The freezing mechanism, single process: frozen elements bit-identical, free ones trained exactly as if the
frozen ones were constants, and the control showing that zeroing gradients alone does not freeze anything."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call

from helpers import make_tiny_llama
from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.freezing import freeze
from safeneurons.masks.bits import pack_bits, unpack_bits
from safeneurons.masks.io import save_masks

WEIGHT_DECAY = 0.1
LEARNING_RATE = 1e-2
STEPS = 3
ACCUMULATION = 2
MAX_GRAD_NORM = 0.5


def random_masks(model: torch.nn.Module, seed: int = 1, density: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(param.shape, generator=generator) < density
            for name, param in model.named_parameters() if "proj" in name or name == "model.norm.weight"}


def micro_batches(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (2, 12), generator=generator) for _ in range(STEPS * ACCUMULATION)]


def train(model: torch.nn.Module, batches: list[torch.Tensor], on_optimizer=None, forward=None) -> None:
    """AdamW (weight decay 0.1), gradient accumulation and clipping: the loop every test below runs."""
    parameters = [param for param in model.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    forward = forward or (lambda ids: model(input_ids=ids, labels=ids).loss)
    for index, ids in enumerate(batches):
        (forward(ids) / ACCUMULATION).backward()
        if (index + 1) % ACCUMULATION == 0:
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def tiny(demo_tokenizer):
    return make_tiny_llama(demo_tokenizer, seed=3).train()


def test_pack_bits_matches_numpy_and_round_trips():
    mask = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.4
    packed = pack_bits(mask)
    assert packed.numpy().tobytes() == np.packbits(mask.numpy()).tobytes()
    assert torch.equal(unpack_bits(packed, mask.numel()), mask)


def test_frozen_elements_stay_bit_identical_and_free_ones_train(tiny, demo_tokenizer):
    masks = random_masks(tiny)
    before = {name: param.detach().clone() for name, param in tiny.named_parameters()}
    frozen = freeze(tiny, masks)
    train(tiny, micro_batches(len(demo_tokenizer)), on_optimizer=frozen.attach)
    for name, param in tiny.named_parameters():
        if name in masks:
            assert torch.equal(param[masks[name]], before[name][masks[name]]), name
            assert not torch.equal(param[~masks[name]], before[name][~masks[name]]), name
    assert frozen.frozen_count() == sum(int(mask.sum()) for mask in masks.values())
    assert frozen.max_drift() == 0.0


def test_zeroing_gradients_alone_does_not_freeze(tiny, demo_tokenizer):
    """The control: the same loop with only the masked gradients zeroed moves the masked weights (weight decay
    and the Adam moments), so the test above can fail."""
    masks = random_masks(tiny)
    before = {name: param.detach().clone() for name, param in tiny.named_parameters()}
    for name, param in tiny.named_parameters():
        if name in masks:
            param.register_hook(lambda grad, mask=masks[name]: grad.masked_fill(mask, 0))
    train(tiny, micro_batches(len(demo_tokenizer)))
    moved = [name for name, param in tiny.named_parameters()
             if name in masks and not torch.equal(param[masks[name]], before[name][masks[name]])]
    assert moved == sorted(masks, key=list(before).index)


def test_free_elements_train_exactly_as_with_constant_frozen_weights(tiny, demo_tokenizer):
    """Independent reference: the weights are `where(mask, original, free)` with only `free` trained; the free
    elements must come out bit for bit the same as ours (same loss, gradients, clipping norm and AdamW update)."""
    masks = random_masks(tiny)
    reference_model = copy.deepcopy(tiny)
    originals = {name: param.detach().clone() for name, param in tiny.named_parameters()}
    batches = micro_batches(len(demo_tokenizer))

    frozen = freeze(tiny, masks)
    train(tiny, batches, on_optimizer=frozen.attach)

    free = dict(reference_model.named_parameters())

    def forward(ids: torch.Tensor) -> torch.Tensor:
        weights = {name: torch.where(masks[name], originals[name], param) if name in masks else param
                   for name, param in free.items()}
        return functional_call(reference_model, weights, kwargs={"input_ids": ids, "labels": ids}).loss

    train(reference_model, batches, forward=forward)
    for name, param in tiny.named_parameters():
        mask = masks.get(name, torch.zeros_like(param, dtype=torch.bool))
        assert torch.equal(param[~mask], free[name].detach()[~mask]), name


def test_bfloat16_frozen_elements_bit_identical(demo_tokenizer):
    model = make_tiny_llama(demo_tokenizer, seed=4).to(torch.bfloat16).train()
    masks = random_masks(model, seed=2)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    frozen = freeze(model, masks)
    train(model, micro_batches(len(demo_tokenizer)), on_optimizer=frozen.attach)
    for name, param in model.named_parameters():
        if name in masks:
            assert param.dtype == torch.bfloat16
            assert torch.equal(param[masks[name]].view(torch.int16), before[name][masks[name]].view(torch.int16))
            assert not torch.equal(param[~masks[name]], before[name][~masks[name]])


def test_mask_file_is_read_like_the_dict(tiny, tmp_path):
    masks = random_masks(tiny)
    save_masks(masks, tmp_path)
    from_file, from_dict = freeze(tiny, tmp_path), freeze(tiny, masks)
    for name in masks:
        assert torch.equal(from_file.slices[name].mask().view(masks[name].shape), masks[name])
        assert torch.equal(from_file.slices[name].values, from_dict.slices[name].values)
    assert from_file.mask_bytes == sum(-(-mask.numel() // 8) for mask in masks.values())


def test_bad_masks_name_the_first_bad_parameter(tiny):
    good = random_masks(tiny)
    renamed = {"model.layers.0.mlp.up_proj.weight": good["model.layers.0.mlp.up_proj.weight"],
               "model.layers.9.self_attn.q_proj.weight": torch.zeros(32, 32, dtype=torch.bool),
               "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3, dtype=torch.bool)}
    with pytest.raises(SafeneuronsError, match=r"model\.layers\.9\.self_attn\.q_proj\.weight"):
        freeze(tiny, renamed)
    reshaped = {"model.layers.0.mlp.up_proj.weight": good["model.layers.0.mlp.up_proj.weight"],
                "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 32, dtype=torch.bool)}
    with pytest.raises(SafeneuronsError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(64, 32\)"):
        freeze(tiny, reshaped)
