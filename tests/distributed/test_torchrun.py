"""Real processes under torchrun (CPU, gloo): unfreezing under DDP, identical ranks, failures, resume, two machines."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import python_path_with_repo, write_class_images
from thaw import ThawError, distributed
from thaw.data.folders import discover
from thaw.data.images import UnreadableImage, load_rgb, probe
from thaw.distributed import Processes, ShardedPermutation
from thaw.train.fit import _seed_epoch

WORKER = Path(__file__).with_name("ddp_worker.py")
EXIT_WORKER = Path(__file__).with_name("exit_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds; a hang fails the test instead of the CI job
# Two launches: past the 120 s rendezvous and collective timeouts below and torchrun's grace to stop a worker, so a
# failure there ends in exit codes and logs. (A launch that finished waits up to 300 s at its exit for one that failed:
# that case may still be reported as a hang, with the logs.)
NODES_TIMEOUT = 420


def environment(env: dict | None) -> dict:
    return os.environ | {"PYTHONPATH": python_path_with_repo(), "OMP_NUM_THREADS": "1"} | (env or {})


def torchrun(*args: str, processes: int = 2, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment(env), cwd=cwd)


def single(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    alone = os.environ | {"PYTHONPATH": python_path_with_repo()} | (env or {})
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=TIMEOUT, env=alone, cwd=ROOT)


def free_port() -> int:
    """A free port below the range the system takes client ports from, where there is room. A port in that range
    (what binding port 0 hands out) can become the source port of a client that retries connect() to it before anyone
    listens, which then is connected to itself (TCP self-connect: seen here on an even port after about 12,000 refused
    tries). The second launch retries the rendezvous until the first listens: a suspected cause of a launch that once
    hung in CI, not a proven one; the port below the range rules it out."""
    below = range(10000, ephemeral_low())
    for port in random.Random().sample(below, min(200, len(below))):
        with socket.socket() as probe_socket:
            try:
                probe_socket.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
            return port
    with socket.socket() as probe_socket:  # a system whose client ports start low: take one it hands out
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def ephemeral_low() -> int:
    """The lowest port the system gives a client socket (Linux); 32768 (Linux's default) where it does not say."""
    ports = Path("/proc/sys/net/ipv4/ip_local_port_range")
    return int(ports.read_text().split()[0]) if ports.is_file() else 32768


def log_tails(logs: Path, characters: int = 1500) -> str:
    """The end of each launch's log: what CI prints when a two-node run fails (the logs go with the machine)."""
    return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-characters:]}" for log in sorted(logs.glob("node*.log")))


def two_nodes(*args: str, logs: Path, env: dict | None = None) -> list[int]:
    """Two launches of one process each, as two machines run them (--nnodes=2, c10d rendezvous at node 0).

    Both run at once; a hang kills both (and their workers) and fails the test with the logs' ends. Returns the
    exit codes. c10d numbers the nodes in the order they join; --node_rank (the README's command passes it) is ignored.
    A launch waiting for the other in the rendezvous gives up after 120 s, and a rank left waiting in a collective
    after 120 s (unless `env` says otherwise), so a failure ends in an exit code and a log, not in a hang.
    """
    env = {"THAW_COLLECTIVE_TIMEOUT_S": "120"} | (env or {})
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    launches = []
    for node in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=thaw-test-{port}",
            f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120",  # node 0 hosts the rendezvous, as the first machine would
            str(WORKER), *args,
        ]
        with open(logs / f"node{node}.log", "w") as log:
            launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment(env), cwd=ROOT, start_new_session=True)
            launches.append(launch)
    deadline = time.monotonic() + NODES_TIMEOUT
    try:
        return [launch.wait(timeout=max(1.0, deadline - time.monotonic())) for launch in launches]
    except subprocess.TimeoutExpired:
        for launch in launches:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)  # the launcher and the worker it started
                launch.wait(timeout=30)
        pytest.fail(f"the two-node run hung for {NODES_TIMEOUT} s; logs in {logs}\n{log_tails(logs)}")


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def write_data(root: Path) -> Path:
    """48 train images: an even split over two ranks (no DistributedSampler padding) and 3 batches of 16."""
    write_class_images(root / "train", per_class=16, size=48, seed=0)
    write_class_images(root / "val", per_class=6, size=48, seed=1)
    return root


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    return {"data": write_data(root / "data"), "root": root, "env": {"TORCH_HOME": str(root / "torch_home")}}


@pytest.fixture(scope="module")
def two_process_run(setting: dict) -> Path:
    out = setting["root"] / "ddp"
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_ranks_exit_cleanly_when_their_last_work_is_a_collective() -> None:
    # Without the wait at exit about half of such launches died with SIGABRT ("terminate called without
    # an active exception") as gloo's threads dropped the gather's tensors during interpreter shutdown.
    for launch in range(6):
        done = torchrun(str(EXIT_WORKER))
        assert done.returncode == 0, f"launch {launch}: {done.stderr[-2000:]}"
        assert "terminate called" not in done.stderr


def test_unfrozen_parameters_train_and_stay_identical_across_ranks_every_step(two_process_run: Path) -> None:
    zero, one = ranks(two_process_run)
    assert len(zero["log"]) == len(one["log"]) > 0
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]  # every step, every trainable tensor
    unfrozen = [s["body"] for s in zero["log"] if s["body"] is not None]
    assert unfrozen and len(set(unfrozen)) == len(unfrozen)  # the newly trainable layers move at every step
    assert zero["log"][-1]["trainable"] > zero["log"][0]["trainable"]  # the plan did unfreeze
    assert zero["history"] == one["history"]  # metrics are reduced over ranks: both see the same numbers
    assert zero["cached"] == [True, True, False, False]  # the head stage trained on features cached in shards


def test_the_top_2_groups_on_the_cached_bottom_stay_identical_across_ranks_every_step(setting: dict) -> None:
    out = setting["root"] / "top2"
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--top-2", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = ranks(out)
    assert zero["cached"] == one["cached"] == [True, True, True]  # each rank cached the bottom's output for its shard
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]  # gradients averaged over ranks
    top = [s["body"] for s in zero["log"] if s["body"] is not None]
    assert top and len(set(top)) == len(top)  # the top group moves at every step
    assert zero["history"] == one["history"]


def test_cached_two_processes_take_the_steps_of_one_process_with_the_same_global_batch(setting: dict, two_process_run: Path) -> None:
    """With the cache (and dropout), the runs are not the same run: each rank shuffles its own shard of cached
    features and draws its own dropout masks. What holds is the schedule, and that both learn the task."""
    out = setting["root"] / "single"
    done = single(str(setting["data"]), str(out), "--batch-size", "16", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads((out / "rank0.json").read_text())
    together = ranks(two_process_run)[0]
    assert [s["step"] for s in alone["log"]] == [s["step"] for s in together["log"]]  # the same optimizer steps
    assert [s["trainable"] for s in alone["log"]] == [s["trainable"] for s in together["log"]]  # unfrozen at the same step
    assert alone["cached"] == together["cached"]
    # Both learn the colours; the best val accuracies differ by what batch composition and dropout do on 18 images.
    assert min(alone["best"], together["best"]) >= 0.8, (alone["history"], together["history"])
    # Only rank 0 wrote the run folder.
    assert (two_process_run / "model.safetensors").is_file() and (two_process_run / "thaw.json").is_file()
    assert not list(two_process_run.rglob("pixels-rank*"))  # each rank deleted the decoded images it shared


def _weights(out: Path, kind: str) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in torch.load(out / f"{kind}-rank0.pt").items() if t.is_floating_point()}


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_without_cache_and_dropout_two_processes_of_8_train_like_one_process_of_16(setting: dict) -> None:
    """Each epoch the ranks' batch k together hold the single process's batch k (one seeded order, split by
    DistributedSampler) and DDP averages their gradients: the same steps up to float rounding.

    SGD, not AdamW: Adam divides each gradient by its own running size, so rounding-level gradients (near zero)
    become lr-sized steps of either sign, and it is blind to a wrong gradient scale, which SGD is not.
    """
    options = ["--no-cache", "--no-dropout", "--optimizer", "sgd", "--save-final"]
    runs = {"together": setting["root"] / "exact-ddp", "alone": setting["root"] / "exact-single"}
    done = torchrun(str(WORKER), str(setting["data"]), str(runs["together"]), "--batch-size", "8", *options, env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = single(str(setting["data"]), str(runs["alone"]), "--batch-size", "16", *options, env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    together, alone = ranks(runs["together"])[0], json.loads((runs["alone"] / "rank0.json").read_text())
    assert len(together["log"]) == len(alone["log"]) == 12  # 3 steps an epoch, 4 epochs
    assert together["cached"] == alone["cached"] == [False] * 4
    assert together["history"] == alone["history"] and together["best"] == alone["best"]
    # The two ranks share one machine: each decoded half the train images (and its own val shard) for both to read.
    assert [rank["decoded"] for rank in ranks(runs["together"])] == [24 + 9, 24 + 9] and alone["decoded"] == 48 + 18

    start, finish, reference = _weights(runs["alone"], "initial"), _weights(runs["together"], "final"), _weights(runs["alone"], "final")
    assert all(torch.equal(start[n], t) for n, t in _weights(runs["together"], "initial").items())
    worst = max((finish[n] - reference[n]).abs().max().item() for n in reference)
    assert worst <= 1e-5, worst  # measured: about 1e-6
    for part in ("head", "body"):
        names = [n for n in reference if n.startswith("classifier") == (part == "head")]
        moved = _norm([reference[n] - start[n] for n in names])
        apart = _norm([finish[n] - reference[n] for n in names])
        assert moved > 0 and apart <= 0.01 * moved, (part, apart, moved)  # measured: 2e-6 (head), 2e-3 (body)


def test_resume_under_torchrun_ends_where_the_uninterrupted_run_ends(setting: dict, two_process_run: Path) -> None:
    out = setting["root"] / "resumed"
    cut = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--crash-after", "3", env=setting["env"])
    assert cut.returncode != 0 and (out / "checkpoint.pt").is_file()
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--resume", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = ranks(two_process_run)[0], ranks(out)
    assert got[0]["log"][-1]["digest"] == got[1]["log"][-1]["digest"] == expected["log"][-1]["digest"]


def test_a_run_started_in_one_process_is_not_resumed_in_two(setting: dict, tmp_path: Path) -> None:
    """Another process count is another global batch, other steps per epoch, other shards: a different run."""
    out = tmp_path / "single"
    cut = single(str(setting["data"]), str(out), "--batch-size", "8", "--crash-after", "1", env=setting["env"])
    assert cut.returncode != 0 and (out / "checkpoint.pt").is_file()
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--resume", env=setting["env"])
    assert done.returncode != 0 and "processes (the run: 1, now: 2)" in done.stderr, done.stderr[-3000:]


def test_two_machines_keep_identical_weights_and_resume_exactly(setting: dict) -> None:
    """Two torchrun launches rendezvous over TCP as two machines would (here both on 127.0.0.1, sharing a disk:
    only rank 0 writes the run folder; each rank writes its own rank{RANK}.json)."""
    data, env, root = str(setting["data"]), setting["env"], setting["root"]
    whole, resumed = root / "nodes-whole", root / "nodes-resumed"
    done = two_nodes(data, str(whole), "--batch-size", "8", logs=root / "nodes-whole-logs", env=env)
    assert done == [0, 0], log_tails(root / "nodes-whole-logs")
    zero, one = ranks(whole)
    assert len(zero["log"]) == len(one["log"]) == 12
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]  # every step, on both machines
    assert zero["log"][-1]["trainable"] > zero["log"][0]["trainable"] and zero["history"] == one["history"]

    short = env | {"THAW_COLLECTIVE_TIMEOUT_S": "60"}  # the machine left waiting for rank 0 gives up within a minute
    cut = two_nodes(data, str(resumed), "--batch-size", "8", "--crash-after", "3", logs=root / "nodes-cut-logs", env=short)
    assert 0 not in cut and (resumed / "checkpoint.pt").is_file(), log_tails(root / "nodes-cut-logs")  # rank 0 stopped; the other too
    again = two_nodes(data, str(resumed), "--batch-size", "8", "--resume", logs=root / "nodes-resumed-logs", env=env)
    assert again == [0, 0], log_tails(root / "nodes-resumed-logs")
    after = ranks(resumed)
    assert after[0]["log"][-1]["digest"] == after[1]["log"][-1]["digest"] == zero["log"][-1]["digest"]


def test_a_batch_that_fails_to_decode_on_one_rank_only_is_skipped_by_every_rank(tmp_path: Path, setting: dict) -> None:
    """Rank 1's first batch is all files that pass the header check and fail to decode, in a one-epoch run whose
    head stage runs the network (no cache): every rank must take the same steps (a rank that skips a batch alone
    leaves its collectives unmatched: the run hangs until the collective timeout), and the run folder must name
    the files, though only rank 1 ever read them."""
    root, batch_size = write_data(tmp_path / "data"), 8
    data = discover(root, seed=0)
    with torch.random.fork_rng(devices=[]):  # _seed_epoch seeds the global generators too
        seed = _seed_epoch(0, 0, 0)  # seed 0, stage 0, epoch 0: the run's only epoch
    shards = [list(ShardedPermutation(len(data.train), seed, Processes(rank=rank, world=2))) for rank in range(2)]
    corrupt = [data.train[index][0] for index in shards[1][:batch_size]]
    for path in corrupt:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a valid header, then the data stops
    assert discover(root, seed=0).train == data.train  # they pass the header check: still in the data
    for path in corrupt:
        probe(path)
        with pytest.raises(UnreadableImage):
            load_rgb(path)
    assert not {data.train[index][0] for index in shards[0]} & set(corrupt)  # rank 0 never reads them

    out = tmp_path / "run"
    short = setting["env"] | {"THAW_COLLECTIVE_TIMEOUT_S": "60"}  # unmatched collectives fail in a minute, not ten
    done = torchrun(str(WORKER), str(root), str(out), "--batch-size", str(batch_size), "--no-cache", "--one-epoch", env=short)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = ranks(out)
    assert len(zero["log"]) == len(one["log"]) > 0
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]
    assert set(one["skipped"]) == {str(path) for path in corrupt}  # rank 1 met them
    reported = {entry["path"] for entry in json.loads((out / "thaw.json").read_text())["skipped_files"]}
    assert {str(path) for path in corrupt} <= reported, "thaw.json must list files that failed on any rank, not only rank 0"


def test_a_val_class_every_image_of_which_fails_to_decode_stops_every_rank_before_training(tmp_path: Path, setting: dict) -> None:
    """Val is split between the ranks, so each decodes half of the class's broken files and alone sees the other half
    as fine: the failures are gathered, and every rank refuses the class before its first epoch (no rank trains)."""
    root = write_data(tmp_path / "data")
    emptied = sorted((root / "val").iterdir())[0]
    for path in emptied.iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a valid header, then the data stops
    out = tmp_path / "run"
    done = torchrun(str(WORKER), str(root), str(out), "--batch-size", "8", "--no-cache", env=setting["env"])
    assert done.returncode != 0
    assert f"val: class with no image that decodes: {emptied.name} (first: " in done.stderr, done.stderr[-3000:]
    assert not (out / "rank0.json").exists() and not (out / "rank1.json").exists()
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.csv").exists()  # no epoch ended


def test_a_failing_rank_stops_the_whole_run_with_its_message(setting: dict) -> None:
    done = torchrun(str(WORKER), str(setting["data"]), str(setting["root"] / "fail"), "--fail-rank", "1", env=setting["env"])
    assert done.returncode != 0
    assert "user callback failed on rank 1" in done.stderr


def test_a_rank_that_cannot_share_its_decoded_images_stops_every_rank_with_its_reason(setting: dict) -> None:
    out = setting["root"] / "share-fails"
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--no-cache", "--share-fails", "1", env=setting["env"])
    assert done.returncode != 0
    assert "pixels-rank1.u8 (No space left on device)" in done.stderr  # rank 1's own reason
    assert "rank 1 could not decode its share of the images: cannot keep decoded images in" in done.stderr  # rank 0's
    assert not (out / "rank0.json").exists()


def test_a_rank_that_cannot_see_the_other_share_decodes_it_itself_and_trains_the_same(setting: dict, two_process_run: Path) -> None:
    out = setting["root"] / "share-unseen"
    done = torchrun(str(WORKER), str(setting["data"]), str(out), "--batch-size", "8", "--share-unseen", "1", env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = ranks(out)
    assert zero["decoded"] == 24 + 9 and one["decoded"] == 48 + 9  # rank 1 decoded rank 0's share again
    assert [s["digest"] for s in zero["log"]] == [s["digest"] for s in one["log"]]
    assert zero["log"][-1]["digest"] == ranks(two_process_run)[0]["log"][-1]["digest"]  # the same pixels, the same run


def test_cli_errors_under_torchrun_say_which_rank(setting: dict, tmp_path: Path) -> None:
    done = torchrun("-m", "thaw", "train", str(tmp_path / "missing"), "--model", "mobilenet_v2", "--out", str(tmp_path / "run"),
                    "--device", "cpu", env=setting["env"])
    assert done.returncode != 0
    # Both ranks fail at once; torchrun stops the other as soon as one exits, so either rank's line may be the one shown.
    assert re.search(r"thaw: error \(rank [01] of 2\): data path", done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr.split("thaw: error")[0]


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ThawError, match=r"1 CUDA device\(s\) but torchrun started more processes .*--nproc_per_node=1"):
        distributed.start(distributed.Processes(rank=1, world=2, local_rank=1), "cuda")


def test_under_torchrun_only_rank_0_writes_logs_and_the_report(setting: dict, tmp_path: Path) -> None:
    """Two processes, one TensorBoard event file, one MLflow run, one report: a second rank writing would double them."""
    import mlflow

    out, store = tmp_path / "run", tmp_path / "mlflow.db"
    env = setting["env"] | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    done = torchrun("-m", "thaw", "train", str(setting["data"]), "--model", "mobilenet_v3_small", "--weights", "none",
                    "--image-size", "32", "--batch-size", "8", "--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1",
                    "--device", "cpu", "--out", str(out), "--log-to", "tensorboard", "--log-to", "mlflow", "--report", env=env,
                    cwd=tmp_path)  # MLflow's SQLite store keeps artifacts in ./mlruns: not in the checkout
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (out / "report.html").is_file() and done.stdout.count("report.html") == 1
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    found = client.search_runs([client.get_experiment_by_name("thaw").experiment_id])
    assert [run.info.status for run in found] == ["FINISHED"]
    assert len(list((tmp_path / "mlruns").glob("*/*/artifacts/report.html"))) == 1  # rank 0's artifacts, once
    last_epoch = (out / "metrics.csv").read_text().splitlines()[-1].split(",")
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert found[0].data.metrics["epoch.val_accuracy"] == pytest.approx(float(last_epoch[header.index("val_accuracy")]))


def test_every_train_option_reaches_thaw_through_torchrun() -> None:
    """torchrun's parser matches prefixes of its own options anywhere on the line: a thaw option that is one would
    be taken by torchrun (or refused as ambiguous) before thaw sees it. --log has --log-to for that."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    from thaw.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {option for action in train._actions for option in action.option_strings} - {"--log"}
    for option in sorted(options):
        with contextlib.redirect_stderr(io.StringIO()) as said:
            try:
                parsed = get_args_parser().parse_args(["--standalone", "-m", "thaw", "train", option, "1"])
            except SystemExit:
                pytest.fail(f"torchrun refuses thaw's {option}: {said.getvalue().strip().splitlines()[-1]}")
        assert parsed.training_script_args == ["train", option, "1"], option


def test_a_budget_under_torchrun_is_planned_by_rank_0_and_followed_by_every_rank(setting: dict, tmp_path: Path) -> None:
    """Rank 0 times the batches and chooses the epochs; a rank that planned for itself, or not at all, would fail
    or leave the ranks' collectives unmatched (a hang, which the timeout turns into a failure)."""
    out = tmp_path / "run"
    done = torchrun("-m", "thaw", "train", str(setting["data"]), "--model", "mobilenet_v3_small", "--weights", "none",
                    "--image-size", "32", "--batch-size", "8", "--budget", "60s", "--device", "cpu", "--out", str(out), "--json",
                    env=setting["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    meta = json.loads((out / "thaw.json").read_text())
    chosen = [stage["epochs"] for stage in meta["plan"]["stages"]]
    assert summary["budget"]["epochs"] == chosen == meta["budget"]["epochs"] and chosen[1] >= 1
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == sum(chosen) or meta["budget"]["ended_early"]
