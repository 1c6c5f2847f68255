"""What the distributed tests launch with torchrun (or alone, for the single-process comparison).

A two-phase run on a small image folder; after every optimizer step each rank
appends a digest of every parameter that trains, so the test can compare ranks
step by step. `--fail-rank R` makes rank R's epoch callback raise, as a user's
code might. `--no-cache` and `--no-dropout` take away the two things that make
two processes of batch 8 differ from one process of batch 16 (each rank shuffles
its own shard of cached features; each rank draws its own dropout masks), and
`--save-final` keeps the initial and final weights, so the test can compare the two runs
(with `--optimizer sgd`: see the test for why). `--share-fails R` makes rank R fail to write
the decoded images it shares with the other rank; `--share-unseen R` makes the other's share
invisible to rank R, as a disk of another machine would be. `--one-epoch` trains one head epoch instead.
Each rank writes rank{RANK}.json (RANK is global: nodes sharing a disk do not collide).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import thaw.train
from thaw.data.pixel_store import PixelStore
from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images

PLAN = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-5, 1e-4), batchnorm="eval")))
ONE_EPOCH = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)),))
TOP_2 = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("top2", 2, ("-2:",), RangeLr(1e-4, 1e-3), batchnorm="eval")))


def digest(tensors: list[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def capture_models(no_dropout: bool) -> tuple[list[ModelAdapter], list[dict]]:
    """Wrap the model builder train_images calls: the adapters it built (to save their final weights)
    and their weights as built, with every dropout probability set to 0 when asked."""
    built: list[ModelAdapter] = []
    initial: list[dict] = []
    original = thaw.train.build_model

    def build(*args, **kwargs) -> ModelAdapter:
        adapter = original(*args, **kwargs)
        if no_dropout:
            for module in adapter.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        built.append(adapter)
        initial.append({name: tensor.clone() for name, tensor in adapter.model.state_dict().items()})
        return adapter

    thaw.train.build_model = build
    return built, initial


def fail_to_share() -> None:
    """This rank's pixel store cannot write the share of decoded images it keeps for the others, as on a full disk."""
    fill = PixelStore.fill

    def failing(self: PixelStore, *args, to_disk: bool = False, **kwargs) -> bool:
        if to_disk:
            raise ThawError(f"cannot keep decoded images in {self.spill_path} (No space left on device)")
        return fill(self, *args, **kwargs)

    PixelStore.fill = failing


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--crash-after", type=int, help="rank 0 stops after this many epochs (a crash to resume from)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-cache", action="store_true", help="head stages run the network too")
    parser.add_argument("--no-dropout", action="store_true", help="every nn.Dropout gets p=0")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--one-epoch", action="store_true", help="a plan of one head epoch instead of 2 head + 2 full")
    parser.add_argument("--top-2", action="store_true", help="1 head epoch, then 2 epochs of the top 2 groups (on the cached bottom)")
    parser.add_argument("--save-final", action="store_true", help="write initial-rank{RANK}.pt and final-rank{RANK}.pt (state_dicts)")
    parser.add_argument("--share-fails", type=int, help="rank R cannot write its share of the decoded images (a full disk)")
    parser.add_argument("--share-unseen", type=int, help="rank R cannot see the other ranks' shares (another machine's disk)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo, the default) or cuda (NCCL, one GPU per process)")
    parser.add_argument(
        "--collectives-at-one", action="store_true",
        help="take the several-process path even when torchrun starts one process (NCCL on a one-GPU machine)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse()
    rank = int(os.environ.get("RANK", "0"))
    if args.collectives_at_one:
        # One GPU cannot host two NCCL ranks; a world of one still runs every collective, DDP wrapper and shard.
        from thaw import distributed

        distributed.Processes.distributed = property(lambda self: True)
    built, initial = capture_models(args.no_dropout)
    if args.share_fails == rank:
        fail_to_share()
    if args.share_unseen == rank:
        PixelStore._sees = lambda self, pixels: False
    log: list[dict] = []

    def record(optimizer: torch.optim.Optimizer, step: int, _factor: float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        body = [p for group in optimizer.param_groups if group["thaw_group"] != "head" for p in group["params"]]
        trainable = sum(p.numel() for p in params)
        log.append({"step": step, "trainable": trainable, "digest": digest(params), "body": digest(body) if body else None})

    def epoch_end(state) -> None:
        if args.fail_rank == rank and len(state.history) == 1:
            raise RuntimeError(f"user callback failed on rank {rank}")
        if args.crash_after and len(state.history) == args.crash_after and rank == 0:
            sys.exit(3)  # after rank 0 wrote this epoch's checkpoint; torchrun then stops the others

    config = TrainConfig(
        image_size=64, batch_size=args.batch_size, quiet=True, precision="fp32", augment=False, seed=0, device=args.device,
        cache=not args.no_cache, optimizer=args.optimizer,
        # The exactness bounds below were measured without label smoothing; its gradients never vanish, so the same
        # float rounding grows to about 4e-5 over the run. It changes the loss, not how DDP averages gradients.
        label_smoothing=0.0,
    )
    result = train_images(
        args.data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=ONE_EPOCH if args.one_epoch else TOP_2 if args.top_2 else PLAN, config=config, out=args.out,
        resume=args.resume, callbacks=[epoch_end], step_hooks=[record],
    )
    if len(built) != 1:
        raise RuntimeError(f"train_images built {len(built)} models through thaw.train.build_model; the worker's patch missed")
    if args.save_final:
        torch.save(initial[0], Path(args.out, f"initial-rank{rank}.pt"))
        torch.save(built[0].model.state_dict(), Path(args.out, f"final-rank{rank}.pt"))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    final = {
        "backend": backend, "log": log, "best": result.best.get("value"), "history": [h["val_accuracy"] for h in result.history],
        "cached": [h["cached"] for h in result.history], "skipped": sorted(path for path, _ in result.skipped),
        "decoded": result.decoded,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
