"""Shared set-up for the benchmark scripts."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"
SAMPLE_EVERY_S = 0.05  # RSS of each known process
PSS_EVERY_S = 0.5  # PSS walks the page tables (milliseconds for a few GB): sampled less often, so rows run undisturbed
SCAN_EVERY_S = 0.5  # finding new child processes reads every /proc entry (about 8 ms on a small VM)


_SCRATCH_ROOT: list[Path] = []  # this process's one folder of scratch folders, made on first use


def scratch(name: str) -> Path:
    """A fresh folder for run outputs, outside the repository. All of a benchmark's are deleted when it exits (each
    run folder is tens of MB, and the figures are read from them before); THAW_BENCH_KEEP=1 keeps them."""
    if not _SCRATCH_ROOT:
        _SCRATCH_ROOT.append(Path(tempfile.mkdtemp(prefix="thaw-bench-")))
        if os.environ.get("THAW_BENCH_KEEP") != "1":
            atexit.register(shutil.rmtree, _SCRATCH_ROOT[0], ignore_errors=True)
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # killed (timeout, kill): exit, so atexit runs
                signal.signal(signal.SIGTERM, lambda number, _frame: sys.exit(128 + number))
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_SCRATCH_ROOT[0]))


def native_bf16() -> bool:
    """Whether thaw's `--precision auto` trains in bf16 on this CPU, so that no row pays for emulated bf16."""
    import torch

    from thaw.train.fit import uses_bf16

    return uses_bf16("auto", torch.device("cpu"))


def offline_torch_home() -> None:
    """A private torch hub cache holding the offline MobileNetV2 file, so every row loads the same weights."""
    os.environ.setdefault("TORCH_HOME", str(scratch("torch-home")))
    from torchvision.models import MobileNet_V2_Weights

    from thaw.models.weights import ensure_cached

    ensure_cached(MobileNet_V2_Weights.IMAGENET1K_V1.url)


def same_allocator() -> None:
    """The malloc settings thaw's training gives its own process (thaw/_allocator.py), in this row's process:
    baselines get them too, since any PyTorch loop can have them (in the environment:
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615)."""
    from thaw._allocator import keep_freed_memory

    keep_freed_memory()


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def shrunk_copy(source: Path, per_class: int, classes: int | None = None) -> Path:
    """The first images of the first classes of every split (train/, val/, test/ where present), copied."""
    target = scratch("quick-data")
    for split in (name for name in ("train", "val", "test") if (source / name).is_dir()):
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir())[:classes]:
            (target / split / class_dir.name).mkdir(parents=True)
            for image in sorted(p for p in class_dir.iterdir() if p.is_file())[:per_class]:
                shutil.copy2(image, target / split / class_dir.name / image.name)
    return target


def tree_rss(tree: list[psutil.Process], proportional: bool = False) -> int:
    """Resident memory of `tree`; `proportional`: PSS, which counts a page shared by forked workers once overall."""
    total = 0
    for process in tree:
        try:
            total += proportional_set_size(process.pid) if proportional else process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            pass  # a worker that ended between two scans
    return total


def proportional_set_size(pid: int) -> int:
    """PSS from the kernel's own sum (smaps_rollup): far cheaper than psutil's walk over every mapping."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def run_with_peak_rss(command: list[str], proportional: bool = False) -> tuple[dict, int]:
    """Run `command` (which ends by printing one JSON line); its result and the largest RSS sum over its process tree."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = psutil.Popen(command, stdout=out, stderr=err, text=True)
        tree, peak, next_scan = [process], 0, 0.0
        while process.poll() is None:
            if time.monotonic() >= next_scan:
                try:
                    tree = [process, *process.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                next_scan = time.monotonic() + SCAN_EVERY_S
            peak = max(peak, tree_rss(tree, proportional))
            time.sleep(PSS_EVERY_S if proportional else SAMPLE_EVERY_S)
        out.seek(0)
        err.seek(0)
        if process.wait() != 0:
            raise SystemExit(f"{' '.join(command[1:4])} failed:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1]), peak
