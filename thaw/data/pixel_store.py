"""Every image of a run decoded once and kept as uint8 pixels, exactly as decoded.

Decoding a JPEG costs more than cropping decoded pixels, so a run decodes each file once, up
front, in every core it has, and every epoch, view and worker afterwards reads pixels. The
pixels are kept as the decoder gives them (large JPEGs at reduced scale, at least twice the
evaluation resize: Pillow's draft mode) and handed to the transforms as the same Pillow image
decoding the file gives, so every view, augmented or not, has exactly the pixels it would have
had. They live in memory up to the run's budget and in a file in the run folder past it; both
hold the same bytes, so results never depend on the budget.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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


class PixelStore:
    """Decoded pixels by path: in memory up to `budget_bytes`, the rest in a spill file read back per image."""

    def __init__(self, draft_size: int | None, budget_bytes: int, spill_path: Path) -> None:
        self.draft_size = draft_size  # the datasets' own: stored pixels are what they would decode
        self.budget, self.used, self.spilled = budget_bytes, 0, 0  # bytes in memory, bytes in the spill file
        self.in_memory: dict[Path, torch.Tensor] = {}
        self.on_disk: dict[Path, tuple[int, tuple[int, int, int]]] = {}  # offset and HxWx3 shape in the spill file
        self.unreadable: dict[Path, str] = {}
        self.spill_path = spill_path
        self._reader: tuple[int, object] | None = None  # (pid, open file): each process reads through its own handle

    def fill(self, paths: Sequence[Path], workers: int, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Decode every path not yet stored, each exactly once, in `workers` processes (in order).
        Returns False when `should_stop` turned true first (what was decoded stays)."""
        missing = [path for path in dict.fromkeys(paths) if path not in self]
        decoder = _Decoder(missing, self.draft_size)
        loader = DataLoader(decoder, batch_size=None, num_workers=workers if missing else 0, collate_fn=_as_is,
                            worker_init_fn=ignore_interrupts)
        for index, pixels, reason in loader:
            if should_stop():
                return False
            if pixels is None:
                self.unreadable[missing[index]] = reason
            else:
                self._keep(missing[index], pixels)
        return True

    def __contains__(self, path: Path) -> bool:
        return path in self.in_memory or path in self.on_disk or path in self.unreadable

    def _keep(self, path: Path, pixels: np.ndarray) -> None:
        if self.used + pixels.nbytes <= self.budget:
            self.in_memory[path] = torch.from_numpy(pixels)
            self.used += pixels.nbytes
            return
        offset = self.spilled
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill_path, "ab" if offset else "wb") as spill:  # "wb": a file left by an interrupted run is stale
                spill.write(pixels.data)
        except OSError as error:
            raise ThawError(
                f"cannot keep decoded images in {self.spill_path} ({error.strerror or error}); free disk space there, "
                f"or give the run more memory for them (decoded_memory_gb, now {self.budget / 2**30:g} GB)"
            ) from None
        self.on_disk[path] = (offset, pixels.shape)
        self.spilled += pixels.nbytes

    def image(self, path: Path) -> Image.Image:
        """The image as decoding the file gives it. Raises UnreadableImage for a file that failed to decode."""
        return Image.fromarray(self._pixels(path).numpy())

    def _pixels(self, path: Path) -> torch.Tensor:
        if path in self.in_memory:
            return self.in_memory[path]
        if path in self.on_disk:
            offset, shape = self.on_disk[path]
            pixels = np.empty(shape, dtype=np.uint8)
            reader = self._spill_reader()
            reader.seek(offset)
            if reader.readinto(memoryview(pixels).cast("B")) != pixels.nbytes:  # never train on uninitialised memory
                raise ThawError(f"{self.spill_path} lost decoded images while the run trained; do not delete it until the run ends")
            return torch.from_numpy(pixels)
        if path in self.unreadable:
            raise UnreadableImage(self.unreadable[path])
        raise KeyError(f"{path} was never decoded into the store")

    def _spill_reader(self):
        if self._reader is None or self._reader[0] != os.getpid():  # a worker process seeks its own handle
            self._reader = (os.getpid(), open(self.spill_path, "rb"))  # noqa: SIM115 - closed by release()
        return self._reader[1]

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_reader": None}  # a worker started by spawn opens the file itself

    def release(self) -> None:
        """Free the pixels and delete the spill file (the run is over)."""
        if self._reader is not None and self._reader[0] == os.getpid():
            self._reader[1].close()
        self._reader = None
        self.in_memory.clear()
        self.on_disk.clear()
        self.used = self.spilled = 0
        self.spill_path.unlink(missing_ok=True)
