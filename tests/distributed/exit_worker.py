"""A rank whose last work is a collective, then exits (run under torchrun by test_torchrun.py).

Its DDP wrapper keeps the gloo group (and its threads) alive to interpreter exit, as a training
run's does; the gathers leave tensors for gloo's threads to drop as the process ends.
"""

from __future__ import annotations

import torch
from torch import nn

from thaw import distributed


def main() -> nn.Module:
    processes = distributed.from_environment()
    distributed.start(processes, "cpu")
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()
    for index in range(20):
        distributed.gather_lists([("unreadable.jpg", index)])
    return model


if __name__ == "__main__":
    trained = main()  # kept to the end, as a script keeps what train_images returned
