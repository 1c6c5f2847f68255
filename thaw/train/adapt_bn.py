"""AdaBN (BatchNorm policy `adapt`): the running statistics of every BatchNorm layer re-estimated on the
user's training images before a stage trains, so a frozen network normalises their features by their own
statistics rather than ImageNet's. One pass, evaluation view, no gradients; the weights are untouched.

The estimate is torch.optim.swa_utils.update_bn's (batch statistics averaged over the batches, momentum None),
with dropout left off, and over shuffled batches: batches cut from class-ordered samples would each hold one
class and leave the variance between classes out of the estimate.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch import distributed as dist

from thaw.data.loaders import Batch
from thaw.distributed import Processes
from thaw.plan.freeze import batch_norms, estimating_statistics
from thaw.train.loop import Engine


def has_statistics(model: nn.Module) -> bool:
    return any(layer.track_running_stats for _, layer in batch_norms(model))


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[Batch], engine: Engine, processes: Processes) -> int:
    """Re-estimate the statistics from `batches`; returns the images seen (over all ranks). Under several
    processes each rank sees its shard and the ranks' estimates are averaged weighted by the images each saw,
    so every rank holds the same. Where no batch had two images (no batch statistics at all) the statistics
    are left as they were."""
    layers = [layer for _, layer in batch_norms(model) if layer.track_running_stats]
    before = [(layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()) for layer in layers]
    seen = 0
    with estimating_statistics(model):
        for batch in batches:
            engine.note_failures(batch.failed)
            if len(batch.labels) < 2:  # one image has no batch statistics to average in
                continue
            with engine.autocast():
                model(engine.to_device(batch.images))
            seen += len(batch.labels)
    if processes.distributed:
        seen = _combine_ranks(layers, seen)
    if seen == 0:
        for layer, (mean, var, tracked) in zip(layers, before):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(tracked)
    return seen


def _combine_ranks(layers: list[nn.modules.batchnorm._BatchNorm], seen: int) -> int:
    """Every rank's statistics weighted by its images, in one all-reduce; returns the images over all ranks."""
    device = layers[0].running_mean.device if layers else torch.device("cpu")  # a collective's device: the model's
    parts = [torch.cat([layer.running_mean, layer.running_var]).float() * seen for layer in layers]
    flat = torch.cat([*parts, torch.tensor([float(seen)], device=device)])
    dist.all_reduce(flat)
    total = int(flat[-1].item())
    if total:
        offset = 0
        for layer in layers:
            size = layer.running_mean.numel()
            layer.running_mean.copy_(flat[offset : offset + size] / total)
            layer.running_var.copy_(flat[offset + size : offset + 2 * size] / total)
            offset += 2 * size
    return total
