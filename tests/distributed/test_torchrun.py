"""Real processes under torchrun (CPU, gloo): unfreezing under DDP, identical ranks, failures, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_class_images
from thaw import ThawError, distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds; a hang fails the test instead of the CI job


def torchrun(*args: str, processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment, cwd=ROOT)


def single(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=TIMEOUT, env=environment, cwd=ROOT)


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = write_class_images(root / "data", per_class=16, size=48)
    return {"data": data, "root": root, "env": {"TORCH_HOME": str(root / "torch_home")}}


@pytest.fixture(scope="module")
def two_process_run(setting: dict) -> Path:
    out = setting["root"] / "ddp"
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_unfrozen_parameters_train_and_stay_identical_across_ranks_every_step(two_process_run: Path) -> None:
    zero, one = ranks(two_process_run)
    assert len(zero["log"]) == len(one["log"]) > 0
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]  # every step, every trainable tensor
    unfrozen = [s["body"] for s in zero["log"] if s["body"] is not None]
    assert unfrozen and len(set(unfrozen)) == len(unfrozen)  # the newly trainable layers move at every step
    assert zero["log"][-1]["trainable"] > zero["log"][0]["trainable"]  # the plan did unfreeze
    assert zero["history"] == one["history"]  # metrics are reduced over ranks: both see the same numbers
    assert zero["cached"] == [True, True, False, False]  # the head stage trained on features cached in shards


def test_two_processes_match_one_process_with_the_same_global_batch(setting: dict, two_process_run: Path) -> None:
    out = setting["root"] / "single"
    done = single(str(setting["data"]), str(out), "--batch-size", "16", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads((out / "rank0.json").read_text())
    together = ranks(two_process_run)[0]
    assert len(alone["log"]) == len(together["log"])  # as many optimizer steps
    assert abs(alone["best"] - together["best"]) <= 0.1
    # Only rank 0 wrote the run folder.
    assert (two_process_run / "model.safetensors").is_file() and (two_process_run / "thaw.json").is_file()


def test_resume_under_torchrun_ends_where_the_uninterrupted_run_ends(setting: dict, two_process_run: Path) -> None:
    out = setting["root"] / "resumed"
    cut = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--crash-after", "3", env=setting["env"])
    assert cut.returncode != 0 and (out / "checkpoint.pt").is_file()
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--resume", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = ranks(two_process_run)[0], ranks(out)
    assert got[0]["log"][-1]["digest"] == got[1]["log"][-1]["digest"] == expected["log"][-1]["digest"]


def test_a_failing_rank_stops_the_whole_run_with_its_message(setting: dict) -> None:
    done = torchrun(str(WORKER), str(setting["data"]), str(setting["root"] / "fail"), "--fail-rank", "1", env=setting["env"])
    assert done.returncode != 0
    assert "user callback failed on rank 1" in done.stderr


def test_cli_errors_under_torchrun_say_which_rank(setting: dict, tmp_path: Path) -> None:
    done = torchrun("-m", "thaw", "train", str(tmp_path / "missing"), "--model", "mobilenet_v2", "--out", str(tmp_path / "run"),
                    "--device", "cpu", env=setting["env"])
    assert done.returncode != 0
    assert "thaw: error (rank 1 of 2): data path" in done.stderr and "Traceback" not in done.stderr.split("thaw: error")[0]


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ThawError, match=r"1 CUDA device\(s\) but torchrun started more processes .*--nproc_per_node=1"):
        distributed.start(distributed.Processes(rank=1, world=2, local_rank=1), "cuda")
