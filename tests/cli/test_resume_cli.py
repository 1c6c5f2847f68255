"""`thaw train --resume RUN`: the run's own settings, no other flag needed; contradicting flags refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_cli import thaw
from tests.conftest import Crash, crash_after, ctrl_c_in_the_next_epoch
from thaw import ThawError
from thaw.cli import main
from thaw.train import TrainConfig, train_images
from thaw.train.checkpoint import load_checkpoint

TINY = [
    "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--strategy", "two-phase", "--head-epochs", "1",
    "--epochs", "1",
]


def _crashed_after_one_epoch(data: Path, run: Path, strategy: str, plan_options: dict) -> Path:
    """A run of the CLI's settings above, by `strategy`, that crashed after its first epoch."""
    with pytest.raises(Crash):
        train_images(
            data, model="mobilenet_v3_small", weights=None, plan=strategy, plan_options=plan_options,
            config=TrainConfig(image_size=32, batch_size=8, quiet=True), out=run, callbacks=[crash_after(1)],
        )
    return run


@pytest.fixture
def cut_run(tiny_split_data: Path, tmp_path: Path) -> Path:
    """A two-phase run (the CLI's settings above) that crashed after its first epoch."""
    return _crashed_after_one_epoch(tiny_split_data, tmp_path / "cut", "two-phase", {"head_epochs": 1, "epochs": 1})


def test_resume_needs_no_other_flag_and_ends_like_the_uninterrupted_run(cut_run: Path, tiny_split_data: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(whole), "--quiet"]) == 0
    assert main(["train", "--resume", str(cut_run), "--quiet", "--workers", "0"]) == 0  # runtime options may differ
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(cut_run / "checkpoint.pt")
    assert len(b["history"]) == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_same_command_plus_resume_is_accepted(cut_run: Path, tiny_split_data: Path) -> None:
    assert main(["train", str(tiny_split_data), *TINY, "--resume", str(cut_run), "--quiet"]) == 0


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-size", "16"], "batch-size (the run: 8, now: 16)"),
        (["--seed", "1", "--accumulate", "2"], "accumulate (the run: 1, now: 2); seed (the run: 0, now: 1)"),
        (["--strategy", "two-phase", "--epochs", "4"], "the plan's epochs per stage ['head', 'all'] (the run: [1, 1], now: [3, 4])"),  # untyped --head-epochs is the default, 3
        (["--model", "resnet18"], "model (the run: 'mobilenet_v3_small', now: 'resnet18')"),
        (["--no-augment"], "augment (the run: True, now: False)"),
        (["--out", "elsewhere"], "name two runs"),
        (["--test-split", "0.2"], "--test-split: text options, and this is an image run (a resume cannot change it); drop them"),  # an image run records none: it was ignored
    ],
)
def test_options_that_contradict_the_run_are_one_line(cut_run: Path, extra: list[str], expected: str) -> None:
    result = thaw("train", "--resume", str(cut_run), *extra)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_strategy_typed_on_resume_is_refused_for_its_plan_not_for_epochs_typed_when_the_run_began(
    tiny_split_data: Path, tmp_path: Path,
) -> None:
    # The run's own --head-epochs 1 --epochs 2, given to feature-extract's one stage, were blamed as typed together.
    run = _crashed_after_one_epoch(tiny_split_data, tmp_path / "cut", "two-phase", {"head_epochs": 1, "epochs": 2})
    (run / "command.json").write_text(json.dumps({"plan_options": {"strategy": "two-phase", "head_epochs": 1, "epochs": 2}}))
    result = thaw("train", "--resume", str(run), "--strategy", "feature-extract")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the plan's stages (the run: ['head', 'all'], now: ['head'])" in result.stderr, result.stderr


def test_a_feature_extract_run_started_with_epochs_resumes_with_its_strategy_typed_again(tiny_split_data: Path, tmp_path: Path) -> None:
    # Its --epochs 2 set the head stage; typing the strategy again rebuilt that stage with the default 3 epochs.
    run = _crashed_after_one_epoch(tiny_split_data, tmp_path / "cut", "feature-extract", {"epochs": 2})
    (run / "command.json").write_text(json.dumps({"plan_options": {"strategy": "feature-extract", "epochs": 2}}))
    assert main(["train", "--resume", str(run), "--strategy", "feature-extract", "--quiet"]) == 0


def test_typed_options_that_agree_with_the_run_are_accepted(tiny_split_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    one_epoch = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--epochs", "0"]
    assert main(["train", str(tiny_split_data), *one_epoch, "--out", str(run), "--quiet"]) == 0
    # Only some of the run's plan options typed, each with the run's value: nothing contradicts.
    assert main(["train", "--resume", str(run), "--epochs", "0", "--lr", "1e-3", "--precision", "auto", "--quiet"]) == 0


def test_a_run_stopped_mid_epoch_resumes_from_the_command_line_exactly(tiny_split_data: Path, tmp_path: Path) -> None:
    from thaw.train.fit import RunInterrupted

    whole = tmp_path / "whole"
    assert main(["train", str(tiny_split_data), *TINY, "--batch-size", "4", "--out", str(whole), "--quiet"]) == 0

    cut = tmp_path / "cut"
    with pytest.raises(RunInterrupted):
        train_images(
            tiny_split_data, model="mobilenet_v3_small", weights=None, plan="two-phase", plan_options={"head_epochs": 1, "epochs": 1},
            config=TrainConfig(image_size=32, batch_size=4, quiet=True), out=cut, **ctrl_c_in_the_next_epoch(1),
        )
    assert load_checkpoint(cut / "checkpoint.pt")["batch"] > 0  # stopped inside an epoch
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    a, b = load_checkpoint(whole / "checkpoint.pt")["model"], load_checkpoint(cut / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_and_without_data_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    result = thaw("train", "--resume", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "holds no checkpoint of a run (--resume takes the folder a run wrote, its --out)" in result.stderr
    assert "needs DATA and --model" in result.stderr
    assert main(["train", "--resume", str(tmp_path / "typo")]) == 2
    assert f"--resume {tmp_path / 'typo'}: no such run folder" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    (tmp_path / "empty" / "thaw.json").write_text("{}")  # a file of a run, not its folder
    assert main(["train", "--resume", str(tmp_path / "empty" / "thaw.json")]) == 2
    assert f"--resume {tmp_path / 'empty' / 'thaw.json'} is a file of a run; pass the run's folder, {tmp_path / 'empty'}" in capsys.readouterr().err


def test_ctrl_c_outside_training_says_whether_there_is_a_checkpoint(
    cut_run: Path, tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while a run sets up (before training catches it): a new run has nothing to resume, a resumed one names its folder."""
    from thaw.cli import train_cmd

    def pressed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "_train", pressed)
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(tmp_path / "new")]) == 130
    assert "nothing to resume; run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folder it had started is removed again
    assert main(["train", "--resume", str(cut_run)]) == 130
    assert f"checkpoint in {cut_run} is intact: continue with thaw train --resume {cut_run}" in capsys.readouterr().err
    # Replacing a finished run: its thaw.json is still there while the new one sets up; the new run is not "complete".
    monkeypatch.undo()
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(tmp_path / "old"), "--quiet"]) == 0
    monkeypatch.setattr(train_cmd, "_train", pressed)
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(tmp_path / "old"), "--overwrite"]) == 130
    said = capsys.readouterr().err
    assert "thaw: interrupted" in said and "is complete" not in said


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_says_what_ctrl_c_left(
    rank: str, said: bool, tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C reaches every rank: one line for the run, not one per process."""
    from thaw.cli import train_cmd

    def pressed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "_train", pressed)
    layout = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for name, value in layout.items():
        monkeypatch.setenv(name, value)
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(tmp_path / "new")]) == 130
    assert ("nothing to resume" in capsys.readouterr().err) == said
    # any command stopped outside thaw train's own handling: the plain "interrupted" line
    monkeypatch.setattr(train_cmd, "register", lambda commands: commands.add_parser("train").set_defaults(handler=pressed))
    assert main(["train"]) == 130
    assert ("thaw: interrupted" in capsys.readouterr().err) == said


CTRL_C_WHILE_TORCH_LOADS = """
import sys

class PressedWhileTorchLoads:  # the import system asks this finder first: Ctrl-C as torch starts to load
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, PressedWhileTorchLoads())
from thaw.cli import main  # as the installed `thaw` command starts

sys.exit(main(["plan", "--model", "mobilenet_v2", "--num-classes", "2"]))
"""


@pytest.mark.parametrize("rank, said", [(None, True), ("1", False)])
def test_ctrl_c_while_python_loads_torch_is_one_line_not_a_traceback(rank: str | None, said: bool) -> None:
    """torch takes seconds to import: the command must start without it, so that Ctrl-C then ends as any other."""
    env = {key: value for key, value in os.environ.items() if key != "RANK"} | ({"RANK": rank} if rank else {})
    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_TORCH_LOADS], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    assert result.stderr == ("thaw: interrupted\n" if said else "")


def test_resume_of_a_finished_run_says_so_and_leaves_every_file_as_it_was(cut_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from thaw.train import resume_run

    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    capsys.readouterr()
    before = _files(cut_run)
    assert main(["train", "--resume", str(cut_run)]) == 0
    assert _files(cut_run) == before  # not one byte rewritten (thaw.json's wall_s and images_per_s were)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"{cut_run} is complete (delivered epoch ") and "nothing left to resume" in said[0]
    assert main(["train", "--resume", str(cut_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
    again = resume_run(cut_run)  # Python: the run's result, as recorded
    recorded = json.loads((cut_run / "thaw.json").read_text())
    assert again.best["epoch"] == recorded["best"]["epoch"] and again.wall_s == recorded["wall_s"] and len(again.history) == 2
    assert _files(cut_run) == before


@pytest.mark.parametrize(
    "damage, said",
    [(b"[1, 2]", "damaged (no best, plan)"), (b"{\"best\": ", "damaged (not JSON)"),
     (b"{\"best\": null, \"plan\": {}}", "damaged (best is not a dict)"),
     (b"{\"best\": {}, \"plan\": {}}", "damaged (best has no epoch and val record)")],
)
def test_resume_of_a_finished_run_with_a_damaged_record_is_one_line(
    damage: bytes, said: str, cut_run: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    (cut_run / "thaw.json").write_bytes(damage)
    capsys.readouterr()
    assert main(["train", "--resume", str(cut_run)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"thaw: error: {cut_run / 'thaw.json'} is {said}; restore it from a copy, or train again with --overwrite"


@pytest.mark.parametrize("damage, said", [(None, "has no model.safetensors, though its thaw.json says the run finished"),
                                          (b"cut", "model.safetensors is damaged (")])
def test_resume_of_a_finished_run_without_usable_weights_is_not_called_complete(
    damage: bytes | None, said: str, cut_run: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """thaw evaluate, predict and export refuse such a run: --resume must not send the user there."""
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    weights = cut_run / "model.safetensors"
    weights.unlink() if damage is None else weights.write_bytes(damage)
    capsys.readouterr()
    assert main(["train", "--resume", str(cut_run)]) == 2
    error = capsys.readouterr().err.strip()
    assert said in error and error.endswith("; retrain or restore it from a copy") and "is complete" not in error


def test_resume_of_a_finished_run_with_other_data_says_that_data_was_not_read(
    cut_run: Path, tiny_split_data: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    capsys.readouterr()
    assert main(["train", str(colours), "--resume", str(cut_run)]) == 0
    said = capsys.readouterr().out.strip()
    assert said.endswith(f"({colours} was not read: the run was trained on {tiny_split_data.resolve()}; a new run on it needs another --out)")
    assert main(["train", str(tiny_split_data), "--resume", str(cut_run)]) == 0  # its own data: nothing to add
    assert capsys.readouterr().out.strip().endswith("or train anew with --overwrite")
    assert main(["train", str(colours), "--resume", str(cut_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_not_read"] == str(colours)


def test_resume_of_a_finished_run_with_a_damaged_checkpoint_says_its_model_is_intact(
    cut_run: Path, tiny_split_data: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The checkpoint holds what training on needs; a finished run delivered its model in other files. Starting anew
    (what an unfinished run's damaged checkpoint calls for) would throw that model away."""
    from thaw.train import resume_run

    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    (cut_run / "checkpoint.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "--resume", str(cut_run)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"thaw: error: cannot read checkpoint {cut_run / 'checkpoint.pt'} (EOFError); the run is complete and the model "
                     "it delivered is in its other files: use the run with thaw evaluate, predict or export")
    with pytest.raises(ThawError, match="the run is complete and the model it delivered is in its other files"):
        resume_run(cut_run)
    assert main(["evaluate", str(cut_run), str(tiny_split_data), "--json"]) == 0  # as the line says
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] >= 0


@pytest.mark.parametrize(
    "extra, said",
    [(["--report"], "there is nothing to train before a report; write it with thaw report"),
     (["--log", "tensorboard"], "there is no training left to log (--log tensorboard)")],
)
def test_resume_of_a_finished_run_refuses_what_only_training_would_do(
    extra: list[str], said: str, cut_run: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # finishes it
    before = _files(cut_run)
    capsys.readouterr()
    assert main(["train", "--resume", str(cut_run), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"thaw: error: {cut_run} is complete: {said}" + (f" {cut_run}" if "report" in said else "")
    assert _files(cut_run) == before and not (cut_run / "tensorboard").exists()


def _files(run: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in run.iterdir() if path.is_file()}


def test_a_data_path_typed_on_resume_that_does_not_exist_is_blamed_as_typed(
    cut_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    typo = tmp_path / "nope"
    assert main(["train", "--resume", str(cut_run), str(typo)]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"thaw: error: {typo} does not exist") and "the run's data was at" not in said


def test_a_bare_import_thaw_still_reaches_every_name_and_subpackage() -> None:
    # The package loads its names on first use; what `import thaw` gave before must still be there (thaw.plan.X too).
    probe = "import thaw; print(thaw.plan.ExplicitLr.__name__, thaw.models.build_model.__name__, thaw.adapt.__name__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ExplicitLr", "build_model", "adapt"]
    everything = subprocess.run([sys.executable, "-c", "from thaw import *; print(Plan.__name__, build_plan.__name__)"],
                                capture_output=True, text=True, timeout=120)
    assert everything.stdout.split() == ["Plan", "build_plan"], everything.stderr
    missing = subprocess.run([sys.executable, "-c", "import thaw; thaw.no_such_name"], capture_output=True, text=True, timeout=120)
    assert "module 'thaw' has no attribute 'no_such_name'" in missing.stderr


def test_a_feature_extract_run_an_older_thaw_started_resumes_with_the_same_command(tiny_split_data: Path, tmp_path: Path) -> None:
    # Before feature-extract took --head-epochs, `--strategy feature-extract --epochs 2` recorded head_epochs 3 (the
    # default, untyped) beside it; the same command plus --resume met "two numbers for one stage" it never typed.
    run = _crashed_after_one_epoch(tiny_split_data, tmp_path / "cut", "feature-extract", {"epochs": 2})
    (run / "command.json").write_text(json.dumps({"plan_options": {"strategy": "feature-extract", "epochs": 2, "head_epochs": 3}}))
    same = [str(tiny_split_data), *TINY[:8], "--strategy", "feature-extract", "--epochs", "2", "--quiet"]
    assert main(["train", *same, "--resume", str(run)]) == 0
    assert len(load_checkpoint(run / "checkpoint.pt")["history"]) == 2


def test_a_permission_refusal_after_a_checkpoint_says_how_to_continue(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run folder made read-only mid-run (a quota script, another user): one line that keeps the way back."""
    import thaw.train.checkpoint as checkpoint

    run, save = tmp_path / "run", checkpoint.save_checkpoint
    saved: list[Path] = []

    def read_only_after_the_first(path: Path, state: dict) -> None:
        if saved:
            raise PermissionError(13, "Permission denied", str(path))
        save(path, state)
        saved.append(path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", read_only_after_the_first)
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"thaw: error: cannot access {run / 'checkpoint.pt'} (permission denied); check its permissions, then continue with "
        f"thaw train --resume {run} (from Python: resume_run({str(run)!r}))"
    )
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the way it names works


def test_a_second_run_into_the_folder_another_thaw_trains_into_is_refused_and_touches_nothing(
    tiny_split_data: Path, tmp_path: Path
) -> None:
    """Two runs started into one --out both ran to the end: the folder held one of them, the other was lost unsaid."""
    import socket

    from thaw.train.run_folder import LOCK

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process: the one training
    try:
        (run / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": 0}))
        (run / "command.json").write_text('{"plan_options": {}}')  # the first run's typed options: a refusal must keep them
        second = thaw("train", str(tiny_split_data), *TINY, "--out", str(run), "--overwrite")
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"{run} is being trained into by another thaw (process {sleeper.pid}, since " in second.stderr
        assert sorted(path.name for path in run.iterdir()) == sorted([LOCK, "command.json"])  # nothing written, nothing undone
    finally:
        sleeper.kill()
        sleeper.wait()
    # The process gone (kill -9 left its lock): the next run takes the lock over, trains, and leaves no lock behind.
    assert main(["train", str(tiny_split_data), *TINY, "--out", str(run), "--overwrite", "--quiet"]) == 0
    assert (run / "thaw.json").is_file() and not (run / LOCK).exists()


def test_resume_given_the_data_folder_is_refused_and_writes_nothing_there(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume DATA` with DATA and --model (as the line for --resume DATA alone reads) starts a run in the folder it
    names: in the data folder its plots would be read as images of a class by the next run, as --out DATA is refused."""
    before = sorted(path.relative_to(tiny_split_data) for path in tiny_split_data.rglob("*"))
    args = ["train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--epochs", "1"]
    assert main([*args, "--resume", str(tiny_split_data)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"thaw: error: --resume {tiny_split_data} is the data folder: the run's files would be read as images by the next run "
        "on it; --resume takes the folder a run wrote; drop it to start a run in --out"
    )
    assert main([*args, "--resume", str(tiny_split_data / "train" / "red" / "run")]) == 2  # where its folder is a class
    assert f"is inside the data folder {tiny_split_data}" in capsys.readouterr().err
    assert sorted(path.relative_to(tiny_split_data) for path in tiny_split_data.rglob("*")) == before
