"""Export to ONNX or TorchScript; the exported model is run and compared before success is reported."""

from __future__ import annotations

import warnings
from pathlib import Path

from typing import Callable

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.models.lora import merge_lora

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3


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


def _text_inputs(adapter: ModelAdapter, batch: int) -> dict[str, torch.Tensor]:
    texts = ["a short text", "a somewhat longer text to classify, with more tokens in it", "third"][:batch]
    encoded = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    return {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded}


def _exportable(adapter: ModelAdapter) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, ...]], tuple[str, ...]]:
    """The module to export, example inputs by batch size, and the input names."""
    model = adapter.model.float().eval().to(memory_format=torch.contiguous_format)
    if hasattr(adapter, "tokenizer"):
        names = tuple(_text_inputs(adapter, 2))
        return _PositionalText(model), lambda batch: tuple(_text_inputs(adapter, batch).values()), names
    size = adapter.preprocessing.crop_size
    return model, lambda batch: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),), ("images",)


def export_onnx(adapter: ModelAdapter, path: Path) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise ThawError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'thaw[export]'") from None
    model, example, names = _exportable(adapter)
    text = names != ("images",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1)
        dims = {0: batch, 1: torch.export.Dim("tokens", min=2, max=adapter.preprocessing.max_length)} if text else {0: batch}
        torch.onnx.export(model, example(2), str(path), input_names=list(names), output_names=["logits"], dynamic_shapes=tuple(dims for _ in names), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example(3)
    (exported,) = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, check)})
    with torch.no_grad():
        expected = model(*check)
    return float((torch.from_numpy(exported) - expected).abs().max())


def export_torchscript(adapter: ModelAdapter, path: Path) -> float:
    model, example, _ = _exportable(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example(2), strict=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    check = example(3)
    with torch.no_grad():
        return float((loaded(*check) - model(*check)).abs().max())


@torch.no_grad()
def merge_adapters(adapter: ModelAdapter) -> float | None:
    """Fold LoRA layers into plain weights (exporters and users get an ordinary model); None without LoRA.

    Returns the largest output difference between the adapted and the merged model.
    """
    model, example, _ = _exportable(adapter)
    check = example(3)
    before = model(*check)
    if not merge_lora(adapter.model):
        return None
    difference = float((model(*check) - before).abs().max())
    if not difference <= TOLERANCE:
        raise ThawError(f"merging the LoRA adapters changed the outputs by {difference:.2e}; export refused")
    return difference


def export_model(adapter: ModelAdapter, path: Path, fmt: str) -> float:
    """Write `path` in `fmt` and return the largest output difference from PyTorch; refuse past TOLERANCE."""
    if fmt not in FORMATS:
        raise ThawError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    merge_adapters(adapter)
    difference = export_onnx(adapter, path) if fmt == "onnx" else export_torchscript(adapter, path)
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise ThawError(f"the exported {fmt} model's outputs differ from PyTorch's by {difference:.2e}; export refused")
    return difference
