"""Does thaw's data path feed the model as fast as it computes? Images/s against the compute limit.

For each (set, model), on one device, every row in a process of its own:
  limit      the compute limit: thaw's train step (forward with BatchNorm in eval mode, loss with label
             smoothing read back once, backward, AdamW on every parameter, the weight average; thaw's
             precision and memory format) on one batch already on the device, at the weights' crop size, and
             the forward-only limit (no grad, eval mode); same batch size; no data loading at all
  full       thaw fine-tuning every layer (`--strategy fine-tune`, its defaults otherwise): images/s of the
             train passes of the second and later epochs, the first epoch's, the time decoding every image
             once before the first epoch, and the run's wall time
  cache      thaw's caching pass (`--strategy feature-extract`, 1 epoch): train + val images decoded once and
             through the frozen part once, images/s against the forward-only limit; and preparing those images
             alone (decode, resize, crop, normalise) in one process, against which the pass without worker
             processes is the forward and the preparing in series
With --compile, instead of those: the train-step limit eager and through torch.compile (its first step, the compile,
timed apart), and the full row with and without thaw's --compile (whole-run wall time, compile included). Each
compiled row starts with an empty compile cache, as a user's first --compile run does.
Ratios are taken within one run of this script, so a busy machine slows both sides. Peak memory is sampled
from outside: a row's RSS where it has no worker processes; with workers, the largest sum of PSS (shared pages
split between the processes that share them) over the row's process and its children. PSS is not sampled
without workers: reading it walks the page tables, which slowed a 2-core CPU's train step by 4 to 7% (--pss).

    .venv/bin/python benchmarks/throughput.py                                  # caltech40 + hymenoptera, mobilenet_v2
    .venv/bin/python benchmarks/throughput.py --models mobilenet_v2 resnet50 --weights none --batch 128   # on a GPU
    .venv/bin/python benchmarks/throughput.py --quick                          # a few images, 2 epochs: does it run?
    .venv/bin/python benchmarks/throughput.py --compile --sets caltech40       # eager against torch.compile (--compile)
    .venv/bin/python benchmarks/throughput.py --sets hymenoptera --pss         # what sampling PSS costs the rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HYMENOPTERA,
    SHARED_DATA,
    markdown,
    offline_torch_home,
    run_with_peak_rss,
    same_allocator,
    scratch,
    shrunk_copy,
)

SETS = {"caltech40": SHARED_DATA / "caltech40", "hymenoptera": HYMENOPTERA}
LIMIT_WARMUP_STEPS = 2
LIMIT_STEPS = 30  # about 15 s of steps on 2 CPU cores (fp32: a few minutes): a steadier limit than a few steps


def thaw_config(args: argparse.Namespace, **fields):
    from thaw.train import TrainConfig

    return TrainConfig(quiet=True, batch_size=args.batch, device=args.device, workers=args.workers, **fields)


def limit_row(args: argparse.Namespace, compiled: bool = False) -> dict:
    """thaw's train step and forward pass on one batch already on the device: nothing to wait for.

    The step does what thaw's full phase does per batch: forward (BatchNorm in eval mode, thaw's policy once
    pretrained layers train), loss with label smoothing read back once, backward, AdamW, the weight average.
    `compiled`: the forward through torch.compile, as `--compile` runs it; its first step (the compile) is timed apart."""
    import torch

    from thaw.data.folders import discover
    from thaw.data.loaders import configure_threads
    from thaw.models import build_model
    from thaw.plan.freeze import batchnorm_layers
    from thaw.train.ema import weight_average
    from thaw.train.fit import choose_engine

    config = thaw_config(args)
    configure_threads(row_workers(args))  # thaw's own thread split
    same_allocator()  # and its own malloc settings, as every training run has them
    classes = len(discover(args.data).classes)
    adapter = build_model(args.model, weights=args.weights, num_classes=classes)
    engine = choose_engine(config, adapter.model)
    memory = torch.channels_last if engine.channels_last else torch.contiguous_format
    model = adapter.model.to(engine.device).to(memory_format=memory)
    size = adapter.preprocessing.crop_size
    images = torch.randn(args.batch, 3, size, size, device=engine.device).contiguous(memory_format=memory)
    labels = torch.randint(0, classes, (args.batch,), device=engine.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    average = weight_average(model) if config.ema else None
    run_forward = torch.compile(model) if compiled else model

    def train_step() -> None:
        with engine.autocast():
            logits = run_forward(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        loss.item()  # thaw reads each batch's loss once (NaN check, metrics)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update(model)

    def forward() -> None:
        with torch.no_grad(), engine.autocast():
            adapter.forward_features(images)

    model.train()
    for _, layer in batchnorm_layers(model):
        layer.eval()
    started = time.perf_counter()
    train_step()  # the first step: a compile, where there is one
    first_step_s = time.perf_counter() - started
    train_s = timed(train_step, engine.device)
    described = {"precision": "bf16" if engine.bf16 else "fp32", "device": str(engine.device), "size": size,
                 "train_img_s": args.batch / train_s, "first_step_s": first_step_s}
    if compiled:  # --compile compiles the training forward only
        return described
    model.eval()
    return described | {"forward_img_s": args.batch / timed(forward, engine.device)}


def timed(step, device) -> float:
    """Seconds per call, after warm-up steps (allocator, oneDNN/cuDNN kernel choice)."""
    import torch

    for _ in range(LIMIT_WARMUP_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(LIMIT_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / LIMIT_STEPS


def full_row(args: argparse.Namespace, compiled: bool = False) -> dict:
    from thaw.train import train_images

    started = time.perf_counter()
    result = train_images(
        args.data, model=args.model, weights=args.weights, plan="fine-tune", plan_options={"epochs": args.epochs},
        config=thaw_config(args, compile=compiled), out=scratch("throughput"),
    )
    rates = [row["images_per_s"] for row in result.history]
    later = rates[1:] or rates
    return {"first_epoch_img_s": rates[0], "later_img_s": len(later) / sum(1 / rate for rate in later),  # harmonic: per image
            "decode_s": result.decode_s, "wall_s": time.perf_counter() - started, "epochs": len(rates)}


def cache_row(args: argparse.Namespace) -> dict:
    from thaw.data.folders import discover
    from thaw.train import train_images

    result = train_images(
        args.data, model=args.model, weights=args.weights, plan="feature-extract", plan_options={"epochs": 1},
        config=thaw_config(args), out=scratch("throughput"),
    )
    data = discover(args.data)
    images = len(data.train) + len(data.val)
    once = result.decode_s + result.cache_s  # decoding once is part of the one pass a head phase cannot avoid
    workers = row_workers(args)
    return {"decode_s": result.decode_s, "cache_s": result.cache_s, "cached_images": images, "cache_img_s": images / once,
            "workers": workers, "prepare_img_s": preparing_rate(args, data)}


def preparing_rate(args: argparse.Namespace, data) -> float:
    """Images/s of what the caching pass does to an image before the model sees it (decode at reduced scale, resize,
    crop, normalise: the evaluation view), alone in this process: without worker processes the pass does this and
    the forward one after the other, so it cannot run faster than both in series."""
    from thaw.data.loaders import ImageDataset, configure_threads, make_loader
    from thaw.data.transforms import eval_transform
    from thaw.models import build_model

    configure_threads(row_workers(args))
    # as the run had it; on the meta device, so it adds nothing to the row's peak memory
    preprocessing = build_model(args.model, weights=args.weights, num_classes=2, load=False, device="meta").preprocessing
    dataset = ImageDataset(data.train + data.val, eval_transform(preprocessing), draft_size=2 * preprocessing.resize_size)
    started = time.perf_counter()
    for _ in make_loader(dataset, batch_size=args.batch, shuffle=False, seed=0, workers=0):  # batches: normalised at once
        pass
    return len(dataset) / (time.perf_counter() - started)


def cold(row):
    """`row` compiling from nothing, as a user's first --compile run does: torch's compile cache in a fresh folder."""

    def run(args: argparse.Namespace) -> dict:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(scratch("inductor-cache"))
        return row(args, compiled=True)

    return run


ROWS = {
    "limit": limit_row, "full": full_row, "cache": cache_row, "limit-compiled": cold(limit_row), "full-compiled": cold(full_row),
}
COMPILE_ROWS = ("limit", "limit-compiled", "full", "full-compiled")  # --compile: eager and compiled, side by side


def measured(row: str, name: str, data: Path, model: str, args: argparse.Namespace) -> dict:
    """One row in a process of its own, with its peak memory (workers included)."""
    command = [sys.executable, __file__, "--row", row, "--data", str(data), "--models", model, "--weights", args.weights,
               "--batch", str(args.batch), "--epochs", str(args.epochs), "--device", args.device]
    command += [] if args.workers is None else ["--workers", str(args.workers)]
    # Forked workers share the parent's pages: PSS counts them once. Without workers a row is one process and its
    # RSS is its memory; PSS walks its page tables, which slowed the train step by 4 to 7% here (RSS reads do not).
    result, peak = run_with_peak_rss(command, proportional=args.pss or row_workers(args) > 0)
    return {"row": row, "data": name, "model": model} | result | {"peak_mb": peak / 2**20}


def row_workers(args: argparse.Namespace) -> int:
    """The DataLoader workers a row runs with: thaw's choice unless --workers is given."""
    from thaw.data.loaders import default_workers

    return default_workers() if args.workers is None else args.workers


def compile_summary(rows: list[dict]) -> str:
    """Eager against torch.compile: the train step alone, and a whole thaw run with its compile time."""
    by_key = {(row["data"], row["model"], row["row"]): row for row in rows}
    lines = []
    for data, model in dict.fromkeys((row["data"], row["model"]) for row in rows):
        limit, limit_c, full, full_c = (by_key[(data, model, name)] for name in COMPILE_ROWS)
        lines.append([
            data, model, f"{limit['device']} {limit['precision']}",
            f"{limit['train_img_s']:.1f}", f"{limit_c['train_img_s']:.1f}", f"{limit_c['train_img_s'] / limit['train_img_s']:.2f}x",
            f"{limit_c['first_step_s']:.1f} s",
            f"{full['later_img_s']:.1f}", f"{full_c['later_img_s']:.1f}", f"{full_c['first_epoch_img_s']:.1f}",
            f"{full['wall_s']:.0f} s", f"{full_c['wall_s']:.0f} s", f"{full_c['wall_s'] / full['wall_s']:.2f}x",
        ])
    header = ["set", "model", "device", "train-step limit img/s, eager", "compiled", "ratio", "first compiled step",
              "thaw full phase img/s (epochs 2+), eager", "--compile", "--compile first epoch img/s",
              "thaw run wall, eager", "--compile", "ratio"]
    return markdown(lines, header)


def in_series(*rates: float) -> float:
    """Images/s of steps that run one after the other, each at its own rate."""
    return 1 / sum(1 / rate for rate in rates)


def series_columns(limit: dict, cache: dict) -> list[str]:
    """The forward and the preparing in series, and the caching pass against that: a bound only where the pass
    prepares images in its own process (no workers)."""
    if cache["workers"]:
        return ["-", "-"]
    series = in_series(limit["forward_img_s"], cache["prepare_img_s"])
    return [f"{series:.1f}", f"{cache['cache_img_s'] / series:.2f}x"]


def summary(rows: list[dict]) -> str:
    by_key = {(row["data"], row["model"], row["row"]): row for row in rows}
    lines = []
    for data, model in dict.fromkeys((row["data"], row["model"]) for row in rows):
        limit, full, cache = (by_key[(data, model, name)] for name in ("limit", "full", "cache"))
        lines.append([
            data, model, f"{limit['device']} {limit['precision']}",
            f"{limit['train_img_s']:.1f}", f"{full['later_img_s']:.1f}", f"{full['later_img_s'] / limit['train_img_s']:.2f}x",
            f"{full['first_epoch_img_s']:.1f}",
            f"{full['decode_s']:.1f} s",
            f"{limit['forward_img_s']:.1f}", f"{cache['cache_img_s']:.1f}", f"{cache['cache_img_s'] / limit['forward_img_s']:.2f}x",
            f"{cache['prepare_img_s']:.1f}", *series_columns(limit, cache),
            f"{full['wall_s']:.0f} s", f"{full['peak_mb']:.0f} / {cache['peak_mb']:.0f}",
        ])
    header = ["set", "model", "device", "train-step limit img/s", "full phase img/s (epochs 2+)", "ratio",
              "first epoch img/s", "decoding once", "forward limit img/s", "caching pass img/s (decoding included)", "ratio",
              "preparing alone img/s", "forward + preparing in series img/s (no workers)", "caching pass / in series",
              "full run wall", "peak MB full / cache (RSS; PSS of the process tree with workers)"]
    return markdown(lines, header)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"])
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="weights for every model (none is fine for throughput)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="full-phase epochs; the first is reported apart (the rest: over 700 images on hymenoptera)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="default: thaw's choice (0 below 4 cores)")
    parser.add_argument("--quick", action="store_true", help="a few images per class: does every row run?")
    parser.add_argument(
        "--compile", action="store_true", help="instead: the train step and a thaw run, eager against torch.compile (--compile)"
    )
    parser.add_argument("--pss", action="store_true", help="sample PSS even without workers (to see what sampling it costs)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--row", choices=tuple(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.weights != "none":
        offline_torch_home()
    if args.row:  # inside a row's own process
        args.model = args.models[0]
        print(json.dumps(ROWS[args.row](args)), flush=True)
        return
    rows = []
    for name in args.sets:
        data = shrunk_copy(SETS[name], per_class=4, classes=3) if args.quick else SETS[name]
        for model in args.models:
            for row in COMPILE_ROWS if args.compile else ("limit", "full", "cache"):
                rows.append(measured(row, name, data, model, args))
                print(json.dumps(rows[-1]), flush=True)
    table = compile_summary(rows) if args.compile else summary(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
