"""What the distributed tests launch with torchrun (or alone, for the single-process comparison).

A two-phase run on a small image folder; after every optimizer step each rank
appends a digest of every parameter that trains, so the test can compare ranks
step by step. `--fail-rank R` makes rank R's epoch callback raise, as a user's
code might.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images

PLAN = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-5, 1e-4), batchnorm="eval")))


def digest(tensors: list[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--crash-after", type=int, help="every rank stops after this many epochs (a crash to resume from)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (gloo, the default) or cuda (NCCL, one GPU per process)")
    parser.add_argument(
        "--collectives-at-one", action="store_true",
        help="take the several-process path even when torchrun starts one process (NCCL on a one-GPU machine)",
    )
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    if args.collectives_at_one:
        # One GPU cannot host two NCCL ranks; a world of one still runs every collective, DDP wrapper and shard.
        from thaw import distributed

        distributed.Processes.distributed = property(lambda self: True)
    log: list[dict] = []

    def record(optimizer: torch.optim.Optimizer, step: int, _factor: float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        body = [p for group in optimizer.param_groups if group["thaw_group"] != "head" for p in group["params"]]
        log.append({"step": step, "trainable": sum(p.numel() for p in params), "digest": digest(params), "body": digest(body) if body else None})

    def epoch_end(state) -> None:
        if args.fail_rank == rank and len(state.history) == 1:
            raise RuntimeError(f"user callback failed on rank {rank}")
        if args.crash_after and len(state.history) == args.crash_after and rank == 0:
            sys.exit(3)  # after rank 0 wrote this epoch's checkpoint; torchrun then stops the others

    config = TrainConfig(
        image_size=64, batch_size=args.batch_size, quiet=True, precision="fp32", augment=False, seed=0, device=args.device
    )
    result = train_images(
        args.data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=PLAN, config=config, out=args.out,
        resume=args.resume, callbacks=[epoch_end], step_hooks=[record],
    )
    history = result.history
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    final = {"backend": backend, "log": log, "best": result.best.get("value"), "history": [h["val_accuracy"] for h in history], "cached": [h["cached"] for h in history]}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
