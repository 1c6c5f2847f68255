"""A run's thaw.json, edited by hand, is checked where it is read: a value thaw could not have written is one line
naming the file and the key, never a traceback later (a transform, the ONNX check) nor a quietly wrong answer (a
class named twice, inputs prepared unlike in training). What thaw writes still loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import SmallConvNet, write_text_table
from thaw import ThawError, adapt
from thaw.cli import main
from thaw.export.run_dir import load_run
from thaw.models import Preprocessing
from thaw.train import TrainConfig, train_images, train_text
from thaw.train.checkpoint import CLASSES_KEY

ABSENT = object()  # as a value: the key is deleted


def _train_by_name(data: Path, out: Path, model: str) -> Path:
    args = ["train", str(data), "--model", model, "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--strategy", "feature-extract", "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def image_run(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_by_name(colours, tmp_path_factory.mktemp("metadata-image") / "run", "mobilenet_v3_small")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> Path:
    root = tmp_path_factory.mktemp("metadata-text")
    table = write_text_table(root / "t.tsv", rows_per_class=10)
    config = TrainConfig(batch_size=8, quiet=True)
    train_text(table, model=str(tiny_encoder), out=root / "run", plan="feature-extract", plan_options={"epochs": 1}, config=config)
    return root / "run"


def edited(run: Path, tmp_path: Path, edits: dict[str, object]) -> Path:
    """A copy of `run` whose thaw.json has each dotted key ("preprocessing.mean") set to its value, or deleted."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "thaw.json").read_text())
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        target = meta
        for key in parents:
            target = target[key]
        if value is ABSENT:
            del target[last]
        else:
            target[last] = value
    (copy / "thaw.json").write_text(json.dumps(meta))
    return copy


def damaged(run: Path, words: str) -> str:
    """The start of the one line load_run gives for the edited thaw.json of `run`."""
    return re.escape(f"{run / 'thaw.json'} is damaged (") + ".*" + re.escape(words)


@pytest.mark.parametrize(
    "edits, words",
    [
        ({"classes": ["blue", "blue", "red"]}, "classes names 'blue' more than once"),  # loaded before: two outputs, one name
        ({"classes": ["blue", "green", "red", "white"]}, "classes has 4 names, the head in model.safetensors has 3 outputs"),
        ({"classes": ["blue"]}, "classes has 1 name, not at least 2"),
        ({"preprocessing.mean": "abc"}, "preprocessing.mean is 'abc', not 1 or 3 numbers"),
        ({"preprocessing.mean": [0.5, 0.5]}, "preprocessing.mean is [0.5, 0.5], not 1 or 3 numbers"),
        ({"preprocessing.mean": [0.5, None, 0.5]}, "preprocessing.mean is [0.5, None, 0.5], not 1 or 3 numbers"),
        ({"preprocessing.std": [0, 1, 1]}, "preprocessing.std is [0, 1, 1], not 1 or 3 numbers above 0"),
        ({"preprocessing.resize_size": -1}, "preprocessing.resize_size is -1, not a whole number of pixels above 0"),
        ({"preprocessing.crop_size": "32"}, "preprocessing.crop_size is '32', not a whole number"),
        ({"preprocessing.crop_size": 32.5}, "preprocessing.crop_size is 32.5, not a whole number"),
        ({"preprocessing.crop_size": True}, "preprocessing.crop_size is True, not a whole number"),
        ({"preprocessing.crop_size": ABSENT}, "no preprocessing.crop_size"),  # was ImageNet's 224 without a word
        ({"preprocessing.mean": ABSENT}, "no preprocessing.mean"),
        ({"preprocessing.interpolation": "smooth"}, "preprocessing.interpolation is 'smooth', not one of nearest"),
        ({"preprocessing.channels": 3}, "preprocessing has unknown key channels"),
        ({"task": "audio"}, "task is 'audio', not one of image, text"),
        ({"weights": 5}, "weights is 5, not a weights name, a path or null"),
        ({"data_path": 5}, "data_path is 5, not a path"),
        ({"data": 5}, "data is 5, not a mapping"),
        ({"data.path": 5}, "data.path is 5, not a path"),
        ({"val_split": "abc"}, "val_split is 'abc', not a share"),
        ({"train_config.seed": "x"}, "train_config.seed is 'x', not a whole number"),  # evaluate split the data by it
        ({"skipped_files": 5}, "skipped_files is 5, not a list of {path, reason} records"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_an_edited_image_run_is_one_line_naming_the_key(image_run: Path, tmp_path: Path, edits: dict, words: str) -> None:
    run = edited(image_run, tmp_path, edits)
    with pytest.raises(ThawError, match=damaged(run, words) + r".*\); retrain or restore it from a copy$"):
        load_run(run)


def test_every_problem_is_named_at_once(image_run: Path, tmp_path: Path) -> None:
    run = edited(image_run, tmp_path, {"preprocessing.std": [0, 1, 1], "preprocessing.crop_size": -1, "data_path": 5})
    with pytest.raises(ThawError) as caught:
        load_run(run)
    assert all(key in str(caught.value) for key in ("preprocessing.std is", "preprocessing.crop_size is", "data_path is"))


def disagree(run: Path, words: str) -> str:
    """The one line load_run gives where thaw.json's classes are not those the weights of `run` record."""
    return (
        re.escape(f"{run / 'thaw.json'} and model.safetensors disagree: {words} in model.safetensors, which records the classes it was trained on")
        + r".*; restore both files from the same run, or retrain$"
    )


@pytest.mark.parametrize(
    "classes, words",
    [  # predictions named wrongly without a word before: the head's outputs are the weights' classes, in their order
        (["red", "green", "blue"], "class 0 is 'red' in thaw.json and 'blue'"),
        (["blue", "green", "crimson"], "class 2 is 'crimson' in thaw.json and 'red'"),  # a rename: not told from other weights
    ],
)
def test_image_classes_edited_in_thaw_json_are_refused(image_run: Path, tmp_path: Path, classes: list[str], words: str) -> None:
    run = edited(image_run, tmp_path, {"classes": classes})
    with pytest.raises(ThawError, match=disagree(run, words)):
        load_run(run)


def test_text_classes_edited_in_thaw_json_are_refused(text_run: Path, tmp_path: Path) -> None:
    recorded = json.loads((text_run / "thaw.json").read_text())["classes"]
    run = edited(text_run, tmp_path, {"classes": recorded[::-1]})
    with pytest.raises(ThawError, match=disagree(run, f"class 0 is {recorded[1]!r} in thaw.json and {recorded[0]!r}")):
        load_run(run)


@pytest.mark.parametrize(
    "header", ["[1, 2, 3]", "not json", "[" * 100_000 + "]" * 100_000, '{"a": 1}'], ids=["numbers", "not-json", "nested-deep", "a-mapping"]
)
def test_a_damaged_classes_record_is_one_line(image_run: Path, tmp_path: Path, header: str) -> None:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    save_file(load_file(str(run / "model.safetensors")), str(run / "model.safetensors"), metadata={CLASSES_KEY: header})
    message = f"{run / 'model.safetensors'} is damaged (its header's thaw.classes is not a list of class names); retrain or restore it from a copy"
    with pytest.raises(ThawError, match=f"^{re.escape(message)}$"):
        load_run(run)


def test_weights_copied_in_from_another_run_are_refused(image_run: Path, colours: Path, tmp_path: Path) -> None:
    """The same architecture and head size, trained on other classes: each output would be named by this run's
    thaw.json, so every prediction would carry another class's name."""
    other_data = tmp_path / "other"
    for split in ("train", "val"):
        for source, name in zip(("blue", "green", "red"), ("cat", "dog", "fox")):
            shutil.copytree(colours / split / source, other_data / split / name)
    other = _train_by_name(other_data, tmp_path / "other-run", "mobilenet_v3_small")
    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    with pytest.raises(ThawError, match=disagree(run, "class 0 is 'blue' in thaw.json and 'cat'")):
        load_run(run)


def test_weights_saved_without_their_classes_still_load(image_run: Path, tmp_path: Path) -> None:
    """Runs made before the weights recorded their classes load as they did, and give the same logits."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    save_file(load_file(str(run / "model.safetensors")), str(run / "model.safetensors"))  # the header without thaw.classes
    with safe_open(str(run / "model.safetensors"), framework="pt") as opened:
        assert CLASSES_KEY not in (opened.metadata() or {})
    old, _ = load_run(run)
    new, _ = load_run(image_run)
    batch = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old.model(batch), new.model(batch))


def test_a_run_records_its_classes_in_its_weights(image_run: Path, text_run: Path) -> None:
    for run in (image_run, text_run):
        with safe_open(str(run / "model.safetensors"), framework="pt") as opened:
            recorded = json.loads(opened.metadata()[CLASSES_KEY])
        assert recorded == json.loads((run / "thaw.json").read_text())["classes"]


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{run}", "{image}"],  # a traceback from the transform before
        ["evaluate", "{run}", "{data}"],
        ["export", "{run}", "--format", "onnx", "--output", "{out}"],  # a traceback from the check on real images before
        ["report", "{run}", "{data}"],
    ],
    ids=lambda command: command[0],
)
def test_the_commands_say_it_in_one_line(
    image_run: Path, colours: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], command: list[str]
) -> None:
    run = edited(image_run, tmp_path, {"preprocessing.mean": "abc"})
    image = next((colours / "val" / "red").glob("*.png"))
    places = {"run": run, "image": image, "data": colours, "out": tmp_path / "model.onnx"}
    capfd.readouterr()
    assert main([part.format(**places) for part in command]) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"thaw: error: {run / 'thaw.json'} is damaged (preprocessing.mean is 'abc'")


@pytest.mark.parametrize(
    "edits, words",
    [
        ({"classes": ["ham", "ham"]}, "classes names 'ham' more than once"),
        ({"classes": ["ham", "spam", "eggs"]}, "classes has 3 names, the head in model.safetensors has 2 outputs"),
        ({"preprocessing.max_length": 0}, "preprocessing.max_length is 0, not a whole number of tokens above 0"),
        ({"preprocessing.max_length": ABSENT}, "no preprocessing.max_length"),  # a KeyError before
        ({"preprocessing.pooling": "max"}, "preprocessing.pooling is 'max', not one of mean, cls"),
        ({"preprocessing.pooling": ABSENT}, "no preprocessing.pooling"),
        ({"preprocessing.tokenizer": ABSENT}, "no preprocessing.tokenizer"),
        ({"preprocessing.truncate": "left"}, "preprocessing has unknown key truncate"),
        ({"val_split": ABSENT}, "no val_split"),  # scoring a split reads it
        ({"columns.text": [1]}, "columns.text is [1], not a column name, position or null"),
        ({"columns.header": True}, "columns has unknown key header"),
        ({"split_rule": None}, "split_rule is None, not a split rule's name"),  # scoring a split reads it
        ({"copies_together": "yes"}, "copies_together is 'yes', not true or false"),  # runs made before split_rule wrote it
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_an_edited_text_run_is_one_line_naming_the_key(text_run: Path, tmp_path: Path, edits: dict, words: str) -> None:
    run = edited(text_run, tmp_path, edits)
    with pytest.raises(ThawError, match=damaged(run, words)):
        load_run(run)


def test_a_split_rule_this_thaw_does_not_know_refuses_scoring_a_split_only(
    text_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A newer thaw's rule: predict and scoring the table whole never split it, so they work; scoring a split says
    which rule it cannot rebuild, in one line, not that the file is damaged."""
    run = edited(text_run, tmp_path, {"split_rule": "by-hand"})
    table = json.loads((run / "thaw.json").read_text())["data_path"]
    capfd.readouterr()
    assert main(["predict", str(run), "win a free prize now"]) == 0
    assert main(["evaluate", str(run), table]) == 0
    assert main(["evaluate", str(run), table, "--split", "val"]) == 2
    error = capfd.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "thaw: error: thaw.json records split_rule 'by-hand', which this thaw does not know (copies-within-rows-and-texts, "
        "copies-within-rows, copies-within-texts, row-by-row): it was written by a newer thaw, or damaged; use the thaw that made the run"
    )


@pytest.mark.parametrize("model", ["mobilenet_v3_small", "timm/resnet10t"])
def test_an_untouched_run_by_name_loads_and_predicts(colours: Path, tmp_path: Path, model: str) -> None:
    run = _train_by_name(colours, tmp_path / "run", model)
    adapter, meta = load_run(run)
    assert meta["classes"] == ["blue", "green", "red"] and adapter.preprocessing.crop_size == 32
    assert main(["predict", str(run), str(next((colours / "val" / "red").glob("*.png")))]) == 0


def test_a_model_object_run_with_one_mean_for_all_channels_loads(colours: Path, tmp_path: Path) -> None:
    # adapt() takes the user's preprocessing; torchvision normalises every channel by a single value
    single = Preprocessing(mean=(0.5,), std=(0.25,), resize_size=32, crop_size=32, source="the user's")
    model = adapt(SmallConvNet(), num_classes=3, preprocessing=single)
    config = TrainConfig(batch_size=8, quiet=True)
    train_images(colours, model=model, out=tmp_path / "run", config=config, plan="feature-extract", plan_options={"epochs": 1})
    adapter, _ = load_run(tmp_path / "run", model=SmallConvNet())
    assert adapter.preprocessing == single


def test_an_untouched_text_run_loads(text_run: Path) -> None:
    adapter, meta = load_run(text_run)
    assert meta["classes"] == ["ham", "spam"] and adapter.preprocessing.pooling == "mean"
