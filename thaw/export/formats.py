"""Export to ONNX or TorchScript; the exported model is run and compared before success is reported."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from thaw.errors import ThawError
from thaw.models import ModelAdapter

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-3


def _example(adapter: ModelAdapter, batch: int) -> torch.Tensor:
    size = adapter.preprocessing.crop_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=generator)


def export_onnx(adapter: ModelAdapter, path: Path) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise ThawError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'thaw[export]'") from None
    model = adapter.model.float().eval().to(memory_format=torch.contiguous_format)
    example = _example(adapter, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = _example(adapter, 3)
    (exported,) = session.run(None, {"images": check.numpy()})
    with torch.no_grad():
        expected = model(check)
    return float((torch.from_numpy(exported) - expected).abs().max())


def export_torchscript(adapter: ModelAdapter, path: Path) -> float:
    model = adapter.model.float().eval().to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, _example(adapter, 2))
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    check = _example(adapter, 3)
    with torch.no_grad():
        return float((loaded(check) - model(check)).abs().max())


def export_model(adapter: ModelAdapter, path: Path, fmt: str) -> float:
    """Write `path` in `fmt` and return the largest output difference from PyTorch; refuse past TOLERANCE."""
    if fmt not in FORMATS:
        raise ThawError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    difference = export_onnx(adapter, path) if fmt == "onnx" else export_torchscript(adapter, path)
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise ThawError(f"the exported {fmt} model's outputs differ from PyTorch's by {difference:.2e}; export refused")
    return difference
