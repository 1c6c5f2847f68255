"""Folders and files thaw may not read (another user's, on a shared server): one line and exit 2, not a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import write_class_images

# Root reads any file whatever its mode: setpriv drops that bypass for the command, so it meets the modes as a user does.
AS_A_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


@pytest.fixture
def file_modes_apply() -> None:
    """Root without setpriv reads every file whatever its mode: no file can be made unreadable to test with."""
    if AS_A_USER and shutil.which("setpriv") is None:
        pytest.skip("running as root, and without setpriv (util-linux) to drop root's bypass of file modes")


@pytest.fixture
def unreadable(tmp_path: Path, file_modes_apply: None) -> Iterator[Path]:
    folder = write_class_images(tmp_path / "data", per_class=4, size=32)
    folder.chmod(0)
    yield folder
    folder.chmod(0o755)  # so that pytest can remove it


def _thaw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_A_USER, sys.executable, "-m", "thaw", *args], capture_output=True, text=True, timeout=300)


def test_an_unreadable_data_folder_is_one_line(unreadable: Path, tmp_path: Path) -> None:
    done = _thaw("train", str(unreadable), "--model", "mobilenet_v3_small", "--weights", "none", "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"thaw: error: cannot access {unreadable} (permission denied); check its permissions"
    assert not (tmp_path / "run").exists()  # a refused start leaves no run folder behind


def test_an_unreadable_run_folder_is_one_line(unreadable: Path) -> None:
    done = _thaw("predict", str(unreadable), "photo.jpg")  # a run folder whose thaw.json cannot be looked at
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(f"thaw: error: cannot access {unreadable}") and "\n" not in done.stderr.strip()


def test_an_unreadable_class_folder_is_named(unreadable: Path, tmp_path: Path) -> None:
    unreadable.chmod(0o755)
    (unreadable / "red").chmod(0)
    try:
        done = _thaw("train", str(unreadable), "--model", "mobilenet_v3_small", "--weights", "none", "--out", str(tmp_path / "run"))
    finally:
        (unreadable / "red").chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"thaw: error: cannot access {unreadable / 'red'} (permission denied); check its permissions"


def test_an_unreadable_folder_inside_a_class_is_listed_as_skipped_not_passed_over(unreadable: Path, tmp_path: Path) -> None:
    """rglob passed over a folder it could not list: its images were left out of training without a word."""
    unreadable.chmod(0o755)
    inside = unreadable / "red" / "more"
    inside.mkdir()
    inside.chmod(0)
    try:
        done = _thaw(
            "train", str(unreadable), "--model", "mobilenet_v3_small", "--weights", "none", "--strategy", "feature-extract",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "run"),
        )
        strict = _thaw("train", str(unreadable), "--model", "mobilenet_v3_small", "--weights", "none", "--strict", "--out", str(tmp_path / "strict"))
    finally:
        inside.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert f"thaw: warning: skipped 1 unreadable file(s): {inside} (a folder thaw cannot list: permission denied)" in done.stderr
    assert strict.returncode == 2 and str(inside) in strict.stderr and not (tmp_path / "strict").exists()


def test_a_folder_inside_a_class_that_may_be_listed_but_not_entered_is_skipped_not_a_traceback(unreadable: Path, tmp_path: Path) -> None:
    """Mode 644 on a folder: its names can be read, its files not even looked at; is_file() raised PermissionError."""
    unreadable.chmod(0o755)
    inside = unreadable / "red" / "more"
    inside.mkdir()
    (inside / "a.png").write_bytes((unreadable / "red" / sorted(p.name for p in (unreadable / "red").iterdir() if p.is_file())[0]).read_bytes())
    inside.chmod(0o644)
    try:
        done = _thaw(
            "train", str(unreadable), "--model", "mobilenet_v3_small", "--weights", "none", "--strategy", "feature-extract",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "run"),
        )
    finally:
        inside.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert f"thaw: warning: skipped 1 unreadable file(s): {inside / 'a.png'} (Permission denied)" in done.stderr


def test_an_unreadable_weights_file_in_a_run_is_named_as_such_not_as_damaged(tmp_path: Path, file_modes_apply: None) -> None:
    """safetensors says 'No such file' for a file it may not read: thaw said the run's weights were damaged."""
    data = write_class_images(tmp_path / "data", per_class=4, size=32)
    trained = subprocess.run(
        [sys.executable, "-m", "thaw", "train", str(data), "--model", "mobilenet_v3_small", "--weights", "none", "--strategy",
         "feature-extract", "--epochs", "1", "--image-size", "32", "--quiet", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    weights = tmp_path / "run" / "model.safetensors"
    weights.chmod(0)
    try:
        done = _thaw("predict", str(tmp_path / "run"), str(data / "red"))
    finally:
        weights.chmod(0o644)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"thaw: error: cannot access {weights} (permission denied); check its permissions"


def test_a_download_into_a_hub_cache_thaw_may_not_write_says_so(tmp_path: Path, file_modes_apply: None) -> None:
    """Online, into a torch hub cache another user owns: the cache is the problem, not the download."""
    published = tmp_path / "published" / "tiny-0123abcd.pth"
    published.parent.mkdir()
    torch.save({"weight": torch.arange(6.0)}, published)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoints.chmod(0o555)
    fetch = (
        "from thaw.errors import ThawError\nfrom thaw.models.weights import ensure_cached\n"
        f"try:\n    ensure_cached({published.as_uri()!r})\nexcept ThawError as error:\n    print(error)\n"
    )
    try:
        done = subprocess.run(
            [*AS_A_USER, sys.executable, "-c", fetch], capture_output=True, text=True, timeout=120,
            env=os.environ | {"TORCH_HOME": str(tmp_path / "torch")},
        )
    finally:
        checkpoints.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"cannot write the torch hub cache {checkpoints} (Permission denied); set TORCH_HOME")
