"""An export is reported good only after it was compared with PyTorch where exports break:
other token lengths and batch sizes for text, real images in the run's preprocessing for images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_class_images
from thaw.cli import main
from thaw.data.images import load_rgb
from thaw.data.transforms import eval_transform
from thaw.errors import ThawError
from thaw.export.formats import export_model
from thaw.export.run_dir import load_run
from thaw.models.hf_text import build_text_model
from thaw.train import TrainConfig, train_images


@pytest.fixture
def text_adapter(tiny_encoder: Path):
    torch.manual_seed(0)
    return build_text_model(str(tiny_encoder), num_classes=2)


def test_onnx_text_export_with_a_fixed_token_length_is_refused(
    text_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exporter that bakes the example's sequence length in: inputs of the example's length still pass."""
    real_export = torch.onnx.export

    def export_with_a_fixed_length(*args, dynamic_shapes, **kwargs):
        batch_only = tuple({0: dims[0]} for dims in dynamic_shapes)
        return real_export(*args, dynamic_shapes=batch_only, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_with_a_fixed_length)
    path = tmp_path / "model.onnx"
    with pytest.raises(ThawError, match="exported onnx model fails on an input of shape 1x3 .*export refused"):
        export_model(text_adapter, path, "onnx")
    assert not path.exists()


def test_a_refused_export_leaves_the_file_it_would_have_replaced(text_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written and checked beside the target, then renamed into place: a refusal deleted an earlier good export
    (and, as root, `--output /dev/null` deleted the device)."""
    real_export = torch.onnx.export

    def export_with_a_fixed_length(*args, dynamic_shapes, **kwargs):
        return real_export(*args, dynamic_shapes=tuple({0: dims[0]} for dims in dynamic_shapes), **kwargs)

    earlier = tmp_path / "model.onnx"
    export_model(text_adapter, earlier, "onnx")
    works = earlier.read_bytes()
    monkeypatch.setattr(torch.onnx, "export", export_with_a_fixed_length)
    with pytest.raises(ThawError, match="export refused"):
        export_model(text_adapter, earlier, "onnx")
    assert earlier.read_bytes() == works
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]  # no staging folder left
    os.mkfifo(tmp_path / "pipe.onnx")
    with pytest.raises(ThawError, match="pipe.onnx is not a regular file"):
        export_model(text_adapter, tmp_path / "pipe.onnx", "onnx")
    assert (tmp_path / "pipe.onnx").is_fifo()


def test_an_export_removes_the_staging_folders_of_killed_exports_on_this_machine_and_no_other(text_adapter, tmp_path: Path) -> None:
    """kill -9 mid-export left a hidden folder holding a whole model beside the output, for good."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    here = socket.gethostname()
    killed = tmp_path / f".thaw-export-{here}-{int(dead.stdout)}-abc123"
    running = tmp_path / f".thaw-export-{here}-{os.getpid()}-def456"  # an export of a process still alive
    elsewhere = tmp_path / f".thaw-export-another-host-{int(dead.stdout)}-ghi789"  # its process cannot be checked
    # another machine whose name begins with this one's and a dash: its "-99999" is part of its name, not a pid
    longer_name = tmp_path / f".thaw-export-{here}-99999-{int(dead.stdout)}-jkl012"
    for staged in (killed, running, elsewhere, longer_name):
        staged.mkdir()
        (staged / "model.pt").write_bytes(b"half a model")
    export_model(text_adapter, tmp_path / "model.pt", "torchscript")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model.pt", running.name, elsewhere.name, longer_name.name])


def test_torchscript_text_export_wrong_at_other_lengths_is_refused(
    text_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traced model that is right only at the traced length (what a length traced as a constant gives)."""
    real_trace, real_load = torch.jit.trace, torch.jit.load
    traced_length = []

    def trace(model, example, **kwargs):
        traced_length.append(example[0].shape[1])
        return real_trace(model, example, **kwargs)

    def load_right_at_the_traced_length_only(path):
        loaded = real_load(path)
        return lambda *inputs: loaded(*inputs) + float(inputs[0].shape[1] != traced_length[0])

    monkeypatch.setattr(torch.jit, "trace", trace)
    monkeypatch.setattr(torch.jit, "load", load_right_at_the_traced_length_only)
    with pytest.raises(ThawError, match="torchscript model's outputs differ from PyTorch's by 1.00e\\+00; export refused"):
        export_model(text_adapter, tmp_path / "model.pt", "torchscript")


@pytest.fixture
def image_run(tmp_path: Path) -> tuple[Path, Path]:
    data = write_class_images(tmp_path / "data", per_class=6, size=40)
    run = tmp_path / "run"
    config = TrainConfig(image_size=32, batch_size=8, quiet=True)
    options = {"epochs": 1}
    train_images(data, model="mobilenet_v3_small", weights=None, out=run, plan="feature-extract", plan_options=options, config=config)
    return data, run


def _record_exported_inputs(monkeypatch: pytest.MonkeyPatch, wrong_on: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every batch the exported TorchScript model is run on; optionally wrong on batches holding `wrong_on` images."""
    real_load, seen = torch.jit.load, []

    def load(path):
        loaded = real_load(path)

        def run(images: torch.Tensor) -> torch.Tensor:
            seen.append(images)
            real = any(torch.equal(image, known) for image in images for known in wrong_on or [])
            return loaded(images) + float(real)

        return run

    monkeypatch.setattr(torch.jit, "load", load)
    return seen


def _real_images(data: Path, run: Path) -> list[torch.Tensor]:
    """Every image of the run's data in the run's evaluation preprocessing."""
    adapter, _ = load_run(run)
    transform = eval_transform(adapter.preprocessing)
    return [transform(load_rgb(path)) for path in sorted(data.rglob("*.png"))]


def test_image_export_is_checked_on_real_images_of_the_run_data(
    image_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = image_run
    real = _real_images(data, run)
    seen = _record_exported_inputs(monkeypatch)
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert "checked on 4 real images of the run's data and 2 noise batches" in capsys.readouterr().out
    checked = [image for batch in seen for image in batch if any(torch.equal(image, known) for known in real)]
    assert len(checked) == 4
    good = (run / "model.pt").read_bytes()

    # An export that is right on noise but wrong on real images is refused; the good export before it stays.
    _record_exported_inputs(monkeypatch, wrong_on=real)
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    assert "outputs differ from PyTorch's by 1.00e+00; export refused" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == good
    (run / "model.pt").unlink()
    assert main(["export", str(run), "--format", "torchscript"]) == 2  # with none before it: nothing is left
    assert not (run / "model.pt").exists()


def test_image_export_says_when_only_noise_was_checked(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = image_run
    shutil.move(str(data), str(tmp_path / "moved"))
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert "checked on noise only (2 noise batches): the run's data folder is gone" in capsys.readouterr().out


def test_export_refuses_an_empty_output_a_pipe_and_another_runs_folder(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = image_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "thaw.json").write_text("{}")  # what makes a folder a run's, to every command
    (other / "model.onnx").write_bytes(b"the other run's own export")
    os.mkfifo(tmp_path / "pipe.onnx")  # written to, it hung; renamed over, it would be gone
    for output, said in [
        ("", "--output is empty; name the file to write, or leave --output out for the run's own export"),
        ("-", "--output - : an export is written to a file, not to standard output; name the file, such as model.onnx"),  # wrote ./-
        (f"{tmp_path}/dot.onnx/.", f"--output {tmp_path}/dot.onnx/. names a folder; name the file to write, such as {tmp_path / 'dot.onnx' / 'model.onnx'}"),
        (f"{tmp_path}/new.onnx/", f"--output {tmp_path}/new.onnx/ names a folder; name the file to write, such as {tmp_path / 'new.onnx' / 'model.onnx'}"),
        # The run's data folder, or one in it: the suggested file is the run's own export, not a model among the images.
        (str(data), f"--output {data} is a folder; name the file to write, such as {run / 'model.onnx'}"),
        (f"{data}/", f"--output {data}/ names a folder; name the file to write, such as {run / 'model.onnx'}"),
        (str(next(data.iterdir())), f"--output {next(data.iterdir())} is a folder; name the file to write, such as {run / 'model.onnx'}"),
        # A file there: a new folder among the class folders would be read as an empty class by the next run.
        (str(data / "exports" / "m.onnx"), f"--output {data / 'exports' / 'm.onnx'} is among the images of {data}, where the next run on it would read it; write the export elsewhere, such as {run / 'model.onnx'}"),
        ("a" * 300 + ".onnx", f"cannot use --output {'a' * 300}.onnx (File name too long); name another file, such as {run / 'model.onnx'}"),
        (str(tmp_path / "pipe.onnx"), f"--output {tmp_path / 'pipe.onnx'} is not a regular file (a device or a pipe); name a file, such as {run / 'model.onnx'}"),
        (str(other / "model.onnx"), f"--output {other / 'model.onnx'} is in the folder of another run, {other}; write the export elsewhere, such as {run / 'model.onnx'}"),
    ]:
        assert main(["export", str(run), "--output", output]) == 2
        assert capsys.readouterr().err.strip() == f"thaw: error: {said}"
    assert (other / "model.onnx").read_bytes() == b"the other run's own export" and (tmp_path / "pipe.onnx").is_fifo()
    assert not (run / "model.onnx").exists()  # the empty --output did not become the run's default export
    assert not (data / "exports").exists()
    assert not Path("-").exists() and not (tmp_path / "new.onnx").exists() and not (tmp_path / "dot.onnx").exists()
    assert main(["export", str(run), "--format", "torchscript", "--output", "-"]) == 2  # the name suggested fits the format
    assert capsys.readouterr().err.strip().endswith("name the file, such as model.pt")


@pytest.mark.parametrize("fmt, named, other", [("torchscript", "model.onnx", "onnx"), ("onnx", "model.PT", "torchscript")])
def test_an_output_named_for_the_other_format_is_refused_and_left_as_it_was(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, named: str, other: str
) -> None:
    # A TorchScript archive written over model.onnx replaced a working ONNX file with one no ONNX runtime opens.
    _, run = image_run
    existing = tmp_path / named
    existing.write_bytes(b"an export of the other format")
    assert main(["export", str(run), "--format", fmt, "--output", str(existing)]) == 2
    error = capsys.readouterr().err
    assert f"is named for {other}, and --format is {fmt}" in error and len(error.strip().splitlines()) == 1
    assert existing.read_bytes() == b"an export of the other format"


@pytest.mark.parametrize(
    "fmt, target, said",
    [
        ("torchscript", "RUN/model.safetensors", "is one of the run's own files; write the export beside them, such as RUN/model.pt"),
        ("onnx", "RUN/thaw.json", "is one of the run's own files; write the export beside them, such as RUN/model.onnx"),  # was deleted
        ("torchscript", "RUN/checkpoint.pt", "is one of the run's own files"),  # named like a TorchScript file
        ("torchscript", "TMP/notes.txt", "exists and is not a torchscript file"),
        ("onnx", "TMP/photo.png", "exists and is not a onnx file"),
    ],
)
def test_export_never_writes_over_a_run_file_or_a_file_that_is_no_export(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, target: str, said: str
) -> None:
    _, run = image_run
    output = Path(target.replace("RUN", str(run)).replace("TMP", str(tmp_path)))
    if not output.exists():
        output.write_bytes(b"the user's own file")
    before = output.read_bytes()
    assert main(["export", str(run), "--format", fmt, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert said.replace("RUN", str(run)) in error and len(error.strip().splitlines()) == 1
    assert output.read_bytes() == before


def test_export_writes_over_its_own_earlier_exports_and_no_other_file(image_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only the suffix was checked: a checkpoint saved as .pt was written over, and another tool's .onnx too, with the
    .onnx.data beside it deleted."""
    import onnx
    from onnx import TensorProto, helper

    from thaw.export.formats import onnx_data_file

    _, run = image_run
    (tmp_path / "mine").mkdir()
    checkpoint = tmp_path / "mine" / "weights.pt"
    torch.save({"weight": torch.ones(3)}, checkpoint)
    theirs = tmp_path / "mine" / "theirs.onnx"
    identity = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "theirs",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(identity), str(theirs))
    onnx_data_file(theirs).write_bytes(b"their weights")
    notes = tmp_path / "mine" / "notes.onnx"
    notes.write_text("not a model: its first byte says so, and the rest is not read")
    untouched = {path: path.read_bytes() for path in (checkpoint, theirs, onnx_data_file(theirs), notes)}
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torchscript", "--output", str(checkpoint)]) != 0
    assert main(["export", str(run), "--output", str(theirs)]) != 0
    assert main(["export", str(run), "--output", str(notes)]) != 0
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"thaw: error: {path} exists and is no {fmt} model thaw exported; it is left as it was: "
                    "write the export to another file, or move that one away first"
                    for path, fmt in ((checkpoint, "torchscript"), (theirs, "onnx"), (notes, "onnx"))]
    assert {path: path.read_bytes() for path in untouched} == untouched
    empty = tmp_path / "mine" / "empty.onnx"  # as mktemp leaves it: nothing to lose
    empty.touch()
    assert main(["export", str(run), "--output", str(empty)]) == 0 and empty.stat().st_size > 0
    for name in ("again.pt", "classifier"):  # an earlier export, named as one or with no suffix, is written over
        for _ in range(2):
            assert main(["export", str(run), "--format", "torchscript", "--output", str(tmp_path / name)]) == 0
    # thaw's own exports are replaced, from Python too (a path as text, no description); the command line's own
    # replacing is just above (torchscript) and in tests/cli/test_train_cli.py::test_an_onnx_export_whose_weights_torch_puts_beside_it_names_both_files (onnx)
    for name, fmt in (("mine.pt", "torchscript"), ("mine.onnx", "onnx")):
        assert main(["export", str(run), "--format", fmt, "--output", str(tmp_path / name)]) == 0
        adapter, _ = load_run(run)
        export_model(adapter, str(tmp_path / f"api-{name}"), fmt)
        export_model(adapter, str(tmp_path / f"api-{name}"), fmt)
        with pytest.raises(ThawError, match="exists and is no"):  # the other format's file is no export of this one
            export_model(adapter, tmp_path / name, "onnx" if fmt == "torchscript" else "torchscript")
