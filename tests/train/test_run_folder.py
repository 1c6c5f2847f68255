"""The run folder under the training lock: what a killed write left there is removed, and nothing else."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from thaw.train.run_folder import LOCK, training_lock

KILLED_WRITES = [".checkpoint.pt.k2j3x8.tmp", ".model.safetensors.a1b2c3.tmp", ".thaw.json.zz9.tmp"]
KEPT = [
    ".report.html.q1w2e3.tmp",  # thaw report may be writing it now: it holds no training lock
    ".model.onnx.r4t5y6.tmp",  # and thaw export this
    ".notes.tmp", "checkpoint.pt", "model.safetensors", "mine.txt",  # the run's files and the user's own
]


def _write(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_taking_over_a_dead_process_lock_removes_the_temporary_copies_it_left_and_nothing_else(tmp_path: Path) -> None:
    # kill -9 mid-write leaves atomic_write's temporary file: a half-written checkpoint, kept for good beside the run.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": 0}))
    _write(tmp_path, KILLED_WRITES + KEPT)
    with training_lock(tmp_path):
        assert _names(tmp_path) == sorted(KEPT + [LOCK])
    assert _names(tmp_path) == sorted(KEPT)


def test_an_unlocked_folder_keeps_its_temporary_files(tmp_path: Path) -> None:
    # No lock: the last run may still be writing its final files (it leaves the lock before them), so nothing goes.
    _write(tmp_path, KILLED_WRITES + KEPT)
    with training_lock(tmp_path):
        assert _names(tmp_path) == sorted(KILLED_WRITES + KEPT + [LOCK])


def test_a_new_run_never_writes_over_files_of_a_runs_names_that_no_run_wrote(tiny_split_data: Path, tmp_path: Path) -> None:
    """The user's own metrics.csv, curves.png and report.html in --out were replaced by the new run's without a word."""
    import pytest

    from thaw.errors import ThawError
    from thaw.train import TrainConfig, train_images

    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("my own metrics\n")
    (out / "curves.png").write_bytes(b"my own plot")
    (out / "report.html").write_text("<html>my page</html>")  # thaw train --report wrote over it
    (out / "model.pt").write_bytes(b"my own model")  # an export's name: training never writes it
    (out / "command.json").write_text("{}")  # what a start killed before its first checkpoint leaves: not a user's file
    config = TrainConfig(image_size=32, batch_size=8, quiet=True)
    for resume in (False, True):  # a resume with no checkpoint there starts a new run
        with pytest.raises(ThawError, match=r"mine holds metrics.csv, curves.png, report.html but no run: the new run would write over them; move them away"):
            train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan="feature-extract", plan_options={"epochs": 1},
                         config=config, out=out, resume=resume)
    assert (out / "metrics.csv").read_text() == "my own metrics\n" and (out / "curves.png").read_bytes() == b"my own plot"
    (out / "metrics.csv").unlink(), (out / "curves.png").unlink(), (out / "report.html").unlink()
    (out / "model.safetensors").write_bytes(b"best weights of a start killed before its first checkpoint")
    train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan="feature-extract", plan_options={"epochs": 1},
                 config=config, out=out, resume=True)  # such a start resumes afresh, as it always did
    assert (out / "thaw.json").is_file() and (out / "model.pt").read_bytes() == b"my own model"


def test_the_commands_a_message_suggests_quote_a_folder_with_spaces(tmp_path: Path) -> None:
    """`continue with thaw train --resume moved/rk 2`, pasted into a shell, resumed nothing."""
    import shlex

    import pytest

    from thaw.errors import ThawError
    from thaw.train.fit import how_to_continue
    from thaw.train.run_folder import check_new_run

    out = tmp_path / "my runs" / "rk 2"
    out.mkdir(parents=True)
    (out / "thaw.json").write_text("{}")
    with pytest.raises(ThawError, match=f"continue it with --resume {shlex.quote(str(out))}, write"):
        check_new_run(out, overwrite=False)
    said = how_to_continue(out)
    assert f"thaw train --resume '{out}'" in said
    from thaw.cli.train_cmd import _resume_hint

    hint = _resume_hint(out, {"data_path": "/data/my photos"}, True)
    assert "`thaw train '/data/my photos' --out NEW_RUN`" in hint and f"--out '{out}' --overwrite" in hint
    assert f"`thaw train --resume '{out}'` alone" in _resume_hint(out, {}, False)
    assert shlex.split(said.split("thaw train ")[1].split(" (")[0]) == ["--resume", str(out)]


def test_a_run_that_cannot_be_written_is_not_told_to_choose_another_out_on_resume(
    tiny_split_data: Path, tmp_path: Path, monkeypatch,
) -> None:
    """A resume of a run on a read-only mount said 'choose another (out, --out)', which a resume cannot do."""
    import errno

    import pytest

    from tests.conftest import Crash, crash_after
    from thaw.errors import ThawError
    from thaw.train import TrainConfig, train_images

    run, config = tmp_path / "run", TrainConfig(image_size=32, batch_size=8, quiet=True)
    plan = {"plan": "feature-extract", "plan_options": {"epochs": 2}}
    with pytest.raises(Crash):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, config=config, out=run, callbacks=[crash_after(1)], **plan)
    written = Path.write_text

    def read_only(path: Path, *args: object, **kwargs: object) -> int:
        if path.name == ".thaw-write-test":
            raise OSError(errno.EROFS, "Read-only file system")
        return written(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(ThawError, match=r"is not writable \(Read-only file system\); make it writable, or copy the run to a folder you can write"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, config=config, out=run, resume=True, **plan)
    with pytest.raises(ThawError, match=r"is not writable \(Read-only file system\); choose another \(out, --out\)"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, config=config, out=tmp_path / "new", **plan)
