"""The run folder under the training lock: what a killed write left there is removed, and nothing else."""

from __future__ import annotations

from pathlib import Path

from thaw.train.run_folder import LOCK, training_lock


def test_taking_the_lock_removes_the_temporary_copies_a_killed_training_left_and_nothing_else(tmp_path: Path) -> None:
    # kill -9 mid-write leaves atomic_write's temporary file: a half-written checkpoint, kept for good beside the run.
    killed_writes = [".checkpoint.pt.k2j3x8.tmp", ".model.safetensors.a1b2c3.tmp", ".thaw.json.zz9.tmp"]
    kept = [
        ".report.html.q1w2e3.tmp",  # thaw report may be writing it now: it holds no training lock
        ".model.onnx.r4t5y6.tmp",  # and thaw export this
        ".notes.tmp", "checkpoint.pt", "model.safetensors", "mine.txt",  # the run's files and the user's own
    ]
    for name in killed_writes + kept:
        (tmp_path / name).write_bytes(b"x")
    with training_lock(tmp_path):
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept + [LOCK])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)
