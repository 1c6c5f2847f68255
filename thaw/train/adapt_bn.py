"""AdaBN (BatchNorm policy `adapt`): the running statistics of every BatchNorm layer re-estimated on the
user's training images before a stage trains, so a frozen network normalises their features by their own
statistics rather than ImageNet's. One pass, evaluation view, no gradients; the weights are untouched.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from thaw import distributed
from thaw.data.loaders import Batch
from thaw.distributed import Processes
from thaw.plan.freeze import batchnorm_layers, estimating_statistics
from thaw.train.loop import Engine


def has_statistics(model: nn.Module) -> bool:
    return any(layer.track_running_stats for _, layer in batchnorm_layers(model))


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[Batch], engine: Engine, processes: Processes) -> int:
    """Re-estimate the statistics from `batches`; returns the images seen (on this rank). Under several
    processes each rank sees its shard and the statistics are then averaged, so every rank holds the same."""
    seen = 0
    with estimating_statistics(model) as layers:
        for batch in batches:
            engine.note_failures(batch.failed)
            if len(batch.labels) < 2:  # one image has no batch statistics to average in
                continue
            with engine.autocast():
                model(engine.to_device(batch.images))
            seen += len(batch.labels)
        if processes.distributed:
            for layer in layers:
                for statistic in (layer.running_mean, layer.running_var):
                    distributed.average_tensor(statistic)
    return seen
