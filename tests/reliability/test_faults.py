"""Kills, Ctrl-C, NaN and full disks: nothing lost, and resumed runs end where whole runs do."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import save_file
import torch
from torch import nn

from tests.conftest import RunsCode, SmallConvNet, ctrl_c_in_the_next_epoch
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import RunInterrupted, fit

PLAN = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(data: Path, out: Path, config: TrainConfig = CONFIG, **options):
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=config, out=out, **options)


# after_epoch 1: inside the cached head stage; 3: inside the full stage.
# workers 2: images decoded in worker processes, the default on machines of 4 cores or more.
@pytest.mark.parametrize(("after_epoch", "accumulate", "workers"), [(1, 1, 0), (1, 2, 0), (3, 1, 0), (3, 2, 0), (3, 1, 2)])
def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(
    tiny_split_data: Path, tmp_path: Path, after_epoch: int, accumulate: int, workers: int
) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "accumulate": accumulate, "batch_size": 4, "workers": workers})
    _train(tiny_split_data, tmp_path / "whole", config)

    with pytest.raises(RunInterrupted, match=f"--resume {tmp_path / 'cut'}"):
        _train(tiny_split_data, tmp_path / "cut", config, **ctrl_c_in_the_next_epoch(after_epoch))
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["batch"] == accumulate  # the step in flight finished, then it stopped
    resumed = _train(tiny_split_data, tmp_path / "cut", config, resume=True)
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))
    assert len(resumed.history) == 4


# One batch an epoch: every step is an epoch's last. after_epoch 2: the head stage's last epoch, so the stop comes
# between the stages, before the full stage's set-up.
@pytest.mark.parametrize(
    ("after_epoch", "when", "said", "entered"),
    [
        (1, "after the epoch", "in stage 'head', after epoch 1", [0]),
        (1, "in its last step", "in stage 'head', after epoch 1", [0]),
        (1, "in its val pass", "in stage 'head', after epoch 1", [0]),
        (2, "after the epoch", "after stage 'head', before 'all'", [0]),
        (3, "in its last step", "in stage 'all', after epoch 1", [0, 1]),
    ],
)
def test_ctrl_c_in_an_epochs_last_step_stops_at_its_end_and_resumes_exactly(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_epoch: int, when: str, said: str, entered: list[int]
) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 64})
    _train(tiny_split_data, tmp_path / "whole", config)
    fit_module = sys.modules["thaw.train.fit"]  # `thaw.train.fit` the attribute is the function
    steps, passes, stages_entered = [], [], []
    real_evaluate, real_enter = fit_module.evaluate, fit_module.Trainer._enter

    def press_in_the_step(_optimizer, step: int, _factor: float) -> None:
        steps.append(step)
        if when == "in its last step" and len(steps) == after_epoch:
            os.kill(os.getpid(), signal.SIGINT)

    def press_in_the_val_pass(*args, **options):
        passes.append(True)
        if when == "in its val pass" and len(passes) == after_epoch:
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **options)

    def press_after_the_epoch(state) -> None:
        if when == "after the epoch" and len(state.history) == after_epoch:
            os.kill(os.getpid(), signal.SIGINT)

    def enter(self, stage_index: int, *args):
        stages_entered.append(stage_index)
        return real_enter(self, stage_index, *args)

    monkeypatch.setattr(fit_module, "evaluate", press_in_the_val_pass)
    monkeypatch.setattr(fit_module.Trainer, "_enter", enter)
    with pytest.raises(RunInterrupted, match=rf"^interrupted {said}; a checkpoint is saved: continue with thaw train --resume {tmp_path / 'cut'} "):
        _train(tiny_split_data, tmp_path / "cut", config, callbacks=[press_after_the_epoch], step_hooks=[press_in_the_step])
    assert stages_entered == entered  # between stages: stopped before the next one's set-up
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert "batch" not in saved and len(saved["history"]) == after_epoch  # stopped at that epoch's end
    resumed = _train(tiny_split_data, tmp_path / "cut", config, resume=True)
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))
    assert len(resumed.history) == 4


@pytest.mark.parametrize(
    ("stages", "said", "entered"),
    [
        # a stage of 0 epochs between: not set up before the stop is taken
        ((("head", 2), ("nothing", 0), ("all", 2)), "interrupted after stage 'head', before 'nothing'", [0]),
        # a stage of 0 epochs at the end: nothing is left to run, so the run finishes
        ((("head", 2), ("all", 2), ("nothing", 0)), None, [0, 1, 2]),
    ],
)
def test_ctrl_c_before_a_stage_of_no_epochs(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: tuple, said: str | None, entered: list[int]
) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 64})  # one step an epoch
    plan = Plan(tuple(Stage(name, epochs, ("head",) if name == "head" else ("all",), ConstantLr(1e-3), batchnorm="eval")
                      for name, epochs in stages))
    fit_module = sys.modules["thaw.train.fit"]
    stages_entered, real_enter = [], fit_module.Trainer._enter

    def enter(self, stage_index: int, *args):
        stages_entered.append(stage_index)
        return real_enter(self, stage_index, *args)

    monkeypatch.setattr(fit_module.Trainer, "_enter", enter)
    last_step_of_the_trained_stage = 2 if said else 4
    steps: list[int] = []

    def press(_optimizer, step: int, _factor: float) -> None:
        steps.append(step)
        if len(steps) == last_step_of_the_trained_stage:
            os.kill(os.getpid(), signal.SIGINT)

    run = lambda **options: train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config,
                                         out=tmp_path / "run", **options)
    if said is None:
        assert len(run(step_hooks=[press]).history) == 4 and (tmp_path / "run" / "thaw.json").is_file()
        assert stages_entered == entered
        return
    with pytest.raises(RunInterrupted, match=f"^{said}; a checkpoint is saved"):
        run(step_hooks=[press])
    assert stages_entered == entered
    assert len(run(resume=True).history) == 4


def test_the_resume_line_under_torchrun_keeps_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of several processes resumes with as many: `thaw train --resume` alone would start one."""
    from thaw.train.fit import interrupted_before_training

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    alone = interrupted_before_training(tmp_path, None)
    assert alone == f"interrupted; the checkpoint in {tmp_path} is intact: continue with thaw train --resume {tmp_path} (from Python: resume_run({str(tmp_path)!r}))"
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    said = interrupted_before_training(tmp_path, "under torchrun")
    assert said == (f"interrupted under torchrun; the checkpoint in {tmp_path} is intact: continue with the same torchrun command plus "
                    f"--resume {tmp_path}, without --overwrite (from Python: resume_run({str(tmp_path)!r}))")


def test_ctrl_c_in_the_runs_last_step_lets_it_finish(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is left to stop: the run ends as finished (its model delivered), not as interrupted, and says so
    after the line that promised a checkpoint to resume from."""
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 64, "quiet": False})  # one step an epoch, 4 epochs
    steps: list[int] = []

    def press_in_the_last_step(_optimizer, step: int, _factor: float) -> None:
        steps.append(step)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    result = _train(tiny_split_data, tmp_path / "run", config, step_hooks=[press_in_the_last_step])
    assert len(steps) == 4 and len(result.history) == 4 and (tmp_path / "run" / "thaw.json").is_file()
    said = capsys.readouterr().out.splitlines()
    promised = said.index("thaw: finishing the current step to save a resumable checkpoint (Ctrl-C again to abort)")
    assert said[promised + 1:] == ["the stop came as the run's last epoch ended: nothing was left to train, so the run ends complete"]


def test_sigterm_stops_a_run_as_ctrl_c_does_and_the_handlers_are_given_back(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM (kill, timeout, docker stop, a scheduler's preemption) finishes the step, saves and says how to resume;
    after the run, the caller's own handlers are back."""
    _train(tiny_split_data, tmp_path / "whole")
    caught: list[int] = []
    callers = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: lambda number, _frame: caught.append(number)}
    previous = signal.signal(signal.SIGTERM, callers[signal.SIGTERM])  # as a caller's own handler; a run without one: pytest ends

    # Inside the full stage; twice, as `timeout` does (the process, then its group): still one stop.
    stop = ctrl_c_in_the_next_epoch(3, signal.SIGTERM, times=2)
    try:
        with pytest.raises(RunInterrupted, match=f"--resume {tmp_path / 'cut'}") as stopped:
            _train(tiny_split_data, tmp_path / "cut", **stop)
        assert {number: signal.getsignal(number) for number in callers} == callers  # the caller's handlers are back
        os.kill(os.getpid(), signal.SIGTERM)
        assert caught == [signal.SIGTERM]  # and the run's handler took the two sent during the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.signal_number == signal.SIGTERM
    # what aborts it: a second SIGTERM does nothing, and a scheduler's user may have no Ctrl-C to press again
    assert "thaw: SIGTERM: finishing the current step to save a resumable checkpoint (SIGINT (Ctrl-C) or SIGKILL to abort)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == 1  # the step in flight finished, then it stopped
    _train(tiny_split_data, tmp_path / "cut", resume=True)
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))


def _cli_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "thaw", "train", str(data), "--model", "mobilenet_v3_small", "--weights", "none",
            "--image-size", "32", "--batch-size", "4", "--strategy", "two-phase", "--head-epochs", "2", "--epochs", "3",
            "--out", str(out), "--quiet", *extra]


def _cli_train(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cli_train_args(data, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_new_checkpoint(path: Path, previous: int | None, process: subprocess.Popen) -> int | None:
    """Block until the running process writes a newer checkpoint (or exits); its mtime."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.stat().st_mtime_ns != previous:
            return path.stat().st_mtime_ns
        time.sleep(0.01)
    return previous


def test_kill_9_at_any_point_then_resume_ends_with_the_same_weights(tiny_split_data: Path, tmp_path: Path) -> None:
    whole = _cli_train(tiny_split_data, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    run, checkpoint = tmp_path / "killed", tmp_path / "killed" / "checkpoint.pt"
    landed, written = [], None
    # The first kill lands during start-up (no checkpoint yet); each later one just after the
    # resumed process writes an epoch, then a little later: data loading, a step, the next write.
    for after in (None, 0.0, 0.05, 0.2, 0.4):
        process = _cli_train(tiny_split_data, run, "--resume", str(run))
        if after is None:
            time.sleep(1.0)
        else:
            written = _wait_for_new_checkpoint(checkpoint, written, process)
            time.sleep(after)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if checkpoint.exists():
            saved = load_checkpoint(checkpoint)  # never damaged
            written = checkpoint.stat().st_mtime_ns
            landed.append((saved["stage"], saved["epoch"], (run / "thaw.json").exists()))
    assert any(not finished for *_, finished in landed), "no kill landed inside the run"
    final = _cli_train(tiny_split_data, run, "--resume", str(run))
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert _same(_weights(tmp_path / "whole"), _weights(run))


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapter = adapt(SmallConvNet(), num_classes=3)
    calls = {"n": 0}

    def poison_after_a_while(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 12 else output

    adapter.model.classifier.register_forward_hook(poison_after_a_while)
    config = TrainConfig(batch_size=8, quiet=True, cache=False, image_size=16)
    plan = Plan((Stage("all", 5, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    with pytest.raises(ThawError, match=r"loss became nan at all 2/5, batch \d+.*Lower the lr"):
        fit(adapter, discover(tiny_split_data), plan, config, tmp_path / "run", meta={"model": "small"})
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(t.float()).all() for t in saved["model"].values())


@pytest.mark.parametrize("weight_decay, blamed", [(1e30, True), (0.05, False)])
def test_a_nan_loss_from_a_huge_weight_decay_says_to_lower_it(tiny_split_data: Path, tmp_path: Path, weight_decay: float, blamed: bool) -> None:
    """`--weight-decay 1e30` ended in a NaN line that named only the lr."""
    from thaw.train.loop import decay_advice

    torch.manual_seed(0)
    adapter = adapt(SmallConvNet(), num_classes=3)
    plan = Plan((Stage("all", 2, ("all",), ConstantLr(1e-3), batchnorm="eval", weight_decay=weight_decay),))
    config = TrainConfig(batch_size=8, quiet=True, cache=False, image_size=16)
    if not blamed:  # a NaN of another cause (here, poisoned logits) with a usual decay: the lr line alone
        adapter.model.classifier.register_forward_hook(lambda _module, _inputs, output: output * float("nan"))
    with pytest.raises(ThawError, match=r"loss became nan at all 1/2, batch \d") as stopped:
        fit(adapter, discover(tiny_split_data), plan, config, tmp_path / "run", meta={"model": "small"})
    advice = "; above all, lower the weight decay (weight_decay, --weight-decay): lr x weight decay is 1e+27 and must stay well below 1"
    assert str(stopped.value).endswith(advice) == blamed and "Lower the lr" in str(stopped.value)
    optimizer = torch.optim.AdamW([{"params": [torch.zeros(1)], "lr": 1e-3, "weight_decay": weight_decay}])
    assert (decay_advice(optimizer) != "") == blamed


def test_full_disk_while_checkpointing_leaves_the_previous_checkpoint(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save, calls = torch.save, {"n": 0}

    def disk_fills_up(obj, target, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(target).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(ThawError, match="No space left on device; the previous file is intact"):
        _train(tiny_split_data, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["epoch"] == 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_loading_a_run_never_unpickles(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.export.run_dir import load_run

    _train(tiny_split_data, tmp_path / "run")

    def refuse(*args, **kwargs):
        raise AssertionError("load_run must not use torch.load / pickle")

    monkeypatch.setattr(torch, "load", refuse)
    adapter, meta = load_run(tmp_path / "run")
    assert meta["classes"] == ["blue", "green", "red"] and isinstance(adapter.model, nn.Module)



def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": RunsCode()}, path)
    with pytest.raises(ThawError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_an_empty_checkpoint_file_is_one_line(tmp_path: Path) -> None:
    """A file cut to nothing (a full disk outside thaw's writes, a copy that failed): torch's error has no message."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    with pytest.raises(ThawError, match=r"cannot read checkpoint .* \(EOFError\); start a new run"):
        load_checkpoint(path)


def test_non_finite_weights_are_never_written(tiny_split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapter = adapt(SmallConvNet(), num_classes=3)
    steps = {"n": 0}

    def poison_a_weight(optimizer, step, factor) -> None:
        steps["n"] += 1
        if steps["n"] == 10:  # the last step of epoch 2 (5 a epoch): no training loss sees it
            with torch.no_grad():
                adapter.model.block1[0].weight[0, 0, 0, 0] = float("nan")

    config = TrainConfig(batch_size=8, quiet=True, cache=False, image_size=16)
    plan = Plan((Stage("all", 3, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    with pytest.raises(ThawError, match=r"1 trainable tensors hold NaN or inf after stage 'all' epoch 2 \(first: block1.0.weight\)"):
        fit(adapter, discover(tiny_split_data), plan, config, tmp_path / "run", meta={"model": "small"}, step_hooks=[poison_a_weight])
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(t.float()).all() for t in saved["model"].values())


def test_saved_files_get_the_usual_permissions_and_a_folder_that_cannot_be_made_is_one_error(tmp_path: Path) -> None:
    """Written through a private temporary file, a saved file still reads like any other (umask 022: 0644)."""
    import os

    from thaw._io import atomic_write

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "saved.txt", lambda target: target.write_text("weights"))
        assert (tmp_path / "saved.txt").stat().st_mode & 0o777 == 0o644
        # safetensors writes a file of its own in the temporary's place: the model file a server reads
        atomic_write(tmp_path / "model.safetensors", lambda target: save_file({"w": torch.zeros(2)}, str(target)))
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
        (tmp_path / "a file").write_text("where a folder should be")
        with pytest.raises(ThawError, match=r"could not write .*a file/report.html: [^;]*$"):  # no previous file to call intact
            atomic_write(tmp_path / "a file" / "report.html", lambda target: target.write_text("page"))
        with pytest.raises(ThawError, match=r"could not write .*: File name too long$"):  # one line, not the OSError
            atomic_write(tmp_path / ("x" * 300) / "report.html", lambda target: target.write_text("page"))
    finally:
        os.umask(mask)


def test_thaw_train_given_sigterm_by_its_group_exits_143_in_one_line_and_resumes_exactly(tiny_split_data: Path, tmp_path: Path) -> None:
    """As `timeout` stops a job: SIGTERM to the process, then to its whole group, the 2 decoding workers included
    (the default on 4 cores or more). The workers outlive it, the step in flight finishes, the checkpoint is saved,
    one line says so, the exit is 143, and nothing of the group is left running."""
    longer = ("--epochs", "8", "--workers", "2")  # a window after the first checkpoint that a signal cannot miss
    whole = _cli_train(tiny_split_data, tmp_path / "whole", *longer)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    run = tmp_path / "stopped"
    args = [*_cli_train_args(tiny_split_data, run), *longer]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    written = None
    for _epoch in range(3):  # into the full stage, where the decoding workers live from epoch to epoch
        written = _wait_for_new_checkpoint(run / "checkpoint.pt", written, process)
    assert written is not None and process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal.SIGTERM)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.stderr.read()  # 128 + SIGTERM, as a shell reports a signal's end
    said = process.stderr.read().decode()  # (torch may warn first about more workers than cores)
    assert "Traceback" not in said and said.count("thaw: ") == 1 and "thaw: interrupted" in said, said
    assert f"a checkpoint is saved: continue with thaw train --resume {run}" in said
    # Stopped inside an epoch, or at its end where the signal came in its last step or val pass (the in-process tests
    # above cover each): the resume is exact either way.
    _wait_until_gone(process.pid)
    # Resumed with 2 workers too: the worker count sets the training process's threads, and so the float sums' order.
    resume = [sys.executable, "-m", "thaw", "train", "--resume", str(run), "--workers", "2", "--quiet"]
    final = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert _same(_weights(tmp_path / "whole"), _weights(run))


def test_an_error_the_stop_brought_about_ends_the_run_as_the_stop_does(tiny_split_data: Path, tmp_path: Path) -> None:
    """Where a job's SIGTERM also ends a decoding worker (elsewhere than Linux), the next batch fails: the run ends
    as stopped, one line naming both, with the last epoch's checkpoint; an error without a stop stays an error."""
    def raising_at_step(count: int, message: str, after_sigterm: bool) -> Callable[[object, int, float], None]:
        steps: list[int] = []

        def hook(_optimizer, step: int, _factor: float) -> None:
            steps.append(step)
            if len(steps) == count:  # 6: in the second epoch, the first one's checkpoint is there
                if after_sigterm:
                    os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError(message)
        return hook

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # without the run's handler, the test fails, not pytest
    try:
        with pytest.raises(RunInterrupted, match=r"interrupted by SIGTERM, which also ended this: DataLoader worker .*--resume") as stopped:
            worker_gone = raising_at_step(6, "DataLoader worker (pid 1234) is killed by signal: Terminated.", after_sigterm=True)
            _train(tiny_split_data, tmp_path / "run", step_hooks=[worker_gone])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.signal_number == signal.SIGTERM
    assert "batch" not in load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # an epoch's end: nothing mid-step was saved

    with pytest.raises(RuntimeError, match="a bug"):
        _train(tiny_split_data, tmp_path / "other", step_hooks=[raising_at_step(6, "a bug", after_sigterm=False)])

    # What torch passes on from a worker whose dataset raised is a bug, stop or not.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(RuntimeError, match="Caught RuntimeError in DataLoader worker process 0"):
            dataset_bug = raising_at_step(6, "Caught RuntimeError in DataLoader worker process 0.", after_sigterm=True)
            _train(tiny_split_data, tmp_path / "third", step_hooks=[dataset_bug])
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_ends_torch_compiles_compiler_ends_the_run_as_the_stop_does(
    tiny_split_data: Path, tmp_path: Path, stop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`timeout` (SIGTERM to the job) or Ctrl-C (SIGINT to the terminal's group) while --compile builds its C++ kills
    the compiler too: the step fails with the compiler's error (from the forward's catch, or raw from the lazily
    compiled backward), which was a 1,200-line traceback or a line blaming --compile. The run ends as stopped, with
    the last epoch's checkpoint; without a stop, the failure is torch.compile's one line."""
    import torch._inductor.exc

    from thaw.train.compiled import compile_failed

    killed = torch._inductor.exc.CppCompileError(["g++", "kernel.cpp"], "g++: fatal error: Killed signal terminated program cc1plus")
    # --compile's run, its forward eager: the failures come from the hook, as a killed compiler's would
    trainer_module = sys.modules["thaw.train.fit"]  # the package's `fit` names the function, not this module
    monkeypatch.setattr(trainer_module, "compiled_forward", lambda module: module)
    monkeypatch.setattr(trainer_module, "compile_problem", lambda device, task: None)
    compiling = TrainConfig(**{**CONFIG.__dict__, "compile": True})

    def failing_at_step(count: int, error: Exception, signum: int | None) -> Callable[[object, int, float], None]:
        steps: list[int] = []

        def hook(_optimizer, step: int, _factor: float) -> None:
            steps.append(step)
            if len(steps) == count:  # in the second epoch: the first one's checkpoint is there
                if signum is not None:
                    os.kill(os.getpid(), signum)
                raise error
        return hook

    previous = signal.signal(stop, lambda *_: None)  # without the run's handler, the test fails, not pytest
    try:
        for name, error in (("forward", compile_failed(killed)), ("backward", killed)):
            with pytest.raises(RunInterrupted) as stopped:
                _train(tiny_split_data, tmp_path / name, compiling, step_hooks=[failing_at_step(6, error, stop)])
            assert str(stopped.value) == (
                f"interrupted by {signal.Signals(stop).name}, which also ended torch.compile's compiler (CppCompileError: C++ compile error); "
                f"the checkpoint in {tmp_path / name} is intact: continue with thaw train --resume {tmp_path / name} "
                f"(from Python: resume_run({str(tmp_path / name)!r}))"
            )
            assert stopped.value.signal_number == stop
    finally:
        signal.signal(stop, previous)
    with pytest.raises(ThawError, match=r"^torch.compile failed \(CppCompileError: C\+\+ compile error; TORCHDYNAMO_VERBOSE=1"):
        _train(tiny_split_data, tmp_path / "no-stop", compiling, step_hooks=[failing_at_step(6, killed, None)])
    # without --compile, such an error is not thaw's compile (a model's own compiled part): it stays what it is
    with pytest.raises(torch._inductor.exc.CppCompileError):
        _train(tiny_split_data, tmp_path / "not-compiling", step_hooks=[failing_at_step(6, killed, None)])


def _wait_until_gone(group: int) -> None:
    """Every process of the group has ended (within 30 s): no decoding worker outlives the stopped run."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} still run 30 s after the run stopped")


def test_a_signal_during_the_clean_up_waits_for_it_then_reaches_the_caller(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C as a finished run ends its workers is not swallowed, and does not cut the clean-up short: it is
    raised once the run has cleaned up, with the caller's handler back."""
    fit_module = sys.modules["thaw.train.fit"]  # `thaw.train.fit` the attribute is the function

    real_stop_workers, finished = fit_module.stop_workers, []

    def ctrl_c_meanwhile(*loaders) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_stop_workers(*loaders)
        finished.append(True)

    monkeypatch.setattr(fit_module, "stop_workers", ctrl_c_meanwhile)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_split_data, tmp_path / "run")
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # The run had trained to its end: the signal waited for its files too, so it is complete, not left unfinished.
    assert (tmp_path / "run" / "thaw.json").is_file() and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_finished_run_is_written_comes_after_its_last_file(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int
) -> None:
    """Cut between two files, the run lost its end (no thaw.json) though it had trained to it."""
    import thaw.train as train_module
    from thaw.cli import main

    real_write_run, written = train_module.write_run, []

    def signal_meanwhile(*args, **options):
        os.kill(os.getpid(), signum)
        written.append(real_write_run(*args, **options))
        return written[-1]

    caught: list[tuple[int, bool]] = []  # the signal, and whether the run's record was written when it came
    run = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, lambda number, _frame: caught.append((number, (run / "thaw.json").is_file())))
    try:
        monkeypatch.setattr(train_module, "write_run", signal_meanwhile)
        code = main(["train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
                     "--batch-size", "8", "--head-epochs", "1", "--epochs", "1", "--quiet", "--out", str(run)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert written and (run / "thaw.json").is_file()
    if signum == signal.SIGINT:  # to the default handler: the command exits 130, saying the run is complete
        assert code == 130
        assert capsys.readouterr().err.strip() == f"thaw: interrupted as the run ended, after its files were written: {run} is complete; use it with thaw evaluate, predict or export"
    else:  # delivered to the caller's handler (the command's default one ends the process) once the files were there
        assert code == 0 and caught == [(signal.SIGTERM, True)]


def test_a_write_removes_the_temporary_copies_that_killed_writers_of_its_file_left_and_no_other(tmp_path: Path) -> None:
    """kill -9 mid-write (a `thaw report`, an export's metadata) left a hidden `.report.html.*.tmp` for good: the next
    write of that file removes those of processes gone on this machine; a live writer's, another machine's and
    another file's stay."""
    import os
    import socket
    import subprocess
    import sys

    from thaw._io import atomic_write

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    here = socket.gethostname()
    killed = tmp_path / f".report.html.{here}-{dead}-abc123.tmp"
    live = tmp_path / f".report.html.{here}-{os.getpid()}-def456.tmp"  # a write still going on
    elsewhere = tmp_path / f".report.html.another-host-{dead}-ghi789.tmp"  # its process cannot be checked
    longer_name = tmp_path / f".report.html.{here}-99999-{dead}-jkl012.tmp"  # a machine named {here}-99999
    other_file = tmp_path / f".thaw.json.{here}-{dead}-mno345.tmp"  # another file's: its own write removes it
    # no writer's tag: a pid past any process's (int() of it overflowed the kill) and a Unicode digit (int() refused it)
    huge, unicode_digit = tmp_path / f".report.html.{here}-{'9' * 30}-pqr678.tmp", tmp_path / f".report.html.{here}-\u00b2-stu901.tmp"
    for leftover in (killed, live, elsewhere, longer_name, other_file, huge, unicode_digit):
        leftover.write_text("half a page")
    atomic_write(tmp_path / "report.html", lambda target: target.write_text("the page"))
    kept = [live.name, elsewhere.name, longer_name.name, other_file.name, huge.name, unicode_digit.name]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["report.html", *kept])
    atomic_write(tmp_path / "thaw.json", lambda target: target.write_text("{}"))
    assert not other_file.exists()


def test_a_write_goes_on_where_a_leftover_cannot_be_removed_or_the_name_leaves_no_room_for_the_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's killed write in a shared folder (sticky /tmp) cannot be removed: this write still happens. A name
    near the 255-byte limit that wrote before the temporary copies were tagged still writes."""
    import socket
    import subprocess
    import sys
    from pathlib import Path as RealPath

    from thaw._io import atomic_write

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    theirs = tmp_path / f".out.safetensors.{socket.gethostname()}-{dead}-abc123.tmp"
    theirs.write_text("another user's")
    real_unlink = RealPath.unlink

    def refused(self: RealPath, missing_ok: bool = False) -> None:
        if self == theirs:
            raise PermissionError(1, "Operation not permitted")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(RealPath, "unlink", refused)
    atomic_write(tmp_path / "out.safetensors", lambda target: target.write_text("mine"))
    assert (tmp_path / "out.safetensors").read_text() == "mine" and theirs.exists()
    monkeypatch.undo()
    longest = tmp_path / ("n" * 241)  # "." + name + "." + 8 random + ".tmp" = 255 bytes: the most one name may hold
    atomic_write(longest, lambda target: target.write_text("fits"))
    assert longest.read_text() == "fits"
