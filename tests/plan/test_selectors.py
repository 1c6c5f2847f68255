from __future__ import annotations

import pytest

from thaw import ThawError, build_model, resolve


@pytest.fixture(scope="module")
def resnet50():
    return build_model("resnet50", num_classes=5, device="meta")


def test_group_names_ranges_types_and_globs(resnet50) -> None:
    groups = {g.name: set(g.params) for g in resnet50.groups}
    assert set(resolve(resnet50, ["head"])) == {"fc.weight", "fc.bias"}
    assert set(resolve(resnet50, ["0:2"])) == groups["stem"] | groups["layer1"]
    assert set(resolve(resnet50, ["-2:"])) == groups["layer4"] | groups["head"]
    assert set(resolve(resnet50, ["fc"])) == groups["head"]
    assert set(resolve(resnet50, ["layer4.2*"])) == {p for p in groups["layer4"] if p.startswith("layer4.2.")}
    norms = resolve(resnet50, ["norm"])
    assert norms and all(".bn" in p or p.startswith("bn1") or ".downsample.1." in p for p in norms)
    assert len(resolve(resnet50, ["all"])) == len(list(resnet50.model.parameters()))


def test_union_keeps_model_order(resnet50) -> None:
    names = [n for n, _ in resnet50.model.named_parameters()]
    chosen = resolve(resnet50, ["head", "stem"])
    assert chosen == [n for n in names if n in chosen]


def test_selector_matching_nothing_names_the_valid_groups(resnet50) -> None:
    with pytest.raises(ThawError) as error:
        resolve(resnet50, ["layer9"])
    assert "'layer9' matches no parameters" in str(error.value)
    assert "stem, layer1, layer2, layer3, layer4, head" in str(error.value)


def test_one_selector_as_a_plain_string_is_refused_not_split_into_characters(resnet50) -> None:
    with pytest.raises(ThawError, match=r"^expected a list of selectors like \['head'\], got 'head'$"):
        resolve(resnet50, "head")


def test_every_bad_selector_is_reported(resnet50) -> None:
    with pytest.raises(ThawError) as error:
        resolve(resnet50, ["layer9", "head", "blocks.*"])
    assert "layer9" in str(error.value) and "blocks.*" in str(error.value)


def test_a_group_named_by_digits_that_is_also_another_groups_index_is_refused() -> None:
    """An nn.Sequential's groups are named '3' and '4': `train: [3]` took group '3' (index 1), not index 3 (the head)."""
    from torch import nn

    from thaw import ThawError, adapt
    from thaw.plan import resolve

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    adapter = adapt(model, num_classes=3)
    assert adapter.group_names == ["stem", "3", "4", "head"]
    with pytest.raises(ThawError, match=r"^selector '3' names group '3' \(index 1\) and is the index of group 'head': write 1:2 for group '3', or 3:4 for 'head'$"):
        resolve(adapter, ["3"])
    assert resolve(adapter, ["1:2"]) == list(adapter.group("3").params)  # the way to say either
    assert resolve(adapter, ["4"]) == list(adapter.group("4").params)  # no group has index 4: the name alone
