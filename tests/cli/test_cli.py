"""The command line as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thaw.cli import main


def thaw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thaw", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_plan_prints_the_seed_line_and_a_table_per_stage() -> None:
    result = thaw("plan", "--model", "resnet50", "--num-classes", "5", "--strategy", "feature-extract")
    assert result.returncode == 0, result.stderr
    assert "Trainable: 10,245 / 23,518,277 (0.0%)" in result.stdout
    assert "group" in result.stdout and "batchnorm" in result.stdout and "layer4" in result.stdout


def test_plan_json_has_the_documented_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "resnet50", "--num-classes", "5", "--strategy", "two-phase", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "resnet50" and report["num_classes"] == 5 and report["total_params"] == 23_518_277
    head, everything = report["stages"]
    assert (head["name"], head["trainable_params"]) == ("head", 10_245)
    assert everything["trainable_params"] == 23_518_277
    keys = {"name", "params", "trainable", "lr", "weight_decay", "batchnorm"}
    assert all(set(group) == keys for stage in report["stages"] for group in stage["groups"])
    stem = everything["groups"][0]
    assert stem["name"] == "stem" and stem["lr"] < everything["groups"][-1]["lr"]
    assert head["groups"][0]["lr"] is None and head["groups"][0]["weight_decay"] is None


def test_plan_lr_options(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "--model", "resnet50", "--num-classes", "5", "--strategy", "fine-tune", "--json"]
    main([*base, "--lr-range", "1e-5:1e-3"])
    lrs = [g["lr"] for g in json.loads(capsys.readouterr().out)["stages"][0]["groups"]]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3)
    main([*base, "--lr", "2e-3", "--layer-decay", "0.5"])
    lrs = [g["lr"] for g in json.loads(capsys.readouterr().out)["stages"][0]["groups"]]
    assert lrs[-1] == pytest.approx(2e-3) and lrs[-2] == pytest.approx(1e-3)
    per_group = [f"--lr={g}={lr}" for g, lr in [("stem", 1e-6), ("layer1", 1e-5), ("layer2", 1e-5), ("layer3", 1e-4), ("layer4", 1e-4), ("fc", 1e-3)]]
    main([*base, *per_group])
    groups = json.loads(capsys.readouterr().out)["stages"][0]["groups"]
    assert [g["lr"] for g in groups] == [1e-6, 1e-5, 1e-5, 1e-4, 1e-4, 1e-3]


def test_plan_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "plan.yaml"
    config.write_text("stages:\n  - {name: top, epochs: 2, train: [layer4, head], lr_range: [1.0e-4, 1.0e-3]}\n")
    assert main(["plan", "--model", "resnet50", "--num-classes", "5", "--config", str(config), "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)["stages"][0]
    assert stage["name"] == "top" and stage["trainable_params"] == 14_964_736 + 10_245


PLAN = ["plan", "--num-classes", "5", "--strategy", "fine-tune"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "resnet50", "--lr", "layer1=1e-5", "--lr", "layer4=1e-4", "--lr", "fc=1e-3"], "leave 8,327,488 of 23,518,277"),
        (["--model", "resnet5"], "did you mean resnet50"),
        (["--model", "resnet50", "--lr", "-1"], "positive finite"),
        (["--model", "resnet50", "--lr", "layer9=1e-3"], "'layer9' is neither a layer group nor a module"),
        (["--model", "resnet50", "--weights", "IMAGENET9"], "has no weights 'IMAGENET9'"),
        (["--model", "resnet50", "--config", "missing.yaml"], "cannot read plan file"),
        (["--model", "resnet50", "--batchnorm", "sometimes"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = thaw(*PLAN, *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_broken_torchrun_variables_are_one_line(tmp_path: Path) -> None:
    environment = os.environ | {"WORLD_SIZE": "two"}
    result = subprocess.run([sys.executable, "-m", "thaw", "train", str(tmp_path), "--model", "mobilenet_v2"],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 2
    assert result.stderr.strip() == "thaw: error: WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers; launch with torchrun"


def test_models_lists_80_builders_and_offline_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert len(models) == 80
    mobilenet = {w["name"]: w for w in models["mobilenet_v2"]["weights"]}
    # The real file ships in an installed package, so it is usable offline.
    assert mobilenet["IMAGENET1K_V1"]["offline"] is True
    assert mobilenet["IMAGENET1K_V2"]["default"] is True
