"""`thaw predict` reads what training reads, and says in one line what it could not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import SmallConvNet, write_class_images
from thaw import ThawError
from thaw.cli import main
from thaw.data.folders import discover
from thaw.export.inference import image_files, predict_files
from thaw.models import adapt


def _odd_names(folder: Path) -> list[Path]:
    """Real images under names a photo library or a scraper leaves: upper-case, rare or no extension."""
    source = next(folder.glob("*.png"))
    copies = [folder / "photo.JFIF", folder / "photo.jpe", folder / "download", folder / "image.dat"]
    for copy in copies:
        Image.open(source).save(copy, format="JPEG" if copy.suffix.lower() in (".jfif", ".jpe") else "PNG")
    return copies


def test_a_folder_gives_predict_every_file_training_would_read(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=3)
    odd = _odd_names(tmp_path / "red")
    (tmp_path / "red" / "notes.txt").write_text("not a photo")
    data = discover(tmp_path)
    trained_on = {path for path, _ in data.everything()}
    assert set(odd) <= trained_on  # training reads them all
    skipped_by_training = {Path(path) for path, _ in data.skipped}
    assert set(image_files([str(tmp_path)])) == trained_on | skipped_by_training


def test_predict_classifies_those_files_and_lists_the_rest_as_skipped(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=1)
    odd = _odd_names(tmp_path / "red")
    (tmp_path / "red" / "notes.txt").write_text("not a photo")
    (tmp_path / "red" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    predictions, skipped = predict_files(adapt(SmallConvNet(), num_classes=3), ["blue", "green", "red"], tmp_path)
    assert {str(path) for path in odd} <= {p.path for p in predictions}
    assert len(predictions) == 3 + len(odd)
    assert sorted((Path(path).name, reason.split(" to ")[0]) for path, reason in skipped) == [("broken.jpg", "broken link"), ("notes.txt", "not an image")]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    write_class_images(root / "data" / "train", per_class=6, size=32, seed=0)
    write_class_images(root / "data" / "val", per_class=2, size=32, seed=1)
    args = ["train", str(root / "data"), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--strategy", "feature-extract", "--epochs", "1", "--quiet", "--out", str(root / "run")]
    assert main(args) == 0
    return root / "run"


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("notes.txt", lambda path: path.write_text("my notes"), "not an image"),
        ("empty.jpg", lambda path: path.write_bytes(b""), "empty file"),  # the words train's warning uses for it
        ("broken.jpg", lambda path: path.symlink_to(path.parent / "gone.jpg"), "broken link to "),
    ],
)
def test_predict_on_no_readable_image_is_one_error_line(
    image_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str, make, reason: str
) -> None:
    make(tmp_path / name)
    capfd.readouterr()
    assert main(["predict", str(image_run), str(tmp_path / name)]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err  # not a warning and then the same words again as the error
    assert err.startswith("thaw: error: ") and f"{name} ({reason}" in err


@pytest.mark.parametrize("name", ["labels.csv", "labels.tsv"])
def test_predict_on_a_manifest_says_how_to_use_the_images_it_lists(
    image_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str,
) -> None:
    manifest = tmp_path / name
    manifest.write_text("path,label\nimages/a.png,red\n")
    capfd.readouterr()
    assert main(["predict", str(image_run), str(manifest)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err == (
        f"thaw: error: no image to classify: skipped 1 unreadable file(s): {manifest} (not an image); {manifest} is a list "
        f"of images, not one: score them against its labels with thaw evaluate RUN {manifest}, or pass the images\n"
    )


def test_a_path_that_is_neither_file_nor_folder_is_named_as_such(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # as /dev/null or `<(...)` would be: there, but no image file to open by name
    with pytest.raises(ThawError, match="pipe is neither a file nor a folder; pass image files or folders"):
        image_files([str(tmp_path / "pipe")])
    with pytest.raises(ThawError, match="gone.png does not exist; pass image files or folders"):
        image_files([str(tmp_path / "gone.png")])


def test_predict_and_evaluate_compute_an_fp32_run_in_fp32(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained with --precision fp32 was used in bf16 where the CPU has it: its probabilities moved by up to
    0.025 from its own fp32 export. (Where the CPU has no bf16, both paths are fp32 and this holds either way.)"""
    import json
    import warnings

    import torch

    from thaw.data.images import load_rgb
    from thaw.data.transforms import eval_transform
    from thaw.export.run_dir import load_run

    run = tmp_path / "run"
    tiny = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--strategy", "feature-extract"]
    assert main(["train", str(tiny_split_data), *tiny, "--epochs", "1", "--precision", "fp32", "--out", str(run), "--quiet"]) == 0
    image = sorted((tiny_split_data / "val" / "red").iterdir())[0]
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a forward outside no_grad warned as the scores were read (and built a graph)
        assert main(["predict", str(run), str(image), "--json", "--top-k", "3"]) == 0
    said = json.loads(capsys.readouterr().out)["predictions"][0]
    adapter, meta = load_run(run)
    with torch.no_grad():
        pixels = eval_transform(adapter.preprocessing)(load_rgb(image, 2 * adapter.preprocessing.resize_size)).unsqueeze(0)
        expected = torch.softmax(adapter.model.eval().float()(pixels).float(), dim=1)[0]
    assert main(["evaluate", str(run), str(tiny_split_data), "--split", "val", "--json"]) == 0  # as its own val pass
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(meta["best"]["val"]["loss"], abs=1e-5)
    assert len(said["predictions"]) == 3
    for row in said["predictions"]:
        assert row["probability"] == pytest.approx(float(expected[meta["classes"].index(row["label"])]), abs=1e-5)
