"""The command line as a user runs it: exit codes and one-line errors through thaw's entry point (`main`, in this
process), and real processes where the process is the point (the environment, the terminal's encoding, pipes)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_class_images
from thaw.cli import main
from thaw.cli.models_cmd import TEXT_MODELS


def thaw_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m thaw ARGS` in a child process: what a user's shell sees, down to what C code or a DataLoader
    worker writes to the file descriptors (about 8 s of it loads torch)."""
    return subprocess.run([sys.executable, "-m", "thaw", *args], capture_output=True, text=True, timeout=TIMEOUT_S)


TIMEOUT_S = 300  # a command that hangs (a pipe opened, say) fails its test, not the whole run


def _timed_out(_signum: int, _frame: object) -> None:
    raise TimeoutError(f"thaw did not finish within {TIMEOUT_S} s")


def thaw(*args: str) -> subprocess.CompletedProcess:
    """The command as thaw's entry point runs it (main's return is the exit code), in this process: the lines Python
    prints and the exit code thaw_process would see, without loading torch again. A traceback here fails the test.
    What reaches the file descriptors only (C code, worker processes) is thaw_process's to check."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's own exits (--help); main turns the rest into codes
                code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_plan_prints_the_seed_line_and_a_table_per_stage() -> None:
    result = thaw_process("plan", "--model", "resnet50", "--num-classes", "5", "--strategy", "feature-extract")
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
    # typed twice (an override appended to a command): the last wins, plain or named, as for any other flag
    main([*base, "--strategy", "feature-extract", "--lr", "1e-3", "--lr", "1e-2"])
    assert json.loads(capsys.readouterr().out)["stages"][0]["groups"][-1]["lr"] == pytest.approx(1e-2)
    main([*base, "--strategy", "feature-extract", "--lr", "fc=1e-3", "--lr", "fc=1e-2"])
    assert json.loads(capsys.readouterr().out)["stages"][0]["groups"][-1]["lr"] == pytest.approx(1e-2)
    # a plain --lr beside named ones went unused and unsaid (per-group lrs name every group's, the head's too)
    for order in (["--lr", "5e-3", "--lr", "head=1e-3"], ["--lr", "head=1e-3", "--lr", "5e-3"]):
        result = thaw("plan", "--model", "resnet50", "--num-classes", "5", "--strategy", "feature-extract", *order)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            "thaw: error: --lr 0.005 sets the head lr where no group's lr is named; beside --lr NAME=LR name it too, as --lr head=0.005"
        ]
    # ... but a run an older thaw started with both is rebuilt as it ran when a resume compares its options: named lrs
    from thaw.cli import build_parser
    from thaw.cli.options import plan_from_args

    recorded = build_parser().parse_args(["train", "DATA", "--model", "resnet50", "--strategy", "feature-extract", "--lr", "5e-3", "--lr", "head=1e-3"])
    assert plan_from_args(recorded, num_groups=6, recorded=True).stages[0].lr.by_name == {"head": 1e-3}


def test_plan_flags_the_strategy_does_not_use_are_refused_and_a_run_started_with_them_rebuilds_as_it_ran() -> None:
    result = thaw("plan", "--model", "resnet18", "--num-classes", "2", "--strategy", "feature-extract", "--lr-range", "1e-5:1e-2")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "thaw: error: lr_range (--lr-range) does nothing for feature-extract: its one stage trains the head at one lr, "
        "which lr (--lr) sets; drop it, or choose a strategy that uses it"
    ]
    result = thaw("plan", "--model", "resnet18", "--num-classes", "2", "--strategy", "fine-tune", "--head-epochs", "7", "--groups-per-stage", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("thaw: error: head_epochs (--head-epochs) and groups_per_stage (--groups-per-stage) do nothing for fine-tune")
    # a run an older thaw started so is rebuilt as it ran (without them) when a resume compares its options
    from thaw.cli import build_parser
    from thaw import ThawError
    from thaw.cli.options import TYPED_PLAN_FLAGS, plan_from_args

    recorded = build_parser().parse_args(["train", "DATA", "--model", "resnet18", "--strategy", "fine-tune", "--head-epochs", "7", "--epochs", "2"])
    setattr(recorded, TYPED_PLAN_FLAGS, [])  # none typed beside the resume
    plan = plan_from_args(recorded, num_groups=6, recorded=True)
    assert [(stage.name, stage.epochs) for stage in plan.stages] == [("all", 2)]
    setattr(recorded, TYPED_PLAN_FLAGS, ["--head-epochs"])  # typed beside the resume: checked as new
    with pytest.raises(ThawError, match=r"^head_epochs \(--head-epochs\) does nothing for fine-tune"):
        plan_from_args(recorded, num_groups=6, recorded=True)


def test_plan_top_groups_sets_the_middle_stage_and_is_refused_where_it_would_do_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--model", "mobilenet_v2", "--num-classes", "5", "--top-groups", "10", "--json"]) == 0
    head, top, everything = json.loads(capsys.readouterr().out)["stages"]
    assert top["name"] == "top10"
    assert [g["name"] for g in top["groups"] if g["trainable"]] == [f"features.{i}" for i in range(10, 19)] + ["head"]
    result = thaw("plan", "--model", "mobilenet_v2", "--num-classes", "5", "--top-groups", "20")  # all 20 groups: no top stage
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "thaw: error: top groups 20: the model has 20 groups, the head included, so that stage would train all of them, "
        "as the all stage after it does; give fewer than 20, or use two-phase"
    ]
    result = thaw("plan", "--model", "mobilenet_v2", "--num-classes", "5", "--top-groups", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["thaw: error: top groups must be a whole number of at least 2 (the head alone is the head stage), got 1"]
    # LoRA's options beside another strategy were ignored without a word (a dropout of 2 passed unchecked)
    result = thaw("plan", "--model", "mobilenet_v2", "--num-classes", "5", "--lora-dropout", "2", "--lora-rank", "4")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "thaw: error: --lora-dropout, --lora-rank set the LoRA adapters; the strategy here is head-top-all: drop them or add --strategy lora"
    ]
    # another strategy would ignore it without a word
    result = thaw("plan", "--model", "mobilenet_v2", "--num-classes", "5", "--strategy", "two-phase", "--top-groups", "4")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "thaw: error: --top-groups sets head-top-all's middle stage; the strategy here is two-phase: drop it or add --strategy head-top-all"
    ]

    plan_file = tmp_path / "plan.yaml"  # the file's stages say what trains
    plan_file.write_text("stages:\n  - {name: head, epochs: 1, train: [head], lr: 1.0e-3}\n")
    result = thaw("plan", "--model", "mobilenet_v2", "--num-classes", "5", "--config", str(plan_file), "--top-groups", "4")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "thaw: error: --top-groups sets head-top-all's middle stage, and --config gives the stages: drop one of them"
    ]


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
        # "$GROUP=5e-2" with GROUP unset: it set the head's lr without a word
        (["--model", "resnet50", "--lr", "=5e-2"], "argument --lr: '=5e-2' names no group before '='; give NAME=LR (a group or module name), or LR alone for the head"),
        (["--model", "resnet50", "--lr", "layer9=1e-3"], "'layer9' is neither a layer group nor a module"),
        (["--model", "resnet50", "--weights", "IMAGENET9"], "has no weights 'IMAGENET9'"),
        (["--model", "resnet50", "--config", "missing.yaml"], "cannot read plan file"),
        (["--model", "resnet50", "--batchnorm", "sometimes"], "invalid choice"),
        # one class is no classification task: training refuses such data, so the plan must not pass it
        (["--model", "resnet50", "--num-classes", "1"], "argument --num-classes: expected a whole number >= 2, got 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = thaw(*PLAN, *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


TINY_RUN = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--head-epochs", "1",
            "--epochs", "1", "--quiet", "--out", "TMP/run"]
LR_FIND = ["lr-find", "DATA", "--model", "mobilenet_v3_small", "--weights", "none", "--steps", "6", "--batch-size", "4"]
MOBILENET_PLAN = ["plan", "--model", "mobilenet_v3_small", "--num-classes", "3"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "DATA", *TINY_RUN, "--accumulate", "0"], "argument --accumulate: expected a whole number >= 1, got 0"),
        (["train", "DATA", *TINY_RUN, "--batch-size", "0"], "argument --batch-size: expected a whole number from 1 to 1048576, got 0"),
        (["train", "DATA", *TINY_RUN, "--batch-size", "-1"], "argument --batch-size: expected a whole number from 1 to 1048576, got -1"),
        (["train", "DATA", *TINY_RUN, "--batch-size", str(2**63)], f"argument --batch-size: expected a whole number from 1 to 1048576, got {2**63}"),
        ([*LR_FIND, "--batch-size", str(2**63)], f"argument --batch-size: expected a whole number from 1 to 1048576, got {2**63}"),
        (["train", "DATA", *TINY_RUN, "--head-epochs", "0", "--epochs", "0"], "has 0 epochs, so nothing would train"),
        (["train", "DATA", *TINY_RUN, "--epochs", "1" + "0" * 400], "argument --epochs: expected a whole number from 0 to 1000000, got 100000000000... (401 digits)"),
        (["train", "DATA", *TINY_RUN, "--model", "vit_b_16"], "vit_b_16 takes 224 px images only"),
        (["train", "DATA", *TINY_RUN, "--model", "alexnet", "--image-size", "16"], "alexnet cannot take 16 px images"),
        (["train", "DATA", *TINY_RUN, "--image-size", "100000"], "image size must be a whole number from 1 to 4096"),
        (["train", "DATA", *TINY_RUN, "--workers", "1000000000000"], "workers must be a whole number from 0 to 256"),
        (["train", "DATA", *TINY_RUN, "--cache-views", "1000000000000"], "cache views must be a whole number from 0 to 1000"),
        (["train", "DATA", *TINY_RUN, "--warmup", "nan", "--grad-clip", "0"], "2 problems: warmup must be a share"),
        (["train", "DATA", *TINY_RUN, "--device", "cuda:99"], "device 'cuda:99' (--device cuda:99): this machine has"),
        (["train", "DATA", *TINY_RUN, "--device", "bogus"], "device must be auto, cpu, cuda"),
        (["train", "DATA", *TINY_RUN, "--lr", "1e300"], "argument --lr: an lr must be a positive finite number up to 1000"),
        (["train", "DATA", *TINY_RUN, "--weight-decay", "1e30"], "lr x weight decay is 1e+27 in group 'head' (lr 0.001, weight decay 1e+30): each step"),
        ([*MOBILENET_PLAN, "--weight-decay", "1e30"], "lr x weight decay is 1e+27 in group 'head' (lr 0.001, weight decay 1e+30): each step"),
        (["train", "DATA", *TINY_RUN, "--val-split", "nan"], "argument --val-split: expected a share above 0 and below 1"),
        (["train", "DATA", *TINY_RUN, "--val-split", "0.5"], "val_split (--val-split) 0.5 would do nothing: DATA has a val folder, which is the val split"),
        (["train", "DATA", *TINY_RUN, "--out", ""], "argument --out: expected a path, got an empty string"),
        (["train", "DATA", *TINY_RUN, "--weights", ""], "argument --weights: expected a weights name, a file path or none, got an empty string"),
        ([*MOBILENET_PLAN, "--weights", " "], "argument --weights: expected a weights name"),
        ([*MOBILENET_PLAN, "--strategy", "lora", "--lora-alpha", "nan"], "argument --lora-alpha: expected a finite number, got nan"),
        ([*MOBILENET_PLAN, "--config", "TMP/decay.yaml"], "weight_decay: expected a weight decay >= 0"),
        ([*MOBILENET_PLAN, "--config", "TMP/smoothing.yaml"], "smoothing.yaml: training: label smoothing must be a share in [0, 1), got 2"),
        # a file's value against a typed flag: the file is named
        (["train", "DATA", *TINY_RUN[:6], "--config", "TMP/mixup.yaml", "--no-augment"], "(--no-augment) turns off; drop one of the two (mixup: from "),
        (["train", "DATA", *TINY_RUN[:6], "--config", "TMP/budget.yaml", "--compile"], "cannot run with a budget: the budget is planned from eager training steps and does not count compile time (budget: from "),  # the file key, and it alone
        ([*LR_FIND, "--out", "TMP"], "names a folder; name the plot file"),
        ([*LR_FIND, "--out", "TMP/plots.png/"], "plots.png/ names a folder; name the plot file"),  # wrote a file plots.png
        ([*LR_FIND, "--out", "TMP/plots/."], "plots/. names a folder; name the plot file"),  # wrote a file plots.png
        ([*LR_FIND, "--out", "-"], "--out - : the plot is written to a file, not to standard output"),  # wrote -.png
        ([*LR_FIND, "--out", "TMP/plot.xyz"], "cannot draw a .xyz file"),
        # a file (or a loop of links) where the plot's folder would be: "(File exists)" named neither
        ([*LR_FIND, "--out", "TMP/decay.yaml/lr.png"], "decay.yaml is there and is no folder (a file, or a link that leads to none)"),
        # the plot as an image of the data it tests: the next run would train on it
        ([*LR_FIND, "--out", "DATA/train/red/lr.png"], "is inside the data folder DATA: the plot would be read as an image of it"),
        ([*LR_FIND, "--end", "1e300"], "argument --end: an lr must be a positive finite number up to 1000"),
        (["demo", "--out", "TMP/decay.yaml"], "decay.yaml is not writable (a file, not a folder, is there)"),
        # argparse reads a value that starts with '-' as an option: say so, and how to pass it
        (["train", "DATA", *TINY_RUN, "--budget", "-5s"], "argument --budget: '-5s' starts with '-', so it reads as an option; write --budget=-5s"),
        (["train", "DATA", *TINY_RUN, "--budget=-5s"], "argument --budget: budget must be a time above 0, like 90s, 3m, 1.5h or 1h30m (a bare number is seconds), got '-5s'"),
        (["train", "DATA", *TINY_RUN, "--budget"], "argument --budget: expected one argument"),
        (["train", "DATA", *TINY_RUN, "--out", "DATA/train/red/run"], "is inside the data folder"),  # its plots: red images
        # where the word after it is an option after all, the value was left out: no hint
        (["train", "DATA", *TINY_RUN, "--budget", "--model=mobilenet_v2"], "argument --budget: expected one argument ("),
        (["train", "DATA", *TINY_RUN, "--budget", "--"], "argument --budget: expected one argument ("),
        ([*LR_FIND, "--out", "--ste", "4"], "argument --out: expected one argument ("),  # --ste: --steps, abbreviated
        (["train", "DATA", *TINY_RUN, "--budget", "5s", "--budget", "-5s"], "argument --budget: '-5s' starts with '-'"),
        (["train", "DATA", *TINY_RUN, "--budget", "-5s", "--budget", "-9s"], "argument --budget: '-5s' starts with '-'"),  # the first
    ],
)
def test_impossible_values_are_one_line_and_exit_2(
    args: list[str], expected: str, colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Values that crashed (or trained on nonsense) before: refused before any work, in one line."""
    monkeypatch.chdir(tmp_path)  # an empty path would otherwise mean the folder the tests run in
    (tmp_path / "decay.yaml").write_text("weight_decay: -0.1\nstages:\n  - {name: head, epochs: 1}\n")
    (tmp_path / "smoothing.yaml").write_text("stages: [{name: head, epochs: 1, train: [head], lr: 1.0e-3}]\ntraining: {label_smoothing: 2}\n")
    (tmp_path / "mixup.yaml").write_text("stages: [{name: head, epochs: 1, train: [head], lr: 1.0e-3}]\ntraining: {mixup: 0.2}\n")
    (tmp_path / "budget.yaml").write_text("stages: [{name: head, epochs: 1, train: [head], lr: 1.0e-3}]\ntraining: {budget: 3m, label_smoothing: 0.1}\n")
    argv = [arg.replace("DATA", str(colours)).replace("TMP", str(tmp_path)) for arg in args]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert expected.replace("DATA", str(colours)) in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_lr_find_never_writes_over_a_training_image_or_a_runs_file(colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((colours / "train" / "red").iterdir())[0]
    before = image.read_bytes()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thaw.json").write_text("{}")  # what makes a folder a run's, to every command
    (tmp_path / "run" / "curves.png").write_bytes(b"the run's curves")
    (tmp_path / "run" / "confusion-val.png").write_bytes(b"evaluate's picture")
    os.mkfifo(tmp_path / "pipe.png")
    for out, said in [
        (image, "is inside the data folder"),
        (colours / "train" / "new" / "lr.png", "is inside the data folder"),  # its folder would be an empty class
        (tmp_path / "run" / "curves.png", f"is a file of the run in {tmp_path / 'run'}; name another file"),
        (tmp_path / "run" / "confusion-val.png", f"is a file of the run in {tmp_path / 'run'}; name another file"),
        (tmp_path / "pipe.png", "is not a regular file (a device or a pipe); name a plot file"),
    ]:
        assert main([*LR_FIND[:1], str(colours), *LR_FIND[2:], "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert image.read_bytes() == before and not (colours / "train" / "new").exists()
    assert (tmp_path / "run" / "curves.png").read_bytes() == b"the run's curves" and (tmp_path / "pipe.png").is_fifo()

    # the user's files of a plot's name: a photo, a thesis, a JPEG (whose maker thaw cannot read) are never replaced
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "holiday.png")
    (tmp_path / "thesis.pdf").write_bytes(b"%PDF-1.7 the only copy")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "photo.jpg")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "photo.webp")
    not_ours = "exists and carries no mark of thaw lr-find (a plot from a thaw before the mark carries none, except a lr_find.png); name another file, or remove it first"
    for name, said in [
        ("holiday.png", not_ours),
        ("thesis.pdf", not_ours),
        ("photo.jpg", not_ours),
        ("photo.webp", "exists and a .webp file keeps no mark thaw writes, so thaw cannot tell its plot from yours"),
    ]:
        kept = (tmp_path / name).read_bytes()
        assert main([*LR_FIND[:1], str(colours), *LR_FIND[2:], "--out", str(tmp_path / name)]) == 2
        stderr = capsys.readouterr().err
        assert said in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert (tmp_path / name).read_bytes() == kept

    # allowed: the user's own plot in the run folder, made again; and the default lr_find.png from inside the data,
    # beside its class folders, where nothing is read
    assert main([*LR_FIND[:1], str(colours), *LR_FIND[2:], "--out", str(tmp_path / "run" / "lr_find.png"), "--steps", "7"]) == 0
    earlier = (tmp_path / "run" / "lr_find.png").read_bytes()
    assert main([*LR_FIND[:1], str(colours), *LR_FIND[2:], "--out", str(tmp_path / "run" / "lr_find.png")]) == 0
    write_class_images(tmp_path / "photos", per_class=4, size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path / "photos")
        assert main([*LR_FIND[:1], ".", *LR_FIND[2:]]) == 0
    assert (tmp_path / "photos" / "lr_find.png").is_file() and (tmp_path / "run" / "lr_find.png").read_bytes() != earlier
    listed = sorted((tmp_path / "photos" / "red").iterdir())[0]  # a manifest's image, outside any image folder given
    (tmp_path / "labels.csv").write_text("".join(f"{path},{path.parent.name}\n" for path in sorted((tmp_path / "photos").glob("*/*.png"))))
    kept = listed.read_bytes()
    assert main([*LR_FIND[:1], str(tmp_path / "labels.csv"), *LR_FIND[2:], "--out", str(listed)]) == 2
    assert f"--out {listed} is an image of the data" in capsys.readouterr().err and listed.read_bytes() == kept


def test_lr_find_offers_only_image_models(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    said = capsys.readouterr().out
    assert "timm/NAME" in said and "hf/ORG/NAME" not in said  # it refuses text tables: its help offered text encoders


def test_lr_find_tests_at_the_image_size_given(colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--image-size` as train takes it: the test runs at the size the run will train at, and a size the network
    cannot take is one line before any image is decoded."""
    import thaw.cli.lrfind_cmd as lrfind_cmd

    seen: list[tuple[int, ...]] = []
    built = lrfind_cmd.build_model

    def recording(*args, **kwargs):
        adapter = built(*args, **kwargs)
        adapter.model.register_forward_pre_hook(lambda _module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
        return adapter

    monkeypatch.setattr(lrfind_cmd, "build_model", recording)
    for size in (48, None):
        seen.clear()
        sized = ["--image-size", str(size)] if size else []
        assert main([*LR_FIND[:1], str(colours), *LR_FIND[2:], *sized, "--out", str(tmp_path / "lr.png"), "--json"]) == 0
        assert set(seen) == {(size or 224, size or 224)}, seen  # mobilenet_v3_small's own crop is 224 px
        assert json.loads(capsys.readouterr().out)["image_size"] == (size or 224)
    capsys.readouterr()
    seen.clear()
    assert main([*LR_FIND[:1], str(colours), "--model", "vit_b_16", "--weights", "none", "--image-size", "64", "--out", str(tmp_path / "v.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        "thaw: error: vit_b_16 takes 224 px images only (its position embeddings are learned for that size); leave image_size (--image-size) unset"
    )
    assert seen == [] and not (tmp_path / "v.png").exists()


def test_lr_find_warns_of_the_files_it_leaves_out(colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is no image (found as the data is listed) and a truncated JPEG (found as it is decoded) are said on
    stderr, as train says them; the test runs on the rest. Where no training image decodes: one line, exit 2."""
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "train" / "red" / "notes.jpg").write_text("not an image")
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # its header is whole in a third
    Image.fromarray(pixels).save(tmp_path / "whole.jpg", quality=95)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (data / "train" / "blue" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    assert main([*LR_FIND[:1], str(data), *LR_FIND[2:], "--out", str(tmp_path / "lr.png")]) == 0
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 2, warned
    assert warned[0].startswith("thaw: warning: skipped 1 unreadable file(s): ") and "notes.jpg" in warned[0]
    assert warned[1].startswith("thaw: warning: skipped 1 unreadable file(s): ") and "cut.jpg" in warned[1]

    for image in (data / "train").rglob("*.png"):
        image.unlink()
    for name in ("red", "green"):
        (data / "train" / name / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    assert main([*LR_FIND[:1], str(data), *LR_FIND[2:], "--out", str(tmp_path / "lr.png")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == "thaw: error: lr-find: no training image of the data decoded; replace or remove the files"
    assert said[-2].startswith("thaw: warning: skipped 3 unreadable file(s): ") and said[-2].count("cut.jpg") == 3  # named


def test_a_run_started_inside_its_data_folder_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cd photos && thaw train .`: the default --out (runs/...) would be a class folder of the next run's data."""
    write_class_images(tmp_path / "photos", per_class=4, size=16)
    monkeypatch.chdir(tmp_path / "photos")
    before = sorted(path.name for path in (tmp_path / "photos").iterdir())
    assert main(["train", ".", "--model", "mobilenet_v3_small", "--weights", "none"]) == 2
    assert "is inside the data folder .: the run's files would be read as images" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "photos").iterdir()) == before  # no runs/ left behind


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers; launch with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "3"}, "WORLD_SIZE=2 with RANK=3 and LOCAL_RANK=0 is not a process layout"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 with RANK=0 and LOCAL_RANK=0 is not a process layout"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set"),  # left over from SLURM, say
    ],
)
def test_broken_torchrun_variables_are_one_line(tmp_path: Path, variables: dict, expected: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")} | variables
    result = subprocess.run([sys.executable, "-m", "thaw", "train", str(tmp_path), "--model", "mobilenet_v2"],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"thaw: error: {expected}") and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("kind", ["plan", "manifest"])
def test_files_that_are_not_utf8_are_one_line(tmp_path: Path, kind: str) -> None:
    junk = tmp_path / ("plan.yaml" if kind == "plan" else "data.csv")
    junk.write_bytes(b"stages:\n  - {name: \xff\xfe head}\n" if kind == "plan" else b"path,label\n\xff\xfe.png,a\n")
    args = ["plan", "--model", "resnet18", "--num-classes", "2", "--config", str(junk)] if kind == "plan" else \
        ["train", str(junk), "--model", "mobilenet_v3_small", "--weights", "none", "--out", str(tmp_path / "run")]
    result = thaw(*args)
    assert result.returncode == 2 and "is not UTF-8 text (byte" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_models_lists_80_builders_and_offline_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert len(models) == 80
    mobilenet = {w["name"]: w for w in models["mobilenet_v2"]["weights"]}
    # The real file ships in an installed package, so it is usable offline.
    assert mobilenet["IMAGENET1K_V1"]["offline"] is True
    assert mobilenet["IMAGENET1K_V2"]["default"] is True
    # Text encoders are not in the list; how to name one is, in both outputs.
    assert main(["models"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "text: " + TEXT_MODELS
    assert main(["models", "--json"]) == 0 and json.loads(capsys.readouterr().out)["text"] == TEXT_MODELS
    assert "--task text --model FOLDER" in TEXT_MODELS and "hf/ORG/NAME" in TEXT_MODELS


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("", "EOFError"),  # torch's error for an empty file
        ("174812789", "EOFError: 174812789"),  # a number alone says nothing
        ("-----\n\x1b[1mWeights only load failed.\x1b[0m\x1b[K\nmore", "Weights only load failed."),
        (  # torch's error for a checkpoint cut short: a paragraph on one line, shown up to its last whole sentence
            "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal miniz "
            "error. If you are seeing this error, there is a high likelihood that your checkpoint file is corrupted. This can",
            "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal miniz error.",
        ),
        ("word " * 60, "word " * 38 + "word ..."),  # no sentence ends within the limit: whole words
        ("Expected input, e.g. a tensor " + "word " * 60, "Expected input, e.g. a tensor " + "word " * 32 + "word ..."),
        ("x" * 300, "x" * 196 + " ..."),  # no space at all: at the limit
    ],
)
def test_another_librarys_error_is_quoted_by_its_first_readable_line(message: str, expected: str) -> None:
    from thaw.errors import first_line

    assert first_line(EOFError(message)) == expected


@pytest.mark.parametrize("unbuffered", ["", "1"])  # Python's default buffers stdout in a pipe: the write fails at the end
def test_output_into_a_closed_pipe_ends_quietly(unbuffered: str) -> None:
    """`thaw models | head -1`: the reader is gone before thaw writes (it closes its end while torch loads)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    process = subprocess.Popen([sys.executable, "-m", "thaw", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()
    said = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, said  # 128 + SIGPIPE, as a shell reports `yes | head -1`
    assert said == ""  # no traceback, no "Exception ignored" at exit


def test_names_the_terminal_cannot_encode_are_written_escaped_not_a_traceback(tmp_path: Path) -> None:
    """PYTHONIOENCODING=ascii (or a Latin-1 locale) and a class or file name outside it: the work was done, then a
    UnicodeEncodeError traceback lost the output."""
    data = tmp_path / "d"
    for split, seed in (("train", 0), ("val", 1)):
        write_class_images(data / split, classes=("café", "tea"), per_class=3, size=16, seed=seed)
    run = tmp_path / "run"
    tiny = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "16", "--head-epochs", "1", "--epochs", "0"]
    assert main(["train", str(data), *tiny, "--out", str(run), "--quiet"]) == 0
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    command = [sys.executable, "-m", "thaw"]
    predicted = subprocess.run([*command, "predict", str(run), str(data / "val" / "café")], capture_output=True, text=True, env=env, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.splitlines()) == 3 and "caf\\xe9" in predicted.stdout
    missing = subprocess.run([*command, "predict", str(run), str(data / "café.png")], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "caf\\xe9.png does not exist" in missing.stderr
    c_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}  # ascii, surrogateescape
    predicted = subprocess.run([*command, "predict", str(run), str(data / "val" / "café")], capture_output=True, env=c_locale, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.splitlines()) == 3 and b"caf\\xe9" in predicted.stdout


@pytest.mark.parametrize("special", ["/dev/null", "FIFO"])
def test_a_pipe_or_a_device_given_as_data_or_weights_is_one_line(tmp_path: Path, colours: Path, special: str) -> None:
    """`thaw evaluate RUN <(make-manifest)` and /dev/null ended in NotADirectoryError's traceback; weights said 'does
    not exist'. A pipe is read once, and a run reads its data again (resume, the copy check): it is refused."""
    import os

    path = special
    if special == "FIFO":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    kind = "a character device" if special == "/dev/null" else "a named pipe"
    tiny = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--out", str(tmp_path / "run")]
    assert main(["train", str(colours), *tiny[:-1], str(tmp_path / "trained"), "--strategy", "feature-extract", "--epochs", "1", "--quiet"]) == 0
    for args, expected in (
        (["train", path, *tiny], f"thaw: error: data path {path} is {kind}, not a folder or a file; pass a folder, or save the manifest as a .csv file and pass that"),
        (["lr-find", path, *tiny[:4]], f"thaw: error: data path {path} is {kind}, not a folder or a file; pass a folder, or save the manifest as a .csv file and pass that"),
        (["evaluate", str(tmp_path / "trained"), path], f"thaw: error: data path {path} is {kind}, not a folder or a file; pass a folder, or save the manifest as a .csv file and pass that"),
        (["train", str(colours), *tiny[:2], "--weights", path, *tiny[4:]], f"thaw: error: weights file {path} is {kind}, not a regular file; pass a .pth/.pt/.safetensors file"),
    ):
        result = thaw(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["evaluate", "RUN", "DATA", "--splt", "test"], "thaw evaluate: error: unrecognized arguments: --splt test; did you mean --split? (see `thaw evaluate --help`)"),
        (["train", "DATA", "--plan", "plan.yaml"], "thaw train: error: unrecognized arguments: --plan plan.yaml; did you mean --config? (see `thaw train --help`)"),
        (["predict", "RUN", "a.png", "--topk", "2"], "thaw predict: error: unrecognized arguments: --topk 2; did you mean --top-k? (see `thaw predict --help`)"),
        (["train", "DATA", "--foo", "1"], "thaw train: error: unrecognized arguments: --foo 1 (see `thaw train --help`)"),
        (["evaluate", "RUN", "DATA", "--", "--json"], "thaw evaluate: error: unrecognized arguments: --json (see `thaw evaluate --help`)"),
        (["evaluate", "RUN", ""], "thaw evaluate: error: argument data: expected a path, got an empty string (see `thaw evaluate --help`)"),
    ],
)
def test_an_unknown_option_points_at_its_commands_help_and_the_option_it_likely_meant(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """`thaw --help` lists no command's options: the line names the command's own help, and a near miss."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and capsys.readouterr().err.strip() == said


def test_lr_find_that_fails_leaves_no_folder_it_made_for_the_plot(colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model bogus --out new/sub/plot.png` was one line, and left new/sub/ behind."""
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "sub" / "plot.png", tmp_path / "kept" / "sub" / "plot.png"):
        assert main(["lr-find", str(colours), "--model", "bogus", "--out", str(out)]) == 2
        assert "unknown model 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and sorted(tmp_path.iterdir()) == [tmp_path / "kept"]
    assert not any((tmp_path / "kept").iterdir())  # the folder that was there stays; the one made in it goes
