"""End-to-end accuracy on real data with real weights: the targets users compare us on.

Each test also checks the model thaw delivers (model.safetensors): it is the best
epoch's, and evaluating it on val gives the best epoch's accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_data
from thaw import demo
from thaw.cli import main
from thaw.data.digits import write_digits_folder
from thaw.train import RunResult, TrainConfig, train_images

# On the demo's digits the head stage peaks at 0.838 val accuracy and the full stage reaches 0.958
# (+0.12; demo test accuracy: feature-extract 0.85, two-phase 0.97). An unfreeze that trains only
# the head gets +0.02 from the two extra epochs (0.858, measured by making the full stage head-only).
# 0.05 sits between the two, with room for another machine's numerics on either side. (Measured before the
# default gained --ema --label-smoothing 0.1; the recipe benchmark has the default higher on digits since.)
FULL_STAGE_MARGIN = 0.05


def first_best_row(result: RunResult) -> dict:
    """The epoch that should be delivered: the highest val accuracy; among tied epochs the lowest val loss
    (and among exact ties in both, the first)."""
    return max(result.history, key=lambda row: (row["val_accuracy"], -row["val_loss"], -row["epoch"]))


def delivered_val_accuracy(run: Path, data: Path, capsys: pytest.CaptureFixture) -> float:
    """`thaw evaluate RUN DATA --split val`: what the delivered weights score."""
    capsys.readouterr()
    assert main(["evaluate", str(run), str(data), "--split", "val", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


def assert_delivers_the_best_epoch(result: RunResult, data: Path, capsys: pytest.CaptureFixture) -> None:
    best = first_best_row(result)
    assert (result.best["epoch"], result.best["stage"]) == (best["epoch"], best["stage"])
    assert result.best["val"]["accuracy"] == best["val_accuracy"]
    # Same preprocessing, same engine, eval mode: the delivered file scores what its epoch did. Evaluation batches
    # differ in size from training's val pass, so under bf16 one borderline image may round the other way.
    count = result.best["val"]["count"]
    assert abs(delivered_val_accuracy(result.out, data, capsys) - best["val_accuracy"]) * count <= 1 + 1e-9


@pytest.mark.parametrize(
    "strategy, options, target",
    [
        ("feature-extract", {"epochs": 3}, 0.92),
        ("two-phase", {"head_epochs": 3, "epochs": 2}, 0.93),
    ],
)
def test_mobilenet_v2_on_ants_and_bees(
    torch_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, strategy: str, options: dict, target: float
) -> None:
    data = shared_data("hymenoptera_data")
    result = train_images(
        data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=strategy, plan_options=options,
        config=TrainConfig(quiet=True), out=tmp_path / strategy,
    )
    assert result.best["val"]["accuracy"] >= target
    assert result.best["val"]["count"] == 153 and not result.skipped
    assert_delivers_the_best_epoch(result, data, capsys)


def test_two_phase_full_stage_beats_its_head_stage_on_the_demo_digits(
    torch_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The demo's run (model, weights, image size, plan): the unfreeze must pay for itself, and be what is delivered."""
    data = write_digits_folder(tmp_path / "digits")
    options = demo.STRATEGIES["two-phase"]
    result = train_images(
        data, model=demo.MODEL, weights=demo.WEIGHTS, plan="two-phase", plan_options=options, config=demo.CONFIG, out=tmp_path / "run"
    )
    head_name, full_name = result.history[0]["stage"], result.history[-1]["stage"]
    head = [row["val_accuracy"] for row in result.history if row["stage"] == head_name]
    full = [row["val_accuracy"] for row in result.history if row["stage"] == full_name]
    assert head_name != full_name and (len(head), len(full)) == (options["head_epochs"], options["epochs"])
    assert max(full) >= max(head) + FULL_STAGE_MARGIN, (head, full)
    assert result.best["stage"] == full_name and result.best["epoch"] > options["head_epochs"]
    assert_delivers_the_best_epoch(result, data, capsys)
