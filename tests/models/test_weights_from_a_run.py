"""A run's model.safetensors as the weights of a new run on other classes: the body loads bit for bit, the run's
head is left out with one line on stderr, and every other misfit is still refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_class_images
from thaw import ThawError, build_model
from thaw.train import TrainConfig, train_images

MODEL = "mobilenet_v3_small"
CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True)
BODY_TENSOR = "features.0.0.weight"  # the stem's convolution


def _train(data: Path, out: Path, weights: str | None) -> None:
    train_images(data, model=MODEL, weights=weights, out=out, plan="feature-extract", plan_options={"epochs": 1}, config=CONFIG)


@pytest.fixture(scope="module")
def run_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model.safetensors of a 1-epoch run on three colour classes."""
    root = tmp_path_factory.mktemp("three")
    _train(write_class_images(root / "data", per_class=6, size=40), root / "run", weights=None)
    return root / "run" / "model.safetensors"


def _head_line(path: Path, theirs: int, ours: int) -> str:
    return f"thaw: warning: the head in {path} ({theirs} classes) is not used; a new {ours}-class head is trained\n"


def test_a_runs_body_loads_bit_for_bit_under_a_new_head(run_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = build_model(MODEL, weights=str(run_weights), num_classes=2)
    saved, loaded = load_file(str(run_weights)), adapter.model.state_dict()
    assert adapter.head_name == "classifier.3" and saved["classifier.3.weight"].shape[0] == 3
    body = [key for key in loaded if not adapter.in_head(key)]
    assert body and all(torch.equal(loaded[key], saved[key]) for key in body)
    assert loaded["classifier.3.weight"].shape == (2, 1024) and loaded["classifier.3.bias"].shape == (2,)
    assert capsys.readouterr().err == _head_line(run_weights, 3, 2)


def test_a_new_run_on_other_classes_starts_from_a_runs_weights(run_weights: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """What a user runs: `thaw train B --model M --weights RUN/model.safetensors` on 2 classes after a run on 3."""
    data = write_class_images(tmp_path / "data", classes=("cat", "dog"), per_class=6, size=40)
    _train(data, tmp_path / "run", weights=str(run_weights))
    assert json.loads((tmp_path / "run" / "thaw.json").read_text())["classes"] == ["cat", "dog"]
    assert load_file(str(tmp_path / "run" / "model.safetensors"))["classifier.3.bias"].shape == (2,)
    assert capsys.readouterr().err.count(_head_line(run_weights, 3, 2)) == 1


def test_a_runs_weights_on_as_many_classes_get_a_new_head_too(run_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """thaw always trains a new head: the run's classes are not known to be these, even where as many."""
    adapter = build_model(MODEL, weights=str(run_weights), num_classes=3)
    assert not torch.equal(adapter.model.state_dict()["classifier.3.weight"], load_file(str(run_weights))["classifier.3.weight"])
    assert capsys.readouterr().err == _head_line(run_weights, 3, 3)


def _edited(run_weights: Path, tmp_path: Path, edit) -> Path:
    state = load_file(str(run_weights))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(("edit", "misfit"), [
    (lambda state: state.update({BODY_TENSOR: torch.zeros(16, 3, 5, 5)}), f"0 missing, 0 unexpected, 1 wrong-shape keys, e.g. {BODY_TENSOR}"),
    (lambda state: state.pop(BODY_TENSOR), f"1 missing, 0 unexpected, 0 wrong-shape keys, e.g. {BODY_TENSOR}"),
    (lambda state: state.update({"extra.weight": torch.zeros(2)}), "0 missing, 1 unexpected, 0 wrong-shape keys, e.g. extra.weight"),
], ids=["body-tensor-of-another-shape", "body-tensor-missing", "unrelated-tensor"])
def test_a_body_that_does_not_fit_is_still_refused_in_one_line(run_weights: Path, tmp_path: Path, edit, misfit: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The head of another class count is no misfit, so the line counts and names the body's alone."""
    path = _edited(run_weights, tmp_path, edit)
    with pytest.raises(ThawError) as refused:
        build_model(MODEL, weights=str(path), num_classes=2)
    assert str(refused.value) == (f"weights {path} do not fit MobileNetV3 ({misfit}); "
                                  "check --model matches the architecture the file was saved from")
    assert capsys.readouterr().err == ""  # no word of a head left out for a file that is refused


def test_a_head_that_differs_in_more_than_its_classes_is_refused(run_weights: Path, tmp_path: Path) -> None:
    """A head on features of another width is another architecture, not another set of classes."""
    path = _edited(run_weights, tmp_path, lambda state: state.update({"classifier.3.weight": torch.zeros(3, 512)}))
    with pytest.raises(ThawError, match=r"do not fit MobileNetV3 \(0 missing, 0 unexpected, 2 wrong-shape keys"):
        build_model(MODEL, weights=str(path), num_classes=2)


@pytest.mark.parametrize("name", ["squeezenet1_1", "googlenet", "mnasnet0_5", "timm/resnet18"])
def test_a_runs_weights_load_without_their_head_across_families(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1x1-convolution head (SqueezeNet), auxiliary heads thaw drops before saving (GoogLeNet), module versions
    safetensors does not keep (MNASNet), and timm, which loads the file itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's init notice
        trained = build_model(name, weights=None, num_classes=3)  # what a run on 3 classes saves
        path = tmp_path / "model.safetensors"
        save_file({key: tensor.contiguous() for key, tensor in trained.model.state_dict().items()}, str(path))
        adapter = build_model(name, weights=str(path), num_classes=2)
    saved, loaded = trained.model.state_dict(), adapter.model.state_dict()
    assert all(torch.equal(loaded[key], saved[key]) for key in loaded if not adapter.in_head(key))
    assert adapter.num_classes == 2
    assert capsys.readouterr().err == _head_line(path, 3, 2)
