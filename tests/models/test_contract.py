"""The adapter contract, over every classification builder in torchvision.models."""

from __future__ import annotations

import warnings

import pytest
import torch

from thaw import ThawError
from thaw.models import build_model, list_torchvision_models

ALL_BUILDERS = list_torchvision_models()
# Built for real (random weights) to compare outputs; the rest are checked on the meta device.
REAL_SIZE_LIMIT = 30_000_000
NUM_CLASSES = 7


def test_every_torchvision_classifier_is_covered() -> None:
    assert len(ALL_BUILDERS) == 80


def _meta_adapter(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        return build_model(name, num_classes=NUM_CLASSES, device="meta")


@pytest.mark.parametrize("name", ALL_BUILDERS)
def test_groups_are_ordered_and_cover_every_parameter_once(name: str) -> None:
    adapter = _meta_adapter(name)
    names = [n for n, _ in adapter.model.named_parameters()]
    grouped = [p for g in adapter.groups for p in g.params]
    assert sorted(grouped) == sorted(names)
    assert len(grouped) == len(set(grouped))
    # no weight tied between two modules: thaw checks ties in hand-built models only (check_tied_within_groups)
    assert len(list(adapter.model.named_parameters(remove_duplicate=False))) == len(names)
    assert adapter.groups[-1].name == "head" and len(adapter.groups) >= 3
    # Stem to head: each group's parameters come after the previous group's in registration order.
    position = {n: i for i, n in enumerate(names)}
    firsts = [min(position[p] for p in g.params) for g in adapter.groups[:-1]]
    assert firsts == sorted(firsts)
    assert len({g.name for g in adapter.groups}) == len(adapter.groups)


@pytest.mark.parametrize("name", ALL_BUILDERS)
def test_new_head_gives_n_outputs_and_split_matches_forward(name: str) -> None:
    adapter = _meta_adapter(name)
    assert adapter.num_classes == NUM_CLASSES
    assert set(adapter.group("head").params) == {
        f"{adapter.head_name}.{n}" for n, _ in adapter.model.get_submodule(adapter.head_name).named_parameters()
    }
    size = adapter.preprocessing.crop_size
    if sum(p.numel() for p in adapter.model.parameters()) > REAL_SIZE_LIMIT:
        images = torch.empty(2, 3, size, size, device="meta")
        adapter.model.eval()
        assert adapter.model(images).shape == (2, NUM_CLASSES)
        assert adapter.forward_head(adapter.forward_features(images)).shape == (2, NUM_CLASSES)
        return
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adapter = build_model(name, num_classes=NUM_CLASSES)
    adapter.model.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = adapter.model(images)
        split = adapter.forward_head(adapter.forward_features(images))
    assert full.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, refusal", [
    ({"weights": 1}, r"^weights must be a weights name like 'IMAGENET1K_V1', a file's path, or None, got 1$"),  # pathlib's TypeError
    ({"weights": None, "device": "gpu"}, r"^device must be auto, cpu, cuda"),
])
def test_build_model_names_a_wrong_weights_or_device_in_one_line(options: dict, refusal: str) -> None:
    with pytest.raises(ThawError, match=refusal):
        build_model("resnet18", num_classes=2, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_build_model_on_a_missing_cuda_device_is_one_line_not_torchs_driver_error() -> None:
    with pytest.raises(ThawError, match=r"^device 'cuda' \(--device cuda\): this machine has no CUDA device"):
        build_model("resnet18", weights=None, num_classes=2, device="cuda")
    with pytest.raises(ThawError, match=r"^device 'cuda:0' \(--device cuda:0\): this machine has no CUDA device"):
        build_model("resnet18", weights=None, num_classes=2, device=0)  # torch's index for cuda:0
    adapter = build_model("resnet18", weights=None, num_classes=2, device="auto")  # as training resolves it: the CPU here
    assert next(adapter.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("name", [name for name in ALL_BUILDERS if name.startswith("vit_")])
def test_a_vit_is_grouped_stem_then_each_encoder_layer_then_head(name: str) -> None:
    """The README's groups: a ViT's stem, each encoder layer, the head. The encoder's own position embedding beside its
    layers kept all of them in one group (3 groups: gradual and layer decay had nothing to spread over)."""
    from thaw.plan.selectors import group_of_module

    adapter = _meta_adapter(name)
    layers = [f"encoder.layers.encoder_layer_{index}" for index in range(len(adapter.model.encoder.layers))]
    assert adapter.group_names == ["stem", *layers, "head"]
    assert "encoder.pos_embedding" in adapter.group("stem").params and "encoder.ln.weight" in adapter.groups[-2].params
    assert group_of_module(adapter, layers[5]) == layers[5]  # a layer named for its lr is its own group, not the stem
    assert group_of_module(adapter, "encoder.pos_embedding") == "stem"
