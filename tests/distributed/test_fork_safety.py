"""Loader workers fork only once gloo's threads are idle: a fork while one entered Python could hang the worker.

A gloo thread drops a finished collective's tensors a moment after the caller sees it complete; for a tensor Python
made, the drop enters Python and creates a thread state under a lock that a fork at that instant hands to the child
held (CPython gh-112275, 3.11.9 and older): the worker never starts and the rank waits for it forever (seen in CI twice).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from thaw import distributed
from thaw.data.pixel_store import WorkerLoader


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """This test process as a world of one under gloo: its collective threads are real."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_settling_returns_only_once_gloo_has_dropped_the_tensors_of_finished_collectives(gloo_group: None) -> None:
    still_held = tries = 0
    while still_held < 1 and tries < 2000:  # how often gloo's thread is still at it depends on the machine's load
        tries += 1
        tensor = torch.ones(1000)
        made_by_python = weakref.ref(tensor)
        dist.all_reduce(tensor, async_op=True)  # the handle is dropped at once: only gloo's thread holds the tensor
        del tensor
        still_held += made_by_python() is not None
        distributed.settle_collective_threads()
        assert made_by_python() is None, "a gloo thread still held a Python tensor, to drop it later"
    # Without this the test could not fail: gloo's thread, not this one, was the last to hold the tensors.
    assert still_held == 1


def test_the_collective_threads_watched_are_found_by_the_name_gloo_gives_them(gloo_group: None) -> None:
    # Were they renamed (a torch upgrade), the wait would shrink to a fixed 20 ms without a test noticing.
    dist.all_reduce(torch.ones(10))
    names = [name for name, _ in distributed._thread_states()]
    assert distributed.COLLECTIVE_THREAD in names, names


def test_thread_states_are_read_past_names_with_spaces_and_brackets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc/self/task/*/stat is "tid (name) STATE ...", and a thread may name itself "a) b (c"
    for tid, stat in {"11": "11 (pt_gloo_runloop) R 1 2", "12": "12 (a) R (b) S 1 2", "13": "13 (pt_gloo_runloop) D 1",
                      "14": "14 (python3) S 0"}.items():
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "stat").write_text(stat)
    (tmp_path / "15").mkdir()  # a thread that ended while its folder was listed: no stat to read
    monkeypatch.setattr(distributed, "TASKS", str(tmp_path))
    assert sorted(distributed._thread_states()) == [("a) R (b", "S"), ("pt_gloo_runloop", "D"), ("pt_gloo_runloop", "R"), ("python3", "S")]
    assert distributed._collective_thread_busy()
    (tmp_path / "11" / "stat").write_text("11 (pt_gloo_runloop) S 1 2")
    (tmp_path / "13" / "stat").write_text("13 (pt_gloo_runloop) S 1")
    assert not distributed._collective_thread_busy()


def test_worker_loader_settles_the_collective_threads_before_it_forks(gloo_group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    settle = distributed.settle_collective_threads
    monkeypatch.setattr(distributed, "settle_collective_threads", lambda: (events.append("settle"), settle())[1])
    busy = iter([True, True])  # two checks find a gloo thread at work, then it is done
    monkeypatch.setattr(distributed, "_collective_thread_busy", lambda: events.append("check") or next(busy, False))
    real_iterator = DataLoader._get_iterator
    monkeypatch.setattr(DataLoader, "_get_iterator", lambda loader: (events.append("fork"), real_iterator(loader))[1])
    assert list(WorkerLoader(list(range(4)), batch_size=None, num_workers=2)) == list(range(4))
    idle_checks = ["check"] * distributed.IDLE_CHECKS
    assert events == ["settle", "check", "check", *idle_checks, "fork"]


def test_without_a_process_group_workers_fork_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []
    monkeypatch.setattr(distributed, "_collective_thread_busy", lambda: checks.append(1) or False)
    assert not dist.is_initialized()
    assert list(WorkerLoader(list(range(4)), batch_size=None, num_workers=2)) == list(range(4))
    assert checks == []


def test_a_torch_built_without_distributed_support_forks_workers_and_exits_without_asking_for_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # Such a build has no dist.is_initialized: asking it would break every loader with workers, and every command's
    # exit (the CLI leaves the process group, if any, on the way out), one process or not.
    monkeypatch.setattr(dist, "is_available", lambda: False)
    monkeypatch.delattr(dist, "is_initialized")
    assert list(WorkerLoader(list(range(4)), batch_size=None, num_workers=2)) == list(range(4))
    distributed.stop()
