"""Writing a run folder: safetensors weights plus JSON (loading it never runs code), metrics.csv, plots.

Training writes the folder; the export layer's run_dir reads it back by the names declared here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from safetensors.torch import load_file, save_file

from thaw._io import atomic_write, process_gone
from thaw.errors import ThawError
from thaw._version import __version__
from thaw.models import ModelAdapter, Preprocessing
from thaw.models.hf_text import TextPreprocessing
from thaw.models.lora import adapter_param_names, tensor_digest
from thaw.plan.config import plan_from_dict
from thaw.train.checkpoint import CHECKPOINT, CLASSES_KEY, load_checkpoint
from thaw.train.plots import plot_confusion, plot_curves

if TYPE_CHECKING:
    from thaw.train.fit import RunResult

METADATA = "thaw.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
TEXT_MODEL = "text-model"  # tokenizer files and the encoder's config.json
REPORT = "report.html"  # thaw report, or thaw train --report
TYPED_OPTIONS = "command.json"  # thaw train's plan options as typed, so a resume can compare typed ones
TENSORBOARD_FOLDER = "tensorboard"  # --log tensorboard
ONNX_EXPORT, TORCHSCRIPT_EXPORT = "model.onnx", "model.pt"  # thaw export's default files
EXPORTS = (ONNX_EXPORT, ONNX_EXPORT + ".data", TORCHSCRIPT_EXPORT)  # .data: where torch puts a large model's ONNX weights
# What a run and the commands on it write into its folder: a new run there replaces all of it (--overwrite), so
# that no file of the old run (an export, a report, TensorBoard events) is left beside the new run's weights.
# The user's own files (an lr-find plot put there for the report, say) stay.
RUN_FILES = (METADATA, WEIGHTS, ADAPTER, CHECKPOINT, TYPED_OPTIONS, "metrics.csv", "curves.png", "confusion.png", REPORT, *EXPORTS)
RUN_FOLDERS = (TEXT_MODEL, TENSORBOARD_FOLDER)
EVALUATE_PLOTS = "confusion-*.png"  # thaw evaluate's, one per split
OTHER_DATA_REPORTS = "report--*.html"  # thaw report's on data other than the run's own, one per data name
LOCK = ".thaw-training"  # in the run folder while a process trains into it: a second one there would lose one of the two runs
SET_ASIDE = ".replaced-run"  # in the run folder: the old run, while a new one replaces it, until the new one's first checkpoint
CSV_COLUMNS = [
    "epoch", "stage", "stage_index", "stage_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "val_macro_f1", "val_top5", "images_per_s", "seconds", "cached", "data_wait_share",
]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda target: target.write_text(text))


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def versions() -> dict[str, str]:
    return {"thaw": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


def write_run(out: Path, metadata: dict, history: list[dict], classes: list[str], best: dict) -> dict[str, Path]:
    """Everything a user reads after a run; returns the files written. METADATA last: its presence says the run
    ended (is_finished), so a kill before it leaves a run that --resume finishes, files and all."""
    write_metrics_csv(out / "metrics.csv", history)
    files = {"metrics": out / "metrics.csv", "weights": out / WEIGHTS}
    if history:
        files["curves"] = plot_curves(history, out / "curves.png")
    if best.get("val", {}).get("confusion"):
        files["confusion"] = plot_confusion(best["val"]["confusion"], classes, out / "confusion.png", f"val, epoch {best['epoch']}")
    write_text(out / METADATA, json.dumps(metadata | {"versions": versions()}, indent=2))
    return {"metadata": out / METADATA} | files


def adapter_state_names(adapter: ModelAdapter, state: dict[str, torch.Tensor]) -> list[str]:
    """What a LoRA run changed, in `state`: adapter weights and the head always, and every other tensor whose
    digest differs from the base weights `add_lora` saw (layers a stage trained in full, BatchNorm statistics
    and any buffer; PEFT once left the statistics out, so a reloaded model differed: huggingface/peft #1732)."""
    always = set(adapter_param_names(adapter.model)) | set(adapter.group("head").params)
    base = getattr(adapter, "lora_base", {})  # none recorded: keep everything rather than guess
    return [name for name, tensor in state.items() if name in always or _differs(tensor, base.get(name))]


def _differs(tensor: torch.Tensor, base_digest: str | None) -> bool:
    return base_digest is None or tensor_digest(tensor) != base_digest


def save_adapter(out: Path, adapter: ModelAdapter, classes: Sequence[str]) -> Path:
    """ADAPTER beside the full weights: the best epoch's changed tensors only, for use on the base model. Its header
    records the run's `classes` in head order, as the full weights do, so `load_adapter` can label the outputs and
    refuse an adapter from a run on other classes."""
    best = load_file(str(out / WEIGHTS))
    kept = {name: best[name] for name in adapter_state_names(adapter, best)}
    header = {"format": "thaw-lora/1", CLASSES_KEY: json.dumps(list(classes))}
    atomic_write(out / ADAPTER, lambda target: save_file(kept, str(target), metadata=header))
    return out / ADAPTER


def save_text_model(out: Path, adapter: ModelAdapter) -> Path:
    """The tokenizer and encoder config, so the run loads without the folder it was trained from."""
    folder = out / TEXT_MODEL
    adapter.tokenizer.save_pretrained(str(folder))
    adapter.model.encoder.config.save_pretrained(str(folder))
    return folder


def preprocessing_dict(preprocessing: Preprocessing | TextPreprocessing) -> dict:
    return asdict(preprocessing)


def holds_run(out: Path) -> bool:
    """Whether `out` holds a run: its metadata (a finished run), a checkpoint (one stopped on the way), or a run set
    aside by a replacement that was killed before its first checkpoint."""
    return (out / METADATA).is_file() or (out / CHECKPOINT).is_file() or (out / SET_ASIDE).is_dir()


def is_run_file(path: Path) -> bool:
    """Whether `path` is one of a run's own files (its weights, record, checkpoint, text model: what only training
    writes), which a command that writes a file on request (export, convert-weights) must not replace."""
    path, own = Path(path), {name.lower() for name in RUN_FILES} - {name.lower() for name in EXPORTS}
    if path.parent.name.lower() in RUN_FOLDERS and holds_run(path.parent.parent):
        return True
    return path.name.lower() in own and holds_run(path.parent)  # in any case: macOS and Windows names ignore it


def is_finished(run: Path) -> bool:
    """Whether the run in `run` has ended: METADATA is the last file its end writes (after the adapter or text model
    it saves; write_run), and a replacement (--overwrite) moves the old run's aside before it trains."""
    return (Path(run) / METADATA).is_file()


# A finished run's damaged checkpoint loses nothing that was delivered: no need to start again.
FINISHED_CHECKPOINT_REMEDY = (
    "the run is complete and the model it delivered is in its other files: use the run with thaw evaluate, predict or export"
)


def finished_result(run: Path) -> RunResult:
    """A finished run's result as it recorded it, read without writing: a resume of it has nothing left to train, and
    training "again" would rewrite METADATA with the empty resume's time and speed."""
    from thaw.train.fit import RunResult  # fit imports this module

    meta = read_finished(run / METADATA)
    saved = load_checkpoint(run / CHECKPOINT, FINISHED_CHECKPOINT_REMEDY) if (run / CHECKPOINT).is_file() else {}
    result = RunResult(
        run, saved.get("best", meta["best"]), saved.get("history", []), meta.get("wall_s", 0.0), meta.get("images_per_s", 0.0),
        [(item["path"], item["reason"]) for item in meta.get("skipped_files", [])],
        None,  # nothing ran, so there is no engine to describe
        plan_from_dict(meta["plan"], f"{run / METADATA} plan"), meta.get("budget"),
    )
    result.files = {key: run / name for key, name in FINISHED_FILES.items() if (run / name).exists()}
    return result


def read_finished(path: Path) -> dict:
    """A finished run's METADATA (at `path`), or one line saying it is damaged."""
    return read_run_json(path, {"best": dict, "plan": dict}, "restore it from a copy, or train again with --overwrite")


def read_run_json(path: Path, required: dict[str, type], remedy: str) -> dict:
    """METADATA at `path` holding the `required` keys with values of their types (top level; the class names and the
    delivered epoch's record too), or one line saying what is damaged and what to do (`remedy`)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ThawError(f"{path} is damaged (not JSON); {remedy}") from None
    except OSError as error:
        raise ThawError(f"cannot read {path} ({error.strerror or error}); {remedy}") from None
    missing = [key for key in required if key not in meta] if isinstance(meta, dict) else list(required)
    if missing:
        raise ThawError(f"{path} is damaged (no {', '.join(missing)}); {remedy}")
    wrong = [f"{key} is not a {kind.__name__}" for key, kind in required.items() if not isinstance(meta[key], kind)]
    if "classes" in required and isinstance(meta["classes"], list) and not all(isinstance(name, str) for name in meta["classes"]):
        wrong.append("classes is not a list of names")
    best = meta.get("best") if "best" in required else None
    if isinstance(best, dict) and not (isinstance(best.get("epoch"), int) and isinstance(best.get("val"), dict)):
        wrong.append("best has no epoch and val record")
    if wrong:
        raise ThawError(f"{path} is damaged ({', '.join(wrong)}); {remedy}")
    return meta


# write_run's keys for the files it writes, and the adapter and text model a LoRA or text run adds
FINISHED_FILES = {
    "metadata": METADATA, "metrics": "metrics.csv", "weights": WEIGHTS, "curves": "curves.png", "confusion": "confusion.png",
    "adapter": ADAPTER, "text_model": TEXT_MODEL,
}


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run where another one lies, unless asked to replace it: the new run would overwrite the
    old one's weights and checkpoint and leave its exports and report beside them, describing another model."""
    if overwrite:
        return
    check_nothing_set_aside(out)
    if holds_run(out):
        raise ThawError(
            f"{out} holds a run already; continue it with --resume {shlex.quote(str(out))}, write the new run elsewhere with another --out, "
            "or replace the old one with --overwrite (from Python: resume=True, another out, or overwrite=True)"
        )
    # What training writes once a checkpoint exists (its report with --report; thaw report RUN takes report.html as the
    # run's): a start killed before its first checkpoint leaves command.json and may leave model.safetensors, and an
    # export's name (model.pt) training never writes
    taken = [name for name in AFTER_CHECKPOINT if (out / name).exists()]
    if taken:  # no run's: the user's own metrics.csv, curves.png or report.html, which the new run's would replace
        them = "it" if len(taken) == 1 else "them"
        raise ThawError(
            f"{out} holds {', '.join(taken[:4])}{' ...' if len(taken) > 4 else ''} but no run: the new run would write over "
            f"{them}; move {them} away, write the run elsewhere with another --out, or replace {them} with --overwrite "
            "(from Python: another out, or overwrite=True)"
        )


def check_nothing_set_aside(out: Path) -> None:
    """Refuse a folder whose run a replacement set aside and was killed before its first checkpoint (kill -9, a power
    cut): that run is the only one there, and neither a new run nor a resume must take its place unasked."""
    if (out / SET_ASIDE).is_dir():
        raise ThawError(
            f"{out} holds a run set aside by a replacement that stopped before its first checkpoint ({out / SET_ASIDE}); "
            f"to keep it, move the files in {SET_ASIDE} back into {out}; to replace it, add --overwrite (overwrite=True)"
        )


def run_entries(out: Path) -> list[Path]:
    """What a run and the commands on it wrote into `out` (RUN_FILES, RUN_FOLDERS, evaluate's plots, reports on other
    data); nothing else."""
    named = [out / name for name in (*RUN_FILES, *RUN_FOLDERS) if (out / name).exists()]
    return named + sorted(out.glob(EVALUATE_PLOTS)) + sorted(out.glob(OTHER_DATA_REPORTS))


def remove_run_files(out: Path) -> None:
    for path in run_entries(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def set_aside_run(out: Path) -> Path:
    """Move the run in `out` into out/SET_ASIDE as a new run replaces it (--overwrite): the new run starts clean, and
    the old one comes back (restore_run) if the new one ends before its first checkpoint."""
    aside = out / SET_ASIDE
    if aside.is_dir():  # a replacement killed before its first checkpoint set the old run aside: what lies beside it is its own
        remove_run_files(out)
        return aside
    aside.mkdir()
    moved = []
    try:
        for path in run_entries(out):
            path.rename(aside / path.name)
            moved.append(path)
    except OSError:  # a file that cannot move (locked, say): the old run goes back whole, and the new run stops here
        for path in moved:
            (aside / path.name).rename(path)
        aside.rmdir()
        raise
    return aside


def restore_run(out: Path, aside: Path) -> None:
    """Put the set-aside run back: what the new run wrote before it ended goes."""
    remove_run_files(out)
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()


class RunInUse(ThawError):
    """Another process trains into the run folder: refused, and nothing of the folder is touched (not even undone)."""


@contextmanager
def training_lock(out: Path) -> Iterator[None]:
    """Hold RUN/LOCK while training: two runs started into one --out both ran to the end, and one was lost without a
    word. A lock left by a process that is gone (kill -9, a power cut) on this machine is taken over."""
    lock = out / LOCK
    if _take_lock(lock):  # only then: with no lock here, the last run may be writing its final files, unlocked
        _remove_killed_writes(out)
    try:
        yield
    finally:
        if _lock_holder(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


# The files only training writes into its folder: a temporary copy of one (atomic_write's) found on taking over the
# lock of a process that is gone was left by it, killed mid-write (kill -9, a power cut), and would stay for good.
AFTER_CHECKPOINT = ("metrics.csv", "curves.png", "confusion.png", REPORT)  # written by write_run, or the report after it
TRAINING_WRITES = (METADATA, WEIGHTS, ADAPTER, CHECKPOINT, TYPED_OPTIONS, "metrics.csv", "curves.png", "confusion.png")


def _remove_killed_writes(out: Path) -> None:
    for name in TRAINING_WRITES:
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _take_lock(lock: Path) -> bool:
    """Take the lock; True where it was taken over from a process that is gone."""
    took_over = False
    for _ in range(3):  # a stale lock removed, then taken: another process may take it in between
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if _is_held(holder, lock):
                where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
                since = time.strftime("%H:%M", time.localtime(holder["since"])) if isinstance(holder.get("since"), (int, float)) else "?"
                raise RunInUse(
                    f"{lock.parent} is being trained into by another thaw (process {holder.get('pid', '?')}{where}, since {since}); "
                    f"wait for it to end, or choose another --out (if no thaw runs there, remove {lock})"
                ) from None
            lock.unlink(missing_ok=True)
            took_over = True
            continue
        with os.fdopen(descriptor, "w") as file:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, file)
        return took_over
    raise RunInUse(f"{lock.parent}: another thaw keeps starting a run there; choose another --out")


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_held(holder: dict, lock: Path) -> bool:
    """Whether the process named in a lock may still be training. One on another machine (a shared disk) cannot be
    checked: held. A lock not yet written is held for a few seconds (its process is writing it), then stale."""
    if not holder:
        try:
            return time.time() - lock.stat().st_mtime < 10
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return isinstance(pid, int) and pid > 0 and not process_gone(pid)
