"""The causal experiments: prune (zero exactly the masked elements), rewind (the original's values exactly where
masked), ActSVD (`lowrank`) against a reference written here (full SVD of A = X Wᵀ), their bad-input errors, and
2 ranks under ZeRO-3 equal to 1 rank."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, make_tiny_llama, run_ranks
from safeneurons import cli
from safeneurons.data.samples import load_samples
from safeneurons.interventions.lowrank import LowRankConfig, low_rank_model, top_output_directions
from safeneurons.interventions.prune import prune_model
from safeneurons.masks.io import save_masks

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def random_masks(model, seed: int = 0, fraction: float = 0.2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(param.shape, generator=generator) < fraction
            for name, param in model.named_parameters() if "proj" in name}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor.view(torch.int16)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, demo_tokenizer):
    folder = tmp_path_factory.mktemp("causal") / "tiny"
    model = make_tiny_llama(demo_tokenizer, seed=21)
    model.save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    masks = random_masks(model)
    save_masks(masks, folder.parent / "masks")
    return folder, folder.parent / "masks", masks


def assert_pruned(original: dict, pruned: dict, masks: dict) -> None:
    for name, tensor in original.items():
        if name in masks:
            assert (pruned[name][masks[name]] == 0).all(), name
            assert torch.equal(bits(pruned[name][~masks[name]]), bits(tensor[~masks[name]])), name
        else:
            assert torch.equal(bits(pruned[name]), bits(tensor)), name


# ---------------------------------------------------------------- prune

def test_prune_zeroes_exactly_the_masked_elements(demo_tokenizer):
    model = make_tiny_llama(demo_tokenizer, seed=3)
    masks = random_masks(model, seed=1)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    summary = prune_model(model, masks)
    assert summary.pruned == sum(int(mask.sum()) for mask in masks.values())
    assert_pruned(original, {name: param.detach() for name, param in model.named_parameters()}, masks)


def test_prune_lowest_zeroes_exactly_what_the_mask_does_not_select(tiny_dir, tmp_path):
    model, masks_dir, masks = tiny_dir
    assert cli.main(["prune", "--model", str(model), "--masks", str(masks_dir), "--lowest", "--out",
                     str(tmp_path / "low")]) == 0
    original, pruned = load_file(str(model / "model.safetensors")), load_file(str(tmp_path / "low" /
                                                                                  "model.safetensors"))
    assert_pruned(original, pruned, {name: ~mask for name, mask in masks.items()})


@pytest.mark.slow
@pytest.mark.distributed
def test_prune_cli_one_rank_and_two_ranks_zero3(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, masks_dir, masks = tiny_dir
    assert cli.main(["prune", "--model", str(model), "--masks", str(masks_dir), "--out", str(tmp_path / "one")]) == 0
    result = run_ranks(["safeneurons.cli", "prune", "--model", str(model), "--masks", str(masks_dir),
                        "--deepspeed", str(REPO / "ds_configs" / "zero3_inference.json"),
                        "--out", str(tmp_path / "two")])
    low = run_ranks(["safeneurons.cli", "prune", "--model", str(model), "--masks", str(masks_dir), "--lowest",
                     "--deepspeed", str(REPO / "ds_configs" / "zero3_inference.json"), "--out", str(tmp_path / "low")])
    assert low.returncode == 0, low.stderr[-3000:]
    assert_pruned(load_file(str(model / "model.safetensors")), load_file(str(tmp_path / "low" / "model.safetensors")),
                  {name: ~mask for name, mask in masks.items()})
    assert result.returncode == 0, result.stderr[-3000:]
    original = load_file(str(model / "model.safetensors"))
    one, two = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    assert_pruned(original, one, masks)
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    summary = json.loads((tmp_path / "two" / "prune_summary.json").read_text())
    assert summary["pruned"] == sum(int(mask.sum()) for mask in masks.values()) and summary["world_size"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight.detach(), one["model.layers.1.mlp.up_proj.weight"])


# ---------------------------------------------------------------- rewind

def test_rewind_sets_back_exactly_the_masked_elements(tiny_dir, tmp_path, demo_tokenizer):
    model, masks_dir, masks = tiny_dir
    tuned = make_tiny_llama(demo_tokenizer, seed=21)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.01 * torch.randn_like(param))
    tuned.save_pretrained(tmp_path / "tuned")
    demo_tokenizer.save_pretrained(tmp_path / "tuned")
    assert cli.main(["rewind", "--original", str(model), "--finetuned", str(tmp_path / "tuned"),
                     "--masks", str(masks_dir), "--out", str(tmp_path / "rewound")]) == 0
    original, finetuned = load_file(str(model / "model.safetensors")), load_file(str(tmp_path / "tuned" /
                                                                                      "model.safetensors"))
    rewound = load_file(str(tmp_path / "rewound" / "model.safetensors"))
    assert rewound.keys() == finetuned.keys()
    for name, tensor in finetuned.items():
        expected = torch.where(masks[name], original[name], tensor) if name in masks else tensor
        assert torch.equal(bits(rewound[name]), bits(expected)), name
    summary = json.loads((tmp_path / "rewound" / "rewind_summary.json").read_text())
    assert summary["rewound"] == sum(int(mask.sum()) for mask in masks.values())
    assert (tmp_path / "rewound" / "config.json").is_file() and (tmp_path / "rewound" / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", ["architecture", "mask_shape", "out_is_file", "rank_too_large", "rank_negative",
                                  "prune_mask_name"])
def test_causal_stages_bad_input_is_one_line_before_any_compute(tiny_dir, tmp_path, demo_tokenizer, capsys, case):
    model, masks_dir, _ = tiny_dir
    out = tmp_path / "out"
    if case == "architecture":
        other = make_tiny_llama(demo_tokenizer, seed=1, layers=3)
        other.save_pretrained(tmp_path / "other")
        args, message = ["rewind", "--original", str(model), "--finetuned", str(tmp_path / "other"),
                         "--masks", str(masks_dir)], "which --original does not"
    elif case == "mask_shape":
        save_masks({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "bad")
        args, message = ["rewind", "--original", str(model), "--finetuned", str(model), "--masks",
                         str(tmp_path / "bad")], "has shape (3, 3)"
    elif case == "out_is_file":
        out.write_text("keep me")
        args, message = ["prune", "--model", str(model), "--masks", str(masks_dir)], "is an existing file"
    elif case == "prune_mask_name":
        save_masks({"model.layers.9.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "bad")
        args, message = ["prune", "--model", str(model), "--masks", str(tmp_path / "bad")], "names no parameter"
    else:
        rank = "32" if case == "rank_too_large" else "-1"  # the tiny model's smallest Linear is 32 x 32
        args, message = ["lowrank", "--model", str(model), "--data", "demo-align", "--rank-safety", rank], \
            "must lie in [0, 31]"
    capsys.readouterr()  # the set-up's own progress bars
    assert cli.main([*args, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert out.read_text() == "keep me" if case == "out_is_file" else not out.exists()


# ---------------------------------------------------------------- ActSVD

def reference_inputs(model, samples) -> dict[str, torch.Tensor]:
    """X of every scored Linear: its inputs on the response tokens of every sample, stacked (float64)."""
    rows: dict[str, list[torch.Tensor]] = {}
    for sample in samples:
        handles = []
        for layer, block in enumerate(model.model.layers):
            for name in PROJECTIONS:
                key = f"model.layers.{layer}.{name}.weight"
                handles.append(block.get_submodule(name).register_forward_hook(
                    lambda m, a, o, key=key, keep=sample.labels != -100: rows.setdefault(key, []).append(
                        a[0][0][keep].double())))
        with torch.no_grad():
            model(sample.input_ids[None])
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in rows.items()}


def reference_top_vectors(x: torch.Tensor, weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` right singular vectors of A = X Wᵀ by a full SVD."""
    _, _, vh = torch.linalg.svd(x @ weight.double().T, full_matrices=False)
    return vh[:rank].T


@pytest.fixture(scope="module")
def actsvd_setup(demo_tokenizer):
    model = make_tiny_llama(demo_tokenizer, seed=8)
    safety = load_samples("demo-align", demo_tokenizer, 6, 0, 48)
    utility = load_samples("demo-utility", demo_tokenizer, 6, 0, 48)
    return model, reference_inputs(model, safety), reference_inputs(model, utility)


def lowrank_copy(model, demo_tokenizer, **options):
    import copy

    modified = copy.deepcopy(model)
    config = LowRankConfig(data="demo-align", nsamples=6, max_length=48, **options)
    low_rank_model(modified, demo_tokenizer, config)
    return {name: param.detach() for name, param in modified.named_parameters()}


def test_actsvd_equals_the_full_svd_reference(actsvd_setup, demo_tokenizer):
    model, safety_x, utility_x = actsvd_setup
    r_s, r_u = 3, 8
    ours = lowrank_copy(model, demo_tokenizer, rank_safety=r_s, rank_utility=r_u, utility_data="demo-utility")
    plain = lowrank_copy(model, demo_tokenizer, rank_safety=r_s)
    for name, weight in model.named_parameters():
        if name not in safety_x:
            assert torch.equal(ours[name], weight.detach()), name  # embeddings, norms, lm_head untouched
            continue
        w = weight.detach().double()
        v_s, v_u = reference_top_vectors(safety_x[name], w, r_s), reference_top_vectors(utility_x[name], w, r_u)
        p_s, p_u = v_s @ v_s.T, v_u @ v_u.T
        identity = torch.eye(w.shape[0], dtype=torch.float64)
        torch.testing.assert_close(ours[name].double(), w - (identity - p_u) @ p_s @ w, atol=2e-6, rtol=0)
        torch.testing.assert_close(plain[name].double(), w - p_s @ w, atol=2e-6, rtol=0)


def test_actsvd_properties(actsvd_setup, demo_tokenizer):
    model, safety_x, _ = actsvd_setup
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name].detach()
    gram = safety_x[name].T @ safety_x[name]
    for niter in (None, 4):
        v = top_output_directions(weight, gram, 5, niter)
        projector = v @ v.T
        torch.testing.assert_close(projector @ projector, projector, atol=1e-8, rtol=0)  # idempotent
    unchanged = lowrank_copy(model, demo_tokenizer, rank_safety=0, rank_utility=4, utility_data="demo-utility")
    assert all(torch.equal(unchanged[n], p.detach()) for n, p in model.named_parameters())  # r_s = 0: no change
    r = 4
    plain = lowrank_copy(model, demo_tokenizer, rank_safety=r)
    before = torch.linalg.svdvals(safety_x[name] @ weight.double().T)
    after = torch.linalg.svdvals(safety_x[name] @ plain[name].double().T)
    # exactly the top r directions of the layer's output on the data are gone, the rest are kept
    torch.testing.assert_close(after[:len(before) - r], before[r:], atol=1e-5, rtol=1e-5)
    assert after[len(before) - r:].abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_lowrank_two_ranks_zero3_equal_one_rank(tiny_dir, tmp_path):
    model, _, _ = tiny_dir
    args = ["lowrank", "--model", str(model), "--data", "demo-align", "--utility-data", "demo-utility",
            "--rank-safety", "3", "--rank-utility", "8", "--nsamples", "6", "--max-length", "48"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    result = run_ranks(["safeneurons.cli", *args, "--deepspeed", str(REPO / "ds_configs" / "zero3_inference.json"),
                        "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0)
    summary = json.loads((tmp_path / "two" / "lowrank_summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["per_linear"]) == 14
