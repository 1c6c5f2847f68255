"""What a run's model gets wrong: per-sample losses, the most confused pairs, Grad-CAM heat maps, thumbnails.

fastai's ClassificationInterpretation (`top_losses`, `most_confused`) as data, for the report to render.
Grad-CAM (Selvaraju et al. 2017) is written here with two hooks on the adapter's feature layer rather
than taken from a package: `grad-cam` pulls in OpenCV, and the method is a dozen lines.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from thaw.data.images import UnreadableImage, load_rgb
from thaw.data.transforms import eval_transform
from thaw.errors import first_line
from thaw.export.inference import ScoredSet
from thaw.models.adapter import ModelAdapter

THUMBNAIL_PX = 96


@dataclass(frozen=True)
class TopLoss:
    """One scored sample the model got most wrong."""

    sample: Path | str  # the image file, or the text itself
    true: int
    predicted: int
    probability: float  # of the predicted class
    true_probability: float
    loss: float


def top_losses(scored: ScoredSet, count: int) -> list[TopLoss]:
    """The `count` samples with the highest cross-entropy loss, highest first."""
    order = torch.argsort(scored.losses, descending=True, stable=True)[:count]
    return [
        TopLoss(
            scored.samples[i][0], scored.samples[i][1], int(scored.predicted[i]), float(scored.probability[i]),
            float(scored.true_probability[i]), float(scored.losses[i]),
        )
        for i in order.tolist()
    ]


def most_confused(confusion: list[list[int]], classes: list[str], count: int = 10) -> list[tuple[str, str, int]]:
    """(true, predicted, how often) for the off-diagonal cells, most frequent first; zero cells left out."""
    pairs = [(classes[t], classes[p], n) for t, row in enumerate(confusion) for p, n in enumerate(row) if t != p and n]
    return sorted(pairs, key=lambda pair: -pair[2])[:count]


def jpeg_base64(image: Image.Image, size: int = THUMBNAIL_PX) -> str:
    """A small JPEG of `image`, base64: what the report inlines."""
    small = image.convert("RGB")
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(path: Path) -> str | None:
    """The original image (not the model's crop), small; None when it no longer decodes."""
    try:
        return jpeg_base64(load_rgb(path, 2 * THUMBNAIL_PX))
    except (UnreadableImage, OSError):
        return None


def is_convolutional(model: nn.Module) -> bool:
    """Grad-CAM explains spatial feature maps: convolutional nets, not transformers (ViT's patch grid is not one)."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    has_attention = any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())
    return has_conv and not has_attention


def feature_layer(adapter: ModelAdapter, image: torch.Tensor) -> str | None:
    """The module that computes the last spatial feature map before the head (ResNet: layer4), found by
    watching one forward pass; None when the model has none."""
    seen: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.append(name) if _is_map(out) else None)
        for name, module in adapter.model.named_modules()
        if name and not adapter.in_head(name)
    ]
    try:
        with torch.no_grad():
            adapter.model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    return seen[-1] if seen else None


def _is_map(output: object) -> bool:
    return isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1


def grad_cam(adapter: ModelAdapter, layer: str, image: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM of class `target` on `layer`: the map's channels weighted by their mean gradient, ReLU, in [0, 1]."""
    captured: dict[str, torch.Tensor] = {}
    module = adapter.model.get_submodule(layer)
    handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("map", out))
    try:
        with torch.enable_grad():
            inputs = image[None].clone().requires_grad_(True)  # gradients reach the map even when no weight needs them
            score = adapter.model(inputs)[0, target]
            (gradient,) = torch.autograd.grad(score, captured["map"])
    finally:
        handle.remove()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * captured["map"]).sum(dim=1))[0].detach().float()
    return cam / cam.max() if cam.max() > 0 else cam


def heat_map_overlay(adapter: ModelAdapter, image: torch.Tensor, cam: torch.Tensor) -> Image.Image:
    """The model's view of the image (resized, centre-cropped, as it was scored) with the map over it."""
    from matplotlib import colormaps

    mean = torch.tensor(adapter.preprocessing.mean)[:, None, None]
    std = torch.tensor(adapter.preprocessing.std)[:, None, None]
    view = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)
    resized = nn.functional.interpolate(cam[None, None], size=view.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    colours = torch.from_numpy(colormaps["jet"](resized.numpy())[..., :3]).float()
    blended = (0.55 * view + 0.45 * colours).clamp(0, 1)
    return Image.fromarray((blended * 255).round().to(torch.uint8).numpy())


def heat_maps(adapter: ModelAdapter, losses: list[TopLoss]) -> tuple[dict[int, str], str]:
    """Grad-CAM overlays (base64 JPEG) for image top losses, by position in `losses`, and a line saying
    where they come from, or why there are none."""
    model = adapter.model
    if not losses:
        return {}, "no samples were scored"
    if isinstance(losses[0].sample, str):
        return {}, "heat maps are for image models"
    if not is_convolutional(model):
        return {}, "heat maps not shown: Grad-CAM needs a convolutional feature map, and this model is a transformer"
    modes = {module: module.training for module in model.modules()}  # put back after: the caller's model, as it was
    model.eval()
    try:
        drawn, layer = _draw_heat_maps(adapter, losses)
    except Exception as error:  # noqa: BLE001 - an unusual layer should cost the heat maps, not the report
        return {}, f"heat maps not shown: Grad-CAM failed on this model ({type(error).__name__}: {first_line(error)})"
    finally:
        for module, training in modes.items():
            module.train(training)
    if layer is None and drawn is not None:
        return {}, "heat maps not shown: none of these images decodes now"
    if drawn is None:
        return {}, "heat maps not shown: the model has no spatial feature map before its head"
    return drawn, f"Grad-CAM of the predicted class on `{layer}`, the last feature map before the head, over the model's crop"


def _draw_heat_maps(adapter: ModelAdapter, losses: list[TopLoss]) -> tuple[dict[int, str] | None, str | None]:
    """The overlays and the layer they explain; (None, None) when the model has no feature map to explain."""
    device = next(adapter.model.parameters()).device
    transform, drawn, layer = eval_transform(adapter.preprocessing), {}, None
    for index, item in enumerate(losses):
        try:
            image = transform(load_rgb(item.sample, 2 * adapter.preprocessing.resize_size)).to(device)
        except (UnreadableImage, OSError):
            continue
        layer = layer or feature_layer(adapter, image)
        if layer is None:
            return None, None
        drawn[index] = jpeg_base64(heat_map_overlay(adapter, image, grad_cam(adapter, layer, image, item.predicted)))
    return drawn, layer
