"""Every image of a run decoded once and kept as uint8 pixels, exactly as decoded.

Decoding a JPEG costs more than cropping decoded pixels, so a run decodes each file once, up
front, in every core it has, and every epoch, view and worker afterwards reads pixels. The
pixels are kept as the decoder gives them (large JPEGs at reduced scale, at least twice the
evaluation resize: Pillow's draft mode) and handed to the transforms as the same Pillow image
decoding the file gives (or, to a transform that starts from a tensor, as the same uint8 pixels),
so every view, augmented or not, has exactly the pixels it would have had. They live in memory
up to the run's budget and in a file in the run folder past it; both hold the same bytes, so
results never depend on the budget.

Several processes on one machine (torchrun) share the train images: each decodes its share into
its own file in the run folder (`fill(..., to_disk=True)`), describes it (`shared()`), and every
process reads the others' files (`adopt()`). Each image is then decoded once per machine, not
once per process, and its pixels are held once, in the kernel's page cache that all processes
and their workers read through, not once per process.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from thaw import distributed
from thaw.data.images import UnreadableImage, load_rgb
from thaw.errors import ThawError

SPILL_SUFFIX = ".u8"  # the part of a store past its memory budget, in the run folder while the run trains


def decode_at(path: Path, draft_size: int | None) -> np.ndarray:
    """HxWx3 uint8: what the datasets decode from the file, with the same `draft_size` (JPEGs at reduced scale)."""
    return np.array(load_rgb(path, draft_size), dtype=np.uint8)  # a writable copy: torch shares it without a warning


def ignore_interrupts(_worker: int) -> None:
    """DataLoader worker start-up: Ctrl-C is the training process's to handle (it saves a checkpoint);
    a worker that ran the trainer's handler too would print its message once more and carry on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes outlive a SIGTERM sent to the whole job (`timeout`, SLURM and systemd
    signal every process of it): a worker it ended would stop the training step with an error instead of the
    checkpoint the training process is finishing. The training process still ends them with SIGTERM (DataLoader's
    shutdown, multiprocessing at exit), and so may anyone once it is gone. Linux only (sigwaitinfo): the workers
    start with SIGTERM blocked in every thread, and one thread of theirs waits for it and asks who sent it."""

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs) -> None:
        super().__init__(*args, worker_init_fn=partial(_start_worker, os.getpid(), worker_init_fn), **kwargs)

    def _get_iterator(self):  # where DataLoader starts its workers (once, for persistent ones)
        if self.num_workers == 0:
            return super()._get_iterator()
        distributed.settle_collective_threads()  # a fork while one enters Python can deadlock the worker
        if not hasattr(signal, "sigwaitinfo"):
            return super()._get_iterator()
        # Blocked while the workers fork, so every thread they start inherits the block (one started before the
        # init function would otherwise take a job's SIGTERM); a signal arriving meanwhile is handled just after.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _start_worker(parent: int, then: Callable[[int], None] | None, worker: int) -> None:
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # where the loader's block did not carry (forkserver)
        threading.Thread(target=_end_when_the_parent_asks, args=(parent,), name="thaw-sigterm", daemon=True).start()
    if then is not None:
        then(worker)


def _end_when_the_parent_asks(parent: int) -> None:
    """Take each SIGTERM this worker gets; exit (as torch's worker handler does) when the training process sent it,
    or when that process is gone."""
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent or not _alive(parent):
            os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process now holds the number: ours is gone
        return False
    return True


class _Decoder(Dataset):
    """Decodes one file per item, in worker processes where the machine has cores to spare."""

    def __init__(self, paths: Sequence[Path], draft_size: int | None) -> None:
        self.paths, self.draft_size = paths, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return index, decode_at(self.paths[index], self.draft_size), None
        except UnreadableImage as reason:
            return index, None, str(reason)


def _as_is(item: tuple) -> tuple:
    """The decoder's items pass through unchanged (a named function: spawned workers pickle it)."""
    return item


Shape = tuple[int, int, int]  # HxWx3


@dataclass(frozen=True)
class SharedPixels:
    """What one process decoded into its file for the other processes on its machine."""

    file: Path
    size: int  # bytes written: a file shorter than this is not the one described (another machine's disk)
    entries: dict[Path, tuple[int, Shape]]  # offset and shape in `file`
    unreadable: dict[Path, str]


class PixelStore:
    """Decoded pixels by path: in memory up to `budget_bytes`, the rest in a spill file read back per image."""

    def __init__(self, draft_size: int | None, budget_bytes: int, spill_path: Path) -> None:
        self.draft_size = draft_size  # the datasets' own: stored pixels are what they would decode
        self.budget, self.used, self.spilled = budget_bytes, 0, 0  # bytes in memory, bytes in the spill file
        self.in_memory: dict[Path, torch.Tensor] = {}
        self.on_disk: dict[Path, tuple[Path, int, Shape]] = {}  # file (the spill file, or another process's), offset, shape
        self.unreadable: dict[Path, str] = {}
        self.spill_path = spill_path
        self.decoded = 0  # files this process decoded (or failed to)
        self._readers: dict[Path, BinaryIO] = {}
        self._readers_pid = os.getpid()  # each process reads through handles of its own (a seek is per handle)

    def fill(
        self, paths: Sequence[Path], workers: int, should_stop: Callable[[], bool] = lambda: False, to_disk: bool = False,
    ) -> bool:
        """Decode every path not yet stored, each exactly once, in `workers` processes (in order); `to_disk`: all of
        them into the spill file, for other processes to read (see shared()). Returns False when `should_stop` turned
        true first (what was decoded stays)."""
        missing = [path for path in dict.fromkeys(paths) if path not in self]
        decoder = _Decoder(missing, self.draft_size)
        loader = WorkerLoader(decoder, batch_size=None, num_workers=workers if missing else 0, collate_fn=_as_is,
                              worker_init_fn=ignore_interrupts)
        for index, pixels, reason in loader:
            if should_stop():
                return False
            self.decoded += 1
            if pixels is None:
                self.unreadable[missing[index]] = reason
            else:
                self._keep(missing[index], pixels, to_disk)
        return True

    def shared(self) -> SharedPixels:
        """This store's spill file as other processes on the machine can read it: call after fill(to_disk=True)."""
        entries = {path: (offset, shape) for path, (file, offset, shape) in self.on_disk.items() if file == self.spill_path}
        return SharedPixels(self.spill_path, self.spilled, entries, dict(self.unreadable))

    def adopt(self, pixels: SharedPixels) -> bool:
        """Read another process's images from its file from now on. False where this process does not see that file
        as it was written (its disk is another machine's): those images stay missing, for fill() to decode here."""
        if pixels.size and not self._sees(pixels):
            return False
        for path, (offset, shape) in pixels.entries.items():
            self.on_disk.setdefault(path, (pixels.file, offset, shape))
        for path, reason in pixels.unreadable.items():  # a share of files that all failed to decode has no file at all
            self.unreadable.setdefault(path, reason)
        return True

    def _sees(self, pixels: SharedPixels) -> bool:
        """Whether `pixels.file` is here at its written size. It stays open: this process (not the workers it starts,
        which open it themselves) reads it until release(), whenever the process that wrote it ends."""
        try:
            if os.fstat(self._reader(pixels.file).fileno()).st_size >= pixels.size:
                return True
        except OSError:
            return False
        self._readers.pop(pixels.file).close()
        return False

    def __contains__(self, path: Path) -> bool:
        return path in self.in_memory or path in self.on_disk or path in self.unreadable

    def _keep(self, path: Path, pixels: np.ndarray, to_disk: bool) -> None:
        if not to_disk and self.used + pixels.nbytes <= self.budget:
            self.in_memory[path] = torch.from_numpy(pixels)
            self.used += pixels.nbytes
            return
        offset = self.spilled
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill_path, "ab" if offset else "wb") as spill:  # "wb": a file left by an interrupted run is stale
                spill.write(pixels.data)
        except OSError as error:
            # A share for other processes is on disk whatever the budget: more memory would not help it.
            more_memory = "" if to_disk else f", or give the run more memory for them (decoded_memory_gb, now {self.budget / 2**30:g} GB)"
            raise ThawError(
                f"cannot keep decoded images in {self.spill_path} ({error.strerror or error}); free disk space there{more_memory}"
            ) from None
        self.on_disk[path] = (self.spill_path, offset, pixels.shape)
        self.spilled += pixels.nbytes

    def image(self, path: Path) -> Image.Image:
        """The image as decoding the file gives it. Raises UnreadableImage for a file that failed to decode."""
        return Image.fromarray(self.pixels(path).numpy())

    def pixels(self, path: Path) -> torch.Tensor:
        """The image's HxWx3 uint8 pixels, as decode_at gives them; no Pillow image is made. In memory they are the
        store's own, shared by every epoch and view: read them, never write into them. Raises UnreadableImage for a
        file that failed to decode."""
        if path in self.in_memory:
            return self.in_memory[path]
        if path in self.on_disk:
            file, offset, shape = self.on_disk[path]
            pixels = np.empty(shape, dtype=np.uint8)
            try:
                reader = self._reader(file)
                reader.seek(offset)
                complete = reader.readinto(memoryview(pixels).cast("B")) == pixels.nbytes  # never train on uninitialised memory
            except OSError:
                complete = False
            if not complete:
                raise ThawError(
                    f"{file} lost decoded images while the run trained (deleted, or ended with a process of the run that "
                    "failed first); do not delete files in the run folder while it trains"
                )
            return torch.from_numpy(pixels)
        if path in self.unreadable:
            raise UnreadableImage(self.unreadable[path])
        raise KeyError(f"{path} was never decoded into the store")

    def _reader(self, file: Path) -> BinaryIO:
        if self._readers_pid != os.getpid():  # a forked worker: the handles it inherited share their position with its parent's
            self._readers, self._readers_pid = {}, os.getpid()
        if file not in self._readers:
            self._readers[file] = open(file, "rb")  # noqa: SIM115 - closed by release()
        return self._readers[file]

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_readers": {}, "_readers_pid": None}  # a worker started by spawn opens the files itself

    def release(self) -> None:
        """Free the pixels and delete this process's spill file (the run is over). Other processes' files are theirs to delete."""
        if self._readers_pid == os.getpid():
            for reader in self._readers.values():
                reader.close()
        self._readers = {}
        self.in_memory.clear()
        self.on_disk.clear()
        self.used = self.spilled = 0
        self.spill_path.unlink(missing_ok=True)
