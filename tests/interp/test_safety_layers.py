"""SPPFT's safety layers: the cosine curves against a pairwise loop written here, the layer search on canned gaps,
and the command end to end: its whole-layer masks keep those layers bit-identical through `finetune`."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from helpers import run_expecting_error, weights
from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.safety_layers import locate, similarity_curves


def test_similarity_curves_are_the_mean_pairwise_cosines():
    generator = torch.Generator().manual_seed(0)
    harmless, harmful = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)
    within, mixed = similarity_curves(harmless, harmful)
    cosine = torch.nn.functional.cosine_similarity
    for layer in range(3):
        pairs = [float(cosine(harmless[layer, i], harmless[layer, j], dim=0))
                 for i, j in itertools.combinations(range(5), 2)]
        crossed = [float(cosine(harmless[layer, i], harmful[layer, j], dim=0)) for i in range(5) for j in range(4)]
        assert within[layer] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
        assert mixed[layer] == pytest.approx(sum(crossed) / len(crossed), abs=1e-6)


@pytest.mark.parametrize("gap, onset, expected", [
    ([0.0, 0.01, 0.2, 0.5, 0.8, 0.7, 0.9], 0.1, (2, 4)),  # onset at 0.09, then the first peak (not the largest)
    ([0.0, 0.01, 0.2, 0.5, 0.8, 0.7, 0.9], 0.5, (3, 4)),
    ([0.1, 0.2, 0.3], 0.1, (0, 2)),  # rising to the last layer
    ([-0.1, 0.3, 0.3, 0.1], 0.5, (1, 1)),  # a plateau ends the rise
])
def test_locate_finds_the_onset_and_the_first_peak(gap, onset, expected):
    assert locate(gap, onset) == expected


def test_locate_refuses_curves_without_a_gap():
    with pytest.raises(SafeneuronsError, match="no safety layers"):
        locate([0.0, -0.2, -0.1], 0.1)


def test_safety_layers_masks_freeze_those_layers_through_finetune(tmp_path):
    assert cli.main(["safety-layers", "--model", "demo", "--harmful-data", "demo-harmful", "--harmless-data",
                     "demo-harmless", "--limit", "8", "--out", str(tmp_path / "layers")]) == 0
    summary = json.loads((tmp_path / "layers" / "safety_layers.json").read_text())
    assert len(summary["gap"]) == 6 and summary["safety_layers"] == list(range(summary["first"], summary["last"] + 1))
    assert summary["onset_found"] == (summary["first"] > 0)
    assert summary["gap"] == pytest.approx([a - b for a, b in zip(summary["harmless_similarity"],
                                                                  summary["mixed_similarity"])])
    assert cli.main(["finetune", "--model", "demo", "--masks", str(tmp_path / "layers"), "--data", "demo-utility",
                     "--nsamples", "8", "--batch-size", "4", "--max-length", "64", "--num-epochs", "1",
                     "--learning-rate", "1e-3", "--save-path", str(tmp_path / "tuned")]) == 0
    from safeneurons.models.loading import load_model

    before = load_model("demo").state_dict()
    after = weights(tmp_path / "tuned")
    frozen = {f"model.layers.{layer}." for layer in summary["safety_layers"]}
    for name, tensor in after.items():
        if any(name.startswith(prefix) for prefix in frozen):
            assert torch.equal(tensor.view(torch.int32), before[name].view(torch.int32)), name
    assert any(not torch.equal(tensor, before[name]) for name, tensor in after.items()
               if not any(name.startswith(prefix) for prefix in frozen))


def test_safety_layers_bad_onset_is_one_line(tmp_path, capsys):
    message = run_expecting_error(["safety-layers", "--model", "demo", "--harmful-data", "demo-harmful",
                                   "--harmless-data", "demo-harmless", "--gap-onset", "0", "--out",
                                   str(tmp_path / "out")], tmp_path, capsys)
    assert "--gap-onset 0.0 must lie in (0, 1]" in message
