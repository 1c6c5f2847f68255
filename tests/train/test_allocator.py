"""Training, evaluation and prediction keep freed memory for the next batch (glibc's malloc settings): applied
where they exist, never a change in what is computed. Each check runs in a fresh process: the settings are the
whole process's."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import python_path_with_repo, write_class_images
from thaw._allocator import OPT_OUT

ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
LARGE = 64 * 2**20  # bytes: above any mmap threshold glibc allows (32 MB at most)

# Where malloc put a large block: glibc's own count of bytes in mmap'd blocks (mallinfo2, glibc 2.33+).
WHERE_LARGE_BLOCKS_GO = f"""
import ctypes, json, torch
from thaw._allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
applied = keep_freed_memory()
before = mallinfo2().hblkhd
block = torch.empty({LARGE}, dtype=torch.uint8)
print(json.dumps({{"applied": applied, "mapped": mallinfo2().hblkhd - before}}))
"""

TRAIN = """
import sys, torch
import thaw._allocator as allocator
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images
plan = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 1, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
config = TrainConfig(image_size=64, batch_size=8, quiet=True, workers=0, seed=0)
train_images(sys.argv[1], model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=sys.argv[2])
print(allocator._applied, allocator.given_back)
"""

# Resident memory inside a block that frees 256 MB, and after it.
HANDED_BACK = """
import torch
import thaw._allocator as allocator
def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096
with allocator.memory_kept_between_steps():
    block = torch.ones(256 * 2**20, dtype=torch.uint8)
    del block
    inside = resident()
print(inside - resident())
"""


def python(code: str, *args: str, opt_out: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != OPT_OUT} | {"PYTHONPATH": python_path_with_repo()} | (env or {})
    if opt_out:
        environment[OPT_OUT] = "0"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)


def has_mallinfo2() -> bool:
    return GLIBC and tuple(int(part) for part in platform.libc_ver()[1].split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not has_mallinfo2(), reason="the settings are glibc's; glibc 2.33 or later reports where blocks went")
@pytest.mark.parametrize("opt_out", [False, True])
def test_large_blocks_come_from_the_heap_unless_the_user_opts_out(opt_out: bool) -> None:
    done = python(WHERE_LARGE_BLOCKS_GO, opt_out=opt_out)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["applied"] is not opt_out
    if opt_out:
        assert seen["mapped"] >= LARGE  # malloc as it was: a fresh mapping, unmapped again when freed
    else:
        assert seen["mapped"] == 0  # from the heap, where the next step finds it again


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's: elsewhere there is nothing to compare")
def test_the_trained_weights_are_the_same_with_malloc_as_it_was(tmp_path: Path) -> None:
    """The run that keeps freed memory fills every block malloc hands out or takes back with junk (glibc's
    perturb), so a tensor read before it was written would change the weights; the other run's fresh
    mappings are zeros."""
    data = write_class_images(tmp_path / "data", per_class=8, size=64)
    runs = {"kept": tmp_path / "kept", "as-it-was": tmp_path / "as-it-was"}
    done = python(TRAIN, str(data), str(runs["kept"]), env={"GLIBC_TUNABLES": "glibc.malloc.perturb=165"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "1"]  # applied, and the free memory handed back once, at the end
    done = python(TRAIN, str(data), str(runs["as-it-was"]), opt_out=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "0"]
    kept, as_it_was = (torch.load(out / "checkpoint.pt", weights_only=True)["model"] for out in runs.values())
    assert kept.keys() == as_it_was.keys()
    assert all(torch.equal(kept[name], as_it_was[name]) for name in kept)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize("opt_out", [False, True])
def test_freed_memory_stays_while_thaw_works_and_goes_back_when_it_ends(opt_out: bool) -> None:
    done = python(HANDED_BACK, opt_out=opt_out)
    assert done.returncode == 0, done.stderr[-2000:]
    handed_back = int(done.stdout.split()[-1])
    if opt_out:
        assert handed_back < 32 * 2**20  # malloc as it was: unmapped at once, inside the block
    else:
        assert handed_back > 200 * 2**20  # kept inside the block, handed back at its end


APPLIED_BY = """
import sys
import thaw._allocator as allocator
from thaw.export.inference import evaluate_run, predict_files
from thaw.export.run_dir import load_run
adapter, meta = load_run(sys.argv[1])
if sys.argv[3] == "evaluate":
    evaluate_run(adapter, meta, sys.argv[2], split="val")
else:
    predict_files(adapter, meta["classes"], sorted(__import__("pathlib").Path(sys.argv[2]).rglob("*.png"))[:2])
print(allocator._applied, allocator.given_back)
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluation_and_prediction_keep_freed_memory_too(tmp_path: Path, command: str) -> None:
    data = write_class_images(tmp_path / "data", per_class=8, size=32)
    done = python(TRAIN, str(data), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = python(APPLIED_BY, str(tmp_path / "run"), str(data), command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "1"]
