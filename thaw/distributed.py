"""Several processes under torchrun: process group, data shards, gradient and metric reduction.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; thaw then joins a process
group (NCCL when every process has a CUDA device, gloo otherwise), gives each
rank an equal shard of every epoch's seeded order (DistributedSampler), and
sums metrics across ranks. Only rank 0 writes files or prints.

Gradients: stages that run the network wrap it in DistributedDataParallel,
built anew at every stage change, because DDP registers only the parameters
that require grad when it is built (unfreezing under an old wrapper silently
leaves new parameters unsynchronised). Stages that train the head on cached
features never call the network, so their few gradients are averaged with
one all-reduce before each step.
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from thaw.errors import ThawError, first_line

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that died mid-collective must not hang the rest forever
# What stop() and settle_collective_threads() watch: gloo names its collective threads so;
# R and D mean running (or about to).
TASKS = "/proc/self/task"
COLLECTIVE_THREAD = "pt_gloo_runloop"
BUSY_STATES = ("R", "D")
IDLE_CHECK_INTERVAL_S = 0.01
IDLE_CHECKS = 2  # a thread that blocks for a moment on a lock shows idle once; twice in a row means done
IDLE_WAIT_LIMIT_S = 5.0  # a thread busy past this is not finishing a drop: exit anyway


def collective_timeout() -> timedelta:
    """COLLECTIVE_TIMEOUT, or THAW_COLLECTIVE_TIMEOUT_S seconds (tests end a hung run in seconds, not minutes)."""
    text = os.environ.get("THAW_COLLECTIVE_TIMEOUT_S")
    if text is None:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):  # also refuses nan
        raise ThawError(f"THAW_COLLECTIVE_TIMEOUT_S must be a number of seconds above 0, got {text!r}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Processes()


def from_environment() -> Processes:
    """The process layout torchrun announced, or a single process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ThawError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers; launch with torchrun") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ThawError(f"WORLD_SIZE={world} with RANK={rank} and LOCAL_RANK={local} is not a process layout; launch with torchrun")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ThawError(
            f"WORLD_SIZE={world} but MASTER_ADDR and MASTER_PORT are not set (left over from another launcher?); "
            "launch with torchrun, or unset WORLD_SIZE for one process"
        )
    return Processes(rank, world, local)


def start(processes: Processes, device: str) -> str:
    """Join the process group; returns the device this rank uses ('cuda:N' per local rank, or 'cpu')."""
    if not processes.distributed or dist.is_initialized():
        return device
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        _check_gpu_per_process(processes)
        torch.cuda.set_device(processes.local_rank)
        device = f"cuda:{processes.local_rank}"
    elif device == "auto":
        device = "cpu"
    backend = "nccl" if use_cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=collective_timeout())
    except (ValueError, RuntimeError) as error:  # an unreachable MASTER_ADDR, a port in use, a missing backend
        reason = first_line(error)
        raise ThawError(f"cannot join the {backend} process group ({reason}); check the torchrun launch") from None
    # A script that calls train_images under torchrun and simply ends would leave the group to interpreter exit,
    # where tearing down its threads can abort the process ("terminate called without an active exception").
    atexit.register(stop)
    return device


def _check_gpu_per_process(processes: Processes) -> None:
    """NCCL needs one GPU per process; two ranks on one device fail deep inside NCCL, so say it first."""
    count = torch.cuda.device_count()
    if processes.local_rank >= count:
        raise ThawError(
            f"this machine has {count} CUDA device(s) but torchrun started more processes on it; "
            f"launch with --nproc_per_node={max(count, 1)}, or pass --device cpu to train on CPU processes"
        )


def stop() -> None:
    """Leave the process group; after gloo, also wait (best effort) for its threads to go idle.

    A gloo thread drops a finished collective (and the tensors it holds) a moment after the caller
    sees it complete. When a rank's last collective is its last work, the interpreter may be
    finalizing by then, and that drop, which needs the GIL, aborts the process with
    "terminate called without an active exception" (a rank that finished its work exits -6).
    destroy_process_group does not join those threads while a DDP wrapper still holds the group.
    """
    if not _in_process_group():
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        _wait_for_idle_collective_threads()


def _in_process_group() -> bool:
    """A torch built without distributed support has no dist.is_initialized: asking it would break every command."""
    return dist.is_available() and dist.is_initialized()


def settle_collective_threads() -> None:
    """Before forking loader workers under gloo: wait until its threads have dropped the finished collectives.

    A gloo thread drops a finished collective's tensors a moment after the caller sees it complete. For a tensor
    Python made, that drop enters Python from the gloo thread, which first creates a thread state under the
    interpreter's list lock, without the GIL (seen in gdb: ~AsyncWork -> gil_scoped_acquire -> PyThreadState_New).
    A fork at that instant hands the child that lock held, and on a Python without the fix of CPython gh-112275
    (3.11.9 and older; fixed in 3.11.10 and 3.12) the child waits for it forever in its after-fork clean-up
    (_PyThreadState_DeleteExcept): a DataLoader worker that never starts, and a rank that waits for it with no end
    (seen twice in CI under torchrun, on 3.11.7). No drop starts again until this process issues another
    collective, and it issues none while it forks. The wait is kept on fixed Pythons too: it costs about 20 ms a
    loader start. A thread still busy after IDLE_WAIT_LIMIT_S is not finishing a drop: the fork goes ahead.
    NCCL's threads are not watched here."""
    if _in_process_group() and dist.get_backend() == "gloo":
        _wait_for_idle_collective_threads()


def _wait_for_idle_collective_threads() -> None:
    """Sleep (giving up the GIL that a waiting thread needs) until no gloo thread is runnable
    at IDLE_CHECKS checks in a row, for at most IDLE_WAIT_LIMIT_S. Linux only: elsewhere it returns."""
    if not Path(TASKS).is_dir():
        return
    deadline = time.monotonic() + IDLE_WAIT_LIMIT_S
    idle_checks = 0
    while idle_checks < IDLE_CHECKS and time.monotonic() < deadline:
        time.sleep(IDLE_CHECK_INTERVAL_S)
        idle_checks = 0 if _collective_thread_busy() else idle_checks + 1


def _collective_thread_busy() -> bool:
    """Whether a gloo thread of this process is running, waiting for a core, or in uninterruptible sleep."""
    return any(name == COLLECTIVE_THREAD and state in BUSY_STATES for name, state in _thread_states())


def _thread_states() -> list[tuple[str, str]]:
    """(name, state) of this process's threads, from /proc/self/task/*/stat ("tid (name) STATE ...")."""
    states = []
    for task in Path(TASKS).iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended while we looked
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()  # a name may hold spaces and brackets: the state follows the last ")"
        if fields:
            states.append((name, fields[0]))
    return states


class ShardedPermutation(Sampler[int]):
    """This rank's share of one epoch's seeded order (padded so every rank gets as many);
    `skip` drops the first samples, to resume mid-epoch."""

    def __init__(self, count: int, seed: int, processes: Processes, skip: int = 0) -> None:
        self.sampler = DistributedSampler(range(count), num_replicas=processes.world, rank=processes.rank, shuffle=True, seed=seed)
        self.skip = skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip :])


def shard(count: int, processes: Processes, pad: bool) -> list[int]:
    """Indices of this rank in a fixed order: padded for training (equal steps on every rank), exact for evaluation."""
    if pad:
        return list(DistributedSampler(range(count), num_replicas=processes.world, rank=processes.rank, shuffle=False))
    return list(range(processes.rank, count, processes.world))


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(model: nn.Module) -> None:
    """Average the gradients of what trains, across ranks (cached-feature stages, where DDP is not in the path)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """A fresh DDP wrapper over what trains now; built at every stage change."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # buffers follow rank 0 (a train BatchNorm policy)


def broadcast(value: object) -> object:
    """Rank 0's value on every rank (a checkpoint read by rank 0, for example)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: object) -> list:
    """Every rank's value, in rank order, on every rank."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def machine_peers() -> list[int]:
    """The ranks on this rank's machine (itself included), in order: those that report the same host name."""
    hosts = gather_objects(socket.gethostname())
    return [rank for rank, host in enumerate(hosts) if host == hosts[dist.get_rank()]]


def gather_lists(items: list) -> list:
    """Every rank's items, in rank order without repeats, on every rank (files that failed to decode, say)."""
    return list(dict.fromkeys(item for part in gather_objects(items) for item in part))
