"""Training runs on small generated data: what a run leaves, resume, stage changes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Crash, crash_after
from thaw import ThawError, build_model
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images

CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True)
PLAN = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))


def run(data: Path, out: Path, **options):
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=CONFIG, out=out, **options)


def test_a_run_leaves_weights_metadata_metrics_plots_and_checkpoint(tiny_split_data: Path, tmp_path: Path, torch_home: Path) -> None:
    out = tmp_path / "run"
    result = train_images(tiny_split_data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=PLAN, config=CONFIG, out=out)
    for name in ("model.safetensors", "thaw.json", "metrics.csv", "curves.png", "confusion.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "thaw.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["model"] == "mobilenet_v2"
    assert meta["preprocessing"]["crop_size"] == 32 and [s["name"] for s in meta["plan"]["stages"]] == ["head", "all"]
    assert set(meta["versions"]) == {"thaw", "torch", "torchvision"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["stage"], r["stage_epoch"]) for r in rows] == [("head", "1"), ("head", "2"), ("all", "1"), ("all", "2")]
    # the highest val accuracy; among tied epochs the lowest val loss
    assert result.best["epoch"] == max(range(1, 5), key=lambda e: (float(rows[e - 1]["val_accuracy"]), -float(rows[e - 1]["val_loss"])))
    assert meta["best"]["why"].startswith(f"highest val accuracy {result.best['value']:.4f}")
    assert result.best["val"]["accuracy"] > 0.8  # pretrained features tell three colours apart


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_resumed_run_ends_with_the_same_weights(tiny_split_data: Path, tmp_path: Path, crash_at: int) -> None:
    run(tiny_split_data, tmp_path / "whole")
    with pytest.raises(Crash):
        run(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(crash_at)])
    resumed = run(tiny_split_data, tmp_path / "cut", resume=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=True)
    again = torch.load(tmp_path / "cut" / "checkpoint.pt", map_location="cpu", weights_only=True)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    assert [r["val_loss"] for r in whole["history"]] == [r["val_loss"] for r in resumed.history]
    best_whole, best_again = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(best_whole[k], best_again[k]) for k in best_whole)


def test_resume_with_other_classes_is_refused(tiny_split_data: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        run(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(1)])
    other = tmp_path / "other"
    from tests.conftest import write_class_images

    write_class_images(other / "train", classes=("a", "b"), per_class=4)
    write_class_images(other / "val", classes=("a", "b"), per_class=2)
    with pytest.raises(ThawError) as refused:
        run(other, tmp_path / "cut", resume=True)
    assert str(refused.value) == (
        f"the run in {tmp_path / 'cut'} was trained on 3 classes (blue, green, red), this data has 2 ('blue', 'green', 'red' "
        "are gone, 'a', 'b' are new); resume with the same data, or start a new run with another --out"
    )


def test_frozen_layers_are_untouched_by_the_head_stage(tiny_split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = build_model("mobilenet_v3_small", num_classes=3).model.state_dict()
    with pytest.raises(Crash):
        run(tiny_split_data, tmp_path / "run", callbacks=[crash_after(2)])
    after = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"classifier.3.weight", "classifier.3.bias"}


def test_strict_fails_on_an_unreadable_file(tiny_split_data: Path, tmp_path: Path) -> None:
    (tiny_split_data / "train" / "red" / "broken.jpg").write_text("not a jpeg")
    strict = TrainConfig(**{**CONFIG.__dict__, "strict": True})
    with pytest.raises(ThawError, match=r"broken.jpg .*drop strict \(--strict\)"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=strict, out=tmp_path / "run")
    result = run(tiny_split_data, tmp_path / "lenient")
    assert [Path(p).name for p, _ in result.skipped] == ["broken.jpg"]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"batch_size": 4}, r"batch-size \(the run: 8, now: 4\)"),
        ({"accumulate": 2}, r"accumulate \(the run: 1, now: 2\)"),
        ({"seed": 3}, r"seed \(the run: 0, now: 3\)"),
        ({"image_size": 48}, r"image-size \(the run: 32, now: 48\)"),
        ({"schedule": "onecycle"}, r"schedule \(the run: 'cosine', now: 'onecycle'\)"),
        ({"precision": "bf16"}, r"precision \(the run: 'fp32', now: 'bf16'\)"),
        ({"cache_views": 2}, r"cache-views \(the run: 0, now: 2\)"),
    ],
)
def test_resume_refuses_other_training_settings(tiny_split_data: Path, tmp_path: Path, change: dict, expected: str) -> None:
    started = TrainConfig(**(CONFIG.__dict__ | {"precision": "fp32"}))
    with pytest.raises(Crash):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=started, out=tmp_path / "cut",
                     callbacks=[crash_after(1)])
    other = TrainConfig(**(started.__dict__ | change))
    with pytest.raises(ThawError, match=f"started with other settings; different now: {expected}"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=other, out=tmp_path / "cut", resume=True)


def test_resume_refuses_changed_data_and_accepts_other_workers(tiny_split_data: Path, tmp_path: Path) -> None:
    from tests.conftest import write_class_images

    with pytest.raises(Crash):
        run(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(1)])
    write_class_images(tmp_path / "extra", per_class=1, seed=5)
    (tmp_path / "extra" / "red" / "000.png").rename(tiny_split_data / "train" / "red" / "new.png")
    with pytest.raises(ThawError, match=r"different now: the data: its files, sizes or labels changed\. Put the data back as the run had it, "
                                         "or start a new run on this data with another --out$"):
        run(tiny_split_data, tmp_path / "cut", resume=True)
    (tiny_split_data / "train" / "red" / "new.png").unlink()
    moved = tmp_path / "moved"
    tiny_split_data.rename(moved)  # the same files in another place: the same data
    other_runtime = TrainConfig(**(CONFIG.__dict__ | {"workers": 1, "quiet": True}))
    resumed = train_images(moved, model="mobilenet_v3_small", weights=None, plan=PLAN, config=other_runtime, out=tmp_path / "cut", resume=True)
    assert len(resumed.history) == 4


def _epoch(epoch: int, accuracy: float, loss: float) -> dict:
    return {"epoch": epoch, "val_accuracy": accuracy, "val_loss": loss, "val": {"accuracy": accuracy, "loss": loss}}


def test_tied_val_accuracy_delivers_the_epoch_with_the_lowest_val_loss_and_says_so() -> None:
    """The issue's case: three epochs tie at one val accuracy; the earliest, right after the unfreeze, has the
    highest val loss and was the worst model on test. The tie goes to the lowest val loss, and the summary says why."""
    from thaw.train.fit import _is_better, why_delivered

    history = [_epoch(1, 0.9130, 0.30), _epoch(2, 0.9565, 0.40), _epoch(3, 0.9565, 0.21), _epoch(4, 0.9565, 0.25)]
    best: dict = {}
    for row in history:
        if _is_better("accuracy", row["val_accuracy"], row["val_loss"], best):
            best = {"metric": "accuracy", "value": row["val_accuracy"], "epoch": row["epoch"], "val": row["val"]}
    assert best["epoch"] == 3
    assert why_delivered(best, history) == "highest val accuracy 0.9565, tied with epochs 2, 4: the lowest val loss of them"
    assert why_delivered(best, history[:3]) == "highest val accuracy 0.9565, tied with epoch 2: the lowest val loss of them"
    many = history + [_epoch(epoch, 0.9565, 0.5) for epoch in range(5, 205)]  # a long run: the line names five
    assert why_delivered(best, many) == "highest val accuracy 0.9565, tied with epochs 2, 4, 5, 6, 7 and 197 more: the lowest val loss of them"
    assert not _is_better("accuracy", 0.9565, 0.21, best)  # an exact tie in both keeps the earlier epoch
    assert _is_better("accuracy", 0.9600, 0.90, best)  # higher accuracy wins whatever its loss
    assert not _is_better("loss", 0.25, 0.25, {"metric": "loss", "value": 0.21, "val": {"loss": 0.21}})
