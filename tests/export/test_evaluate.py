"""What `thaw evaluate` scores: a text table whole unless a split of the run's is named; held-out data of some of the
run's classes, matched by name; nothing readable, one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_text_table
from thaw.data.text import TextColumns
from thaw.errors import ThawError
from thaw.export.inference import evaluate_run
from thaw.export.run_dir import load_run
from thaw.train import TrainConfig, train_text


@pytest.fixture
def text_run(tmp_path: Path, tiny_encoder: Path) -> tuple[Path, Path]:
    table = write_text_table(tmp_path / "t.tsv", rows_per_class=30)
    run = tmp_path / "run"
    config = TrainConfig(batch_size=8, quiet=True)
    train_text(table, model=str(tiny_encoder), out=run, plan="feature-extract", plan_options={"epochs": 1}, config=config)
    return table, run


def test_a_text_table_is_scored_whole_unless_a_split_is_named(text_run: tuple[Path, Path], tmp_path: Path) -> None:
    table, run = text_run
    adapter, meta = load_run(run)
    whole = evaluate_run(adapter, meta, table)
    assert whole["split"] == "all" and whole["count"] == 60
    val = evaluate_run(adapter, meta, table, "val")
    assert val["split"] == "val" and val["count"] == 6  # the run's own 10% per class, seed 0
    with pytest.raises(ThawError, match="no 'test' split; splits: train, val \\(hold one out with --test-split\\)"):
        evaluate_run(adapter, meta, table, "test")
    # A small held-out table of the user's: scored whole, even where a label occurs once (no split to make).
    held_out = tmp_path / "held_out.tsv"
    held_out.write_text("spam\twin a free prize now\nham\tsee you at lunch\nham\tthanks for dinner\n", encoding="utf-8")
    assert evaluate_run(adapter, meta, held_out)["count"] == 3
    skipped = tmp_path / "no_labels.tsv"  # every row without a label: skipped, so nothing is left to score
    skipped.write_text("\twin a free prize now\n\tsee you at lunch\n", encoding="utf-8")
    with pytest.raises(ThawError, match="holds nothing to score"):
        evaluate_run(adapter, meta, skipped)


def test_a_held_out_split_is_not_rebuilt_from_changed_data(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """val held out of class folders is rebuilt by its seed; from the run's folder changed since training it would be
    another split holding images the model trained on, so evaluate and report refuse it in one line (scoring the
    folder whole still works)."""
    from tests.conftest import write_class_images
    from thaw.cli import main

    data, run = write_class_images(tmp_path / "flat", per_class=10, size=32), tmp_path / "run"
    assert main(["train", str(data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
                 "--strategy", "feature-extract", "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    assert main(["evaluate", str(run), str(data), "--split", "val", "--json"]) == 0  # the same files: the same split
    (data / "red" / "000.png").write_bytes(b"not an image any more")
    capfd.readouterr()
    for command in (["evaluate", str(run), str(data), "--split", "val"], ["report", str(run), "--split", "val"], ["report", str(run)]):
        assert main(command) == 2
        error = capfd.readouterr().err.strip()
        assert "\n" not in error and f"{data} differs from the data this run trained on" in error
        assert error.endswith("pass held-out data as DATA, scored whole (no --split)")  # no test split to suggest here
    assert main(["evaluate", str(run), str(data), "--json"]) == 0  # scored whole, as a held-out set


@pytest.fixture
def colour_run(tiny_split_data: Path, tmp_path: Path) -> Path:
    """A run on three colour classes: blue, green and red, indices 0, 1 and 2."""
    from thaw.cli import main

    run = tmp_path / "run"
    assert main(["train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
                 "--batch-size", "8", "--strategy", "feature-extract", "--epochs", "1", "--quiet", "--out", str(run)]) == 0
    return run


def test_a_held_out_set_of_some_of_the_runs_classes_is_scored_by_class_name(
    colour_run: Path, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A test folder with green and red only: its own class indices would be 0 and 1, the run's are 1 and 2; each image
    must be scored against the run's index of its class name, and the classes it does not hold count nowhere."""
    import shutil

    from thaw.export.inference import score_run

    held_out = tmp_path / "held_out"
    for name in ("green", "red"):
        shutil.copytree(tiny_split_data / "val" / name, held_out / name)
    adapter, meta = load_run(colour_run)
    whole = score_run(adapter, meta, tiny_split_data / "val")  # a folder of class folders: scored whole
    some = score_run(adapter, meta, held_out)
    assert meta["classes"] == ["blue", "green", "red"] and some.metrics["classes"] == meta["classes"]
    assert some.metrics["per_class_support"] == [0, 6, 6]
    named = lambda scored: {Path(path).relative_to(Path(path).parents[1]): int(p) for (path, _), p in zip(scored.samples, scored.predicted)}  # noqa: E731
    in_whole, in_some = named(whole), named(some)
    assert in_some == {key: value for key, value in in_whole.items() if key.parts[0] != "blue"}  # the same model, image by image
    right = sum(value == meta["classes"].index(key.parts[0]) for key, value in in_some.items())
    assert some.metrics["accuracy"] == pytest.approx(right / 12)
    predicted = {value for value in in_some.values()}
    held = [1, 2] + ([0] if 0 in predicted else [])  # macro F1 over the classes held or predicted, as scikit-learn's
    per_class = some.metrics["per_class_f1"]
    assert some.metrics["macro_f1"] == pytest.approx(sum(per_class[i] for i in held) / len(held))
    one = tmp_path / "one_class"
    shutil.copytree(tiny_split_data / "val" / "red", one / "red")  # one class is data to score, if not to train on
    assert evaluate_run(adapter, meta, one)["per_class_support"] == [0, 0, 6]
    from thaw.cli import main

    capsys.readouterr()
    assert main(["evaluate", str(colour_run), str(one)]) == 0
    table = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[3:6]}
    assert table["blue"][0] == table["green"][0] == "-" and table["red"][0] != "-"  # no recall for a class it does not hold
    assert main(["evaluate", str(colour_run), str(one), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    predicted = [sum(column) for column in zip(*said["confusion"])]
    for index, name in enumerate(["blue", "green"]):  # no F1 either, unless the model predicted the class
        assert (table[name][1] == "-") == (predicted[index] == 0)
        assert (said["per_class_f1"][index] is None) == (predicted[index] == 0)  # the JSON says it as the table does
        assert said["per_class_accuracy"][index] is None and (said["per_class_precision"][index] is None) == (predicted[index] == 0)
    assert table["red"][1] != "-" and said["per_class_accuracy"][2] is not None and said["per_class_f1"][2] is not None


def test_a_class_the_run_never_learned_is_one_line_naming_it(colour_run: Path, tiny_split_data: Path, tmp_path: Path) -> None:
    import shutil

    held_out = tmp_path / "held_out"
    shutil.copytree(tiny_split_data / "val" / "red", held_out / "red")
    shutil.copytree(tiny_split_data / "val" / "green", held_out / "purple")
    adapter, meta = load_run(colour_run)
    with pytest.raises(ThawError, match=r"^the data has 1 class\(es\) this run never learned \(purple\); the run knows blue, green, red"):
        evaluate_run(adapter, meta, held_out)


def test_a_class_that_differs_from_a_learned_one_only_in_its_unicode_form_is_named_so() -> None:
    """café learned from a folder typed on Linux (one code point), scored on one unzipped on macOS (e plus an accent)."""
    from thaw.export.inference import EvaluationSet, in_run_classes

    held_out = EvaluationSet("all", (("a.png", 0), ("b.png", 1)), ("cafe\u0301", "tea"), ())
    with pytest.raises(ThawError, match="never learned \\(cafe\u0301\\); .*; 'cafe\\\\u0301' and the run's 'caf\\\\xe9' are the same letters encoded otherwise"):
        in_run_classes(held_out, ["caf\u00e9", "tea"])
    with pytest.raises(ThawError) as plain:  # a class that is simply unknown gets no such sentence
        in_run_classes(EvaluationSet("all", (("a.png", 0),), ("coffee",), ()), ["caf\u00e9", "tea"])
    assert "encoded otherwise" not in str(plain.value)


def test_text_columns_for_an_image_run_are_one_line(colour_run: Path, tiny_split_data: Path) -> None:
    adapter, meta = load_run(colour_run)
    with pytest.raises(ThawError, match=r"^text columns and a delimiter .* read text tables; this is an image run$"):
        evaluate_run(adapter, meta, tiny_split_data, columns=TextColumns(delimiter=";"))


def test_a_manifest_of_no_readable_image_is_one_line(colour_run: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("not an image")
    (tmp_path / "b.txt").write_text("nor this")
    manifest = tmp_path / "held_out.csv"
    manifest.write_text("path,label\na.txt,red\nb.txt,green\n")
    adapter, meta = load_run(colour_run)
    with pytest.raises(ThawError, match=f"^{manifest}: found no class with readable images; there is nothing to score$"):
        evaluate_run(adapter, meta, manifest)
