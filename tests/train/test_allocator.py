"""Training keeps freed memory for the next step (glibc's malloc settings): applied where they exist, never a
change in what is computed. Each check runs in a fresh process: the settings are the whole process's."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_class_images
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
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images
plan = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 1, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
config = TrainConfig(image_size=32, batch_size=8, quiet=True, workers=0, seed=0)
train_images(sys.argv[1], model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=sys.argv[2])
"""


def python(code: str, *args: str, opt_out: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != OPT_OUT} | {"PYTHONPATH": str(ROOT)}
    if opt_out:
        env[OPT_OUT] = "0"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


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


def test_the_trained_weights_are_the_same_with_malloc_as_it_was(tmp_path: Path) -> None:
    data = write_class_images(tmp_path / "data", per_class=8, size=32)
    runs = {"kept": tmp_path / "kept", "as-it-was": tmp_path / "as-it-was"}
    for name, out in runs.items():
        done = python(TRAIN, str(data), str(out), opt_out=name == "as-it-was")
        assert done.returncode == 0, done.stderr[-2000:]
    kept, as_it_was = (torch.load(out / "checkpoint.pt", weights_only=True)["model"] for out in runs.values())
    assert kept.keys() == as_it_was.keys()
    assert all(torch.equal(kept[name], as_it_was[name]) for name in kept)
