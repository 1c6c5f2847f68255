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
