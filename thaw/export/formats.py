"""Export to ONNX or TorchScript; the exported model is run and compared before success is reported.

The comparison runs on inputs the export example never showed: text at other token lengths and
batch sizes (a sequence length baked in as a constant fails there), images at other batch sizes,
and real images in the run's preprocessing where the caller has them (noise alone hides
failures that only show on real pixel statistics).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from thaw._io import left_by_killed_writer, writer_tag, zip_entry_names
from thaw.errors import ThawError, first_line
from thaw.models import ModelAdapter
from thaw.models.lora import merge_lora

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXAMPLE_TEXTS = ("a short text", "a somewhat longer text to classify, with more tokens in it")
NOISE_BATCH_SIZES = (3, 1)  # the example has 2

Inputs = tuple[torch.Tensor, ...]
Runner = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class ExportCheck:
    """The largest output difference from PyTorch, and what the exported model was compared on."""

    difference: float
    real_images: int = 0
    noise_batches: int = 0
    token_lengths: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    weights_file: Path | None = None  # an ONNX model past torch's size limit keeps its weights beside it, in this file


class _PositionalText(nn.Module):
    """A text classifier taking tensors by position (exporters want positional inputs, not a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(inputs)


@dataclass(frozen=True)
class _Exportable:
    """The module to export, its example inputs, their names, and the inputs to check the export on."""

    model: nn.Module
    example: Inputs
    names: tuple[str, ...]
    checks: tuple[Inputs, ...]

    @property
    def text(self) -> bool:
        return self.names != ("images",)


def _tokens(adapter: ModelAdapter, texts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    limit = adapter.preprocessing.max_length
    encoded = adapter.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
    return {name: encoded[name] for name in TEXT_INPUTS if name in encoded}


def _text_checks(adapter: ModelAdapter) -> tuple[tuple[str, ...], ...]:
    """Texts at the example's length (batch 3), far shorter (batch 1) and at max_length (batch 4)."""
    longest = " ".join(["word"] * 2 * adapter.preprocessing.max_length)  # truncated to max_length tokens
    return (EXAMPLE_TEXTS + ("third",), ("hi",), ("a short text", longest, "third", "one more text"))


def _noise(batch: int, size: int) -> Inputs:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)


STAGING = ".thaw-export-"  # then this machine's name and the exporting process's id, so a killed one's is known


def _staging_prefix() -> str:
    return f"{STAGING}{writer_tag()}"


def _remove_killed_exports(folder: Path) -> None:
    """Remove the staging folders that exports killed mid-way (kill -9) on this machine left in `folder`: they hold
    a whole model each, and would stay for good. Another machine's (a shared disk) cannot be checked: left alone."""
    for staged in folder.glob(f"{STAGING}*"):
        if staged.is_dir() and left_by_killed_writer(staged.name[len(STAGING):]):
            shutil.rmtree(staged, ignore_errors=True)


def _exportable(adapter: ModelAdapter, images: list[torch.Tensor] | None = None) -> _Exportable:
    model = adapter.model.float().eval().to(memory_format=torch.contiguous_format)
    if hasattr(adapter, "tokenizer"):
        example = _tokens(adapter, EXAMPLE_TEXTS)
        checks = tuple(tuple(_tokens(adapter, texts).values()) for texts in _text_checks(adapter))
        return _Exportable(_PositionalText(model), tuple(example.values()), tuple(example), checks)
    size = adapter.preprocessing.crop_size
    checks = tuple(_noise(batch, size) for batch in NOISE_BATCH_SIZES) + (((torch.stack(images),),) if images else ())
    return _Exportable(model, _noise(2, size), ("images",), checks)


def onnx_data_file(path: Path) -> Path:
    """Where torch.onnx.export puts the weights of a model too large to hold them in the .onnx file itself."""
    return path.with_name(path.name + ".data")


def export_description(meta: dict) -> dict[str, str]:
    """What a copied export needs besides its weights, from the run's metadata: which output is which class, and the
    preprocessing its input expects (the model takes normalised tensors). Each value is JSON text."""
    task = meta.get("task", "image")  # runs before text support recorded no task
    described = {key: meta.get(key) for key in ("model", "classes", "preprocessing")} | {"task": task, "input": EXPORT_INPUTS[task == "text"]}
    return {f"thaw.{key}": json.dumps(value) for key, value in described.items()}


EXPORT_INPUTS = (  # what thaw.preprocessing leaves unsaid: the tensors' layout, type and scale
    "images: float32, N x 3 x H x W, RGB scaled to 0-1, resized, centre-cropped, then normalised by mean and std",
    "input_ids, attention_mask, token_type_ids: int64, N x tokens, from the tokenizer in the run folder's text-model/",
)


ONNX_MARK = "thaw.export"  # in every ONNX file thaw writes, described or not: an export may replace only thaw's own


def _describe_onnx(path: Path, description: dict[str, str]) -> None:
    """Add `description` to the file's metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # weights torch put beside it stay there, named as they were
    for key, value in ({ONNX_MARK: json.dumps(True)} | description).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _export_onnx(exportable: _Exportable, path: Path, max_length: int | None, named: Path, description: dict[str, str]) -> Runner:
    """Write `path` (staged: the user's file is `named`, as messages say) and open it with onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise ThawError(ONNX_NEEDS) from None
    batch = torch.export.Dim("batch", min=1)
    dims = {0: batch, 1: torch.export.Dim("tokens", min=2, max=max_length)} if exportable.text else {0: batch}
    # One file a user can copy alone: the weights inside it. torch still puts them beside it, as PATH.data, where
    # they pass its own limit (about 1.5 GB, below protobuf's 2 GB); the export line then names both files.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exportable.model, exportable.example, str(path), input_names=list(exportable.names), output_names=["logits"],
            dynamic_shapes=tuple(dims for _ in exportable.names), dynamo=True, verbose=False, external_data=False,
        )
    _describe_onnx(path, description)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a file it cannot load
        raise ThawError(f"onnxruntime cannot load the exported {named} ({first_line(error)}); export refused") from None
    names = exportable.names
    return lambda inputs: torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


TORCHSCRIPT_DESCRIPTION = "thaw.json"  # torch.jit.load(path, _extra_files={"thaw.json": ""}) reads it back


def _export_torchscript(exportable: _Exportable, path: Path, description: dict[str, str]) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(exportable.model, exportable.example, strict=False)
        described = {key.removeprefix("thaw."): json.loads(value) for key, value in description.items()}
        traced.save(str(path), _extra_files={TORCHSCRIPT_DESCRIPTION: json.dumps(described)})
        loaded = torch.jit.load(str(path))
    return lambda inputs: loaded(*inputs)


def _shape(inputs: Inputs) -> str:
    return "x".join(map(str, inputs[0].shape))


@torch.no_grad()
def _largest_difference(exportable: _Exportable, run_exported: Runner, fmt: str) -> float:
    """Run PyTorch and the exported model on every check input; a run that fails or differs in shape refuses the export."""
    differences = []
    for inputs in exportable.checks:
        expected = exportable.model(*inputs)
        try:
            exported = run_exported(inputs)
        except Exception as error:  # whatever the runtime raises, the file cannot serve this input
            shape = _shape(inputs)
            raise ThawError(f"the exported {fmt} model fails on an input of shape {shape} ({first_line(error)}); export refused") from None
        if exported.shape != expected.shape:
            raise ThawError(
                f"the exported {fmt} model returns shape {tuple(exported.shape)} for an input of shape {_shape(inputs)}, "
                f"PyTorch {tuple(expected.shape)}; export refused"
            )
        differences.append((exported.float() - expected.float()).abs().max())
    return float(torch.stack(differences).max())  # torch's max keeps a NaN, Python's max() would drop it


@torch.no_grad()
def merge_adapters(adapter: ModelAdapter) -> float | None:
    """Fold LoRA layers into plain weights (exporters and users get an ordinary model); None without LoRA.

    Returns the largest output difference between the adapted and the merged model.
    """
    exportable = _exportable(adapter)
    check = exportable.checks[0]
    before = exportable.model(*check)
    if not merge_lora(adapter.model):
        return None
    difference = float((exportable.model(*check) - before).abs().max())
    if not difference <= TOLERANCE:
        raise ThawError(f"merging the LoRA adapters changed the outputs by {difference:.2e}; export refused")
    return difference


def _summary(exportable: _Exportable, difference: float, real_images: int, weights_file: Path | None) -> ExportCheck:
    if exportable.text:
        lengths = tuple(inputs[0].shape[1] for inputs in exportable.checks)
        batches = tuple(inputs[0].shape[0] for inputs in exportable.checks)
        return ExportCheck(difference, token_lengths=lengths, batch_sizes=batches, weights_file=weights_file)
    return ExportCheck(difference, real_images=real_images, noise_batches=len(NOISE_BATCH_SIZES), weights_file=weights_file)


def is_thaw_export(path: Path, fmt: str) -> bool:
    """Whether the file at `path` is one thaw exported in `fmt`, read from what thaw writes into each: thaw.json in a
    TorchScript archive, thaw.* metadata in an ONNX file (its graph read, its weights not)."""
    if fmt == "torchscript":
        return any(name.endswith(f"/extra/{TORCHSCRIPT_DESCRIPTION}") for name in zip_entry_names(path))
    try:
        with path.open("rb") as handle:
            first = handle.read(1)
    except OSError:  # unreadable: not known to be thaw's, so not replaced
        return False
    if first != ONNX_FIRST_BYTE:  # no ONNX model: not read whole to learn that (it may be gigabytes)
        return False
    onnx = _onnx_module()
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError):  # not ONNX at all
        return False
    return any(entry.key.startswith("thaw.") for entry in proto.metadata_props)  # thaw.classes: before ONNX_MARK was


ONNX_FIRST_BYTE = b"\x08"  # a ModelProto starts with its ir_version, field 1 as a varint, as torch and onnx write it


def _onnx_module():
    try:
        import onnx
    except ImportError:
        raise ThawError(ONNX_NEEDS) from None
    return onnx


ONNX_NEEDS = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'thaw[export]'"


def check_replaceable(path: Path, fmt: str) -> None:
    """Refuse a file at `path` that an export would replace though thaw did not export it in `fmt` (a suffix says
    little: .pt is torch.save's usual name too). An empty file (mktemp's) loses nothing and is replaced."""
    if path.is_file() and path.stat().st_size and not is_thaw_export(path, fmt):
        raise ThawError(f"{path} exists and is no {fmt} model thaw exported; it is left as it was: write the export to "
                        "another file, or move that one away first")


def export_model(
    adapter: ModelAdapter, path: Path | str, fmt: str, images: list[torch.Tensor] | None = None, description: dict[str, str] | None = None
) -> ExportCheck:
    """Write `path` in `fmt`, compare its outputs with PyTorch's, and refuse past TOLERANCE.

    The file is written and checked in a hidden folder beside `path`, then renamed into place: a refused export
    leaves whatever was at `path` as it was. Only an earlier thaw export of `fmt` is replaced: any other file there (a
    checkpoint saved as .pt, another tool's .onnx and its .onnx.data) is refused before any work, untouched.
    `images`: preprocessed image tensors (C, H, W) of the run's data, compared on besides noise.
    `description`: what the file carries besides the model (export_description of the run's metadata).
    """
    if fmt not in FORMATS:
        raise ThawError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    path = Path(path)
    if path.exists() and not path.is_file():  # /dev/null, a pipe: renamed over, it would be gone
        raise ThawError(f"{path} is not a regular file (a device or a pipe); name a file to write")
    check_replaceable(path, fmt)
    merge_adapters(adapter)
    exportable = _exportable(adapter, images)
    max_length = adapter.preprocessing.max_length if exportable.text else None
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = path.is_file()  # an earlier export here: a weights file beside it is that export's, stale after this one
    _remove_killed_exports(path.parent)
    with tempfile.TemporaryDirectory(prefix=_staging_prefix(), dir=path.parent) as folder:
        staged = Path(folder) / path.name  # the final name: an ONNX file names its weights file by it
        described = description or {}
        if fmt == "onnx":
            run_exported = _export_onnx(exportable, staged, max_length, path, described)
        else:
            run_exported = _export_torchscript(exportable, staged, described)
        difference = _largest_difference(exportable, run_exported, fmt)
        if not difference <= TOLERANCE:
            raise ThawError(f"the exported {fmt} model's outputs differ from PyTorch's by {difference:.2e}; export refused")
        weights = onnx_data_file(staged) if onnx_data_file(staged).is_file() else None
        if weights is not None:
            os.replace(weights, onnx_data_file(path))
        elif earlier and fmt == "onnx":  # never a PATH.data beside no earlier export: that may be anyone's file
            onnx_data_file(path).unlink(missing_ok=True)
        os.replace(staged, path)
    return _summary(exportable, difference, len(images or ()), onnx_data_file(path) if weights is not None else None)
