"""Speed on hymenoptera, mobilenet_v2 IMAGENET1K_V1 at 224 px: thaw against what users would otherwise run.

Every training row trains 3 head-only epochs, then 1 epoch of everything, validates on the
153 val images after every epoch, and runs in its own process:
  floor      what no head phase can avoid: decode train + val once (thaw's decoder, in-process),
             then the frozen part once (forward_features, no grad, channels_last, bf16, batch 32)
  seed       the seed recipe by hand: ImageFolder, fp32, AdamW on what trains
  hand-opt   the same loop with channels_last and bf16 autocast (no cache)
  fastai     vision_learner + fine_tune(1, freeze_epochs=3) (needs the `bench` extra)
  thaw       thaw's two-phase strategy with its defaults (--ema --label-smoothing 0.1 since the recipe benchmark)

bf16 (floor, hand-opt) follows thaw's `--precision auto`: on where the CPU runs it natively,
off where oneDNN would emulate it (AVX2 only: many times slower than fp32).

Each baseline runs twice, with 0 and with 2 DataLoader workers, and the table keeps the faster;
every run is printed first as one JSON line, so the slower setting can be checked. Every row
reports the val accuracy of its last epoch and of its best epoch. Peak memory is the largest
sum of RSS over the row's process and its children (DataLoader workers), sampled from outside.

    .venv/bin/python benchmarks/speed.py           # every row, then the table and the ratios
    .venv/bin/python benchmarks/speed.py --quick   # 1 + 1 epochs on 64 images: does every row run?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HYMENOPTERA,
    markdown,
    native_bf16,
    offline_torch_home,
    run_with_peak_rss,
    same_allocator,
    scratch,
    shrunk_copy,
)

BASELINES = ("seed", "hand-opt", "fastai")
WORKER_CHOICES = (0, 2)
BATCH = 32  # thaw's default batch size, used by every row
QUICK_IMAGES_PER_CLASS = 16  # per split: --quick trains on 32 images and validates on 32


@dataclass(frozen=True)
class Setup:
    """What every row process is told: where the images are and how long to train."""

    data: Path
    head_epochs: int
    full_epochs: int


def precision_name() -> str:
    return "bf16" if native_bf16() else "fp32"


def accuracy_summary(per_epoch: list[float]) -> dict:
    """Last and best epoch (the first of equals, as thaw picks) of one list of val accuracies."""
    best = max(range(len(per_epoch)), key=lambda i: (per_epoch[i], -i))
    return {
        "val_accuracy_per_epoch": per_epoch, "last_val_accuracy": per_epoch[-1],
        "best_val_accuracy": per_epoch[best], "best_epoch": best + 1,
    }


def imagenet_loaders(setup: Setup, workers: int):
    import torch
    from torchvision import datasets, transforms

    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise])
    train = datasets.ImageFolder(setup.data / "train", train_tf)
    val = datasets.ImageFolder(setup.data / "val", val_tf)
    return (
        torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=workers),
        torch.utils.data.DataLoader(val, batch_size=BATCH, num_workers=workers),
    )


def hand_loop(setup: Setup, workers: int, optimised: bool) -> dict:
    """The seed recipe as a plain loop; `optimised` adds channels_last and bf16 autocast."""
    import contextlib

    import torch
    from torch import nn
    from torchvision import models

    started = time.perf_counter()
    torch.manual_seed(0)
    model = models.mobilenet_v2(weights="IMAGENET1K_V1")
    for param in model.parameters():
        param.requires_grad = False
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, 2)
    memory = torch.channels_last if optimised else torch.contiguous_format
    model = model.to(memory_format=memory)
    bf16 = optimised and native_bf16()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    train_loader, val_loader = imagenet_loaders(setup, workers)

    def epoch(optimizer) -> float:
        model.train()
        began = time.perf_counter()
        for images, labels in train_loader:
            with autocast():
                loss = nn.functional.cross_entropy(model(images.to(memory_format=memory)).float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - began

    def validate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad(), autocast():
            for images, labels in val_loader:
                correct += int((model(images.to(memory_format=memory)).argmax(1) == labels).sum())
        return correct / len(val_loader.dataset)

    accuracies = []
    head_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(setup.head_epochs):
        epoch(head_optimizer)
        accuracies.append(validate())
    head_done = time.perf_counter()
    for param in model.parameters():
        param.requires_grad = True
    full_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    full_train = 0.0
    for _ in range(setup.full_epochs):
        full_train += epoch(full_optimizer)
        accuracies.append(validate())
    finished = time.perf_counter()
    return {
        "precision": "bf16" if bf16 else "fp32", "head_s": head_done - started, "full_s": finished - head_done, "full_train_s": full_train,
        "train_images": len(train_loader.dataset), "val_images": len(val_loader.dataset),
    } | accuracy_summary(accuracies)


def floor(setup: Setup, workers: int) -> dict:
    """What a head phase cannot avoid: decoding every image once and running the frozen part once.

    The same decoder, preprocessing, batch size, precision and memory format as thaw's cache;
    decoding is timed apart from the forward pass (the batches are kept decoded in between).
    """
    import contextlib

    import torch

    from thaw.data.folders import discover
    from thaw.data.loaders import ImageDataset, make_loader
    from thaw.data.transforms import eval_transform
    from thaw.models import build_model

    started = time.perf_counter()
    data = discover(setup.data)
    adapter = build_model("mobilenet_v2", weights="IMAGENET1K_V1", num_classes=len(data.classes))
    adapter.model.eval().to(memory_format=torch.channels_last)
    built = time.perf_counter()
    pre = adapter.preprocessing
    dataset = ImageDataset(data.train + data.val, eval_transform(pre), draft_size=2 * pre.resize_size)
    batches = [batch.images for batch in make_loader(dataset, batch_size=BATCH, shuffle=False, seed=0, workers=workers)]
    decoded = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16() else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for images in batches:
            adapter.forward_features(images.contiguous(memory_format=torch.channels_last))
    finished = time.perf_counter()
    return {
        "precision": precision_name(), "model_build_s": built - started, "decode_s": decoded - built, "forward_s": finished - decoded,
        "images": sum(len(images) for images in batches),
    }


def fastai_row(setup: Setup, workers: int) -> dict:
    try:
        from fastai.callback.core import Callback
        from fastai.vision.all import (
            ImageDataLoaders,
            RandomResizedCrop,
            accuracy,
            default_split,
            imagenet_stats,
            model_meta,
            set_seed,
            vision_learner,
        )
    except ImportError:
        return {"missing": "fastai is not installed (pip install 'thaw[bench]')"}
    from torchvision import models

    class PhaseClock(Callback):
        """Times each fit (fine_tune runs two) and keeps each epoch's val accuracy from the recorder."""

        order = 60  # after the Recorder (50), which resets its values at every fit

        def before_fit(self):
            self.learn.fits = getattr(self.learn, "fits", []) + [{"start": time.perf_counter(), "train": 0.0}]

        def before_train(self):
            self.began = time.perf_counter()

        def after_train(self):
            self.learn.fits[-1]["train"] += time.perf_counter() - self.began

        def after_fit(self):
            names = self.learn.recorder.metric_names[1:-1]  # minus "epoch" and "time": what each values row holds
            column = names.index("accuracy")
            self.learn.fits[-1] |= {"end": time.perf_counter(), "accuracy": [float(v[column]) for v in self.learn.recorder.values]}

    def mobilenet_v2(pretrained: bool = True):
        return models.mobilenet_v2(weights="IMAGENET1K_V1" if pretrained else None)

    # fastai has no metadata for MobileNetV2, and vision_learner drops its `cut` argument: register it.
    model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats}
    started = time.perf_counter()
    set_seed(0)
    dls = ImageDataLoaders.from_folder(
        setup.data, train="train", valid="val", item_tfms=RandomResizedCrop(224), bs=BATCH, num_workers=workers
    )
    learn = vision_learner(dls, mobilenet_v2, metrics=accuracy, cbs=PhaseClock())
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(setup.full_epochs, freeze_epochs=setup.head_epochs)
    head, full = learn.fits
    return {
        "precision": "fp32", "head_s": head["end"] - started, "full_s": full["end"] - full["start"], "full_train_s": full["train"],
        "train_images": len(dls.train_ds), "val_images": len(dls.valid_ds),
    } | accuracy_summary(head["accuracy"] + full["accuracy"])


def thaw_row(setup: Setup, workers: int | None) -> dict:
    """thaw with its defaults (`workers` None: thaw picks, 0 below 4 cores)."""
    from thaw.data.folders import discover
    from thaw.data.loaders import default_workers
    from thaw.train import TrainConfig, train_images

    stage_ends = []
    started = time.perf_counter()
    result = train_images(
        setup.data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan="two-phase",
        plan_options={"head_epochs": setup.head_epochs, "epochs": setup.full_epochs}, config=TrainConfig(quiet=True, workers=workers),
        out=scratch("thaw"), callbacks=[lambda state: stage_ends.append((state.stage, time.perf_counter()))],
    )
    head_done = max(when for stage, when in stage_ends if stage == 0)
    data = discover(setup.data)  # the images thaw counts: its per-epoch rate is over these
    full_rows = [row for row in result.history if row["stage_index"] == 1]
    return {
        "workers": default_workers() if workers is None else workers, "precision": "bf16" if result.engine.bf16 else "fp32",
        "head_s": head_done - started, "full_s": stage_ends[-1][1] - head_done,
        "full_train_s": sum(len(data.train) / row["images_per_s"] for row in full_rows),
        "train_images": len(data.train), "val_images": len(data.val),
        "delivered_epoch": result.best["epoch"],  # the epoch whose weights thaw saves: its best
    } | accuracy_summary([row["val_accuracy"] for row in result.history])


def run_row(name: str, setup: Setup, workers: int | None) -> dict:
    offline_torch_home()
    same_allocator()
    rows = {
        "floor": floor, "seed": lambda s, w: hand_loop(s, w, optimised=False), "hand-opt": lambda s, w: hand_loop(s, w, optimised=True),
        "fastai": fastai_row, "thaw": thaw_row,
    }
    return rows[name](setup, workers)


def run_measured(name: str, setup: Setup, workers: int | None) -> dict:
    """Run one row in a fresh process; its peak memory is the largest RSS sum over its process tree."""
    command = [sys.executable, __file__, "--row", name, "--data", str(setup.data), "--head-epochs", str(setup.head_epochs),
               "--full-epochs", str(setup.full_epochs)] + ([] if workers is None else ["--workers", str(workers)])
    result, peak = run_with_peak_rss(command)
    return {"row": name} | result | {"peak_mb": peak / 2**20}


def run_all(setup: Setup) -> dict:
    """Every row's runs, each printed as a JSON line as it finishes."""
    def measured(name: str, workers: int | None) -> dict:
        result = run_measured(name, setup, workers)
        print(json.dumps(result), flush=True)
        return result

    runs = {"floor": measured("floor", 0)}
    for name in BASELINES:
        tries = [measured(name, WORKER_CHOICES[0])]
        if "missing" not in tries[0]:
            tries += [measured(name, workers) for workers in WORKER_CHOICES[1:]]
        runs[name] = tries
    runs["thaw"] = measured("thaw", None)
    return runs


def two_phase_s(run: dict) -> float:
    return run["head_s"] + run["full_s"]


def fastest(tries: list[dict]) -> dict:
    return tries[0] if "missing" in tries[0] else min(tries, key=two_phase_s)


def training_cells(run: dict, full_epochs: int) -> list[str]:
    rate = run["train_images"] * full_epochs / run["full_train_s"]
    return [
        str(run["workers"]), run["precision"], f"{run['head_s']:.1f} s", f"{run['full_s']:.1f} s", f"{two_phase_s(run):.1f} s",
        f"{rate:.1f}", f"{run['peak_mb']:.0f}", f"{run['last_val_accuracy']:.4f}",
        f"{run['best_val_accuracy']:.4f} (epoch {run['best_epoch']})",
    ]


def floor_rows(run: dict) -> list[list[str]]:
    """Decoding and the frozen forward pass on lines of their own, then their sum."""
    rest = ["-"] * 4
    return [
        ["decode train + val once (thaw's decoder, in-process)", str(run["workers"]), "-", f"{run['decode_s']:.1f} s", *rest, "-", "-"],
        [f"frozen part once (forward_features, no grad, channels_last, batch {BATCH})", "-", run["precision"],
         f"{run['forward_s']:.1f} s", *rest, "-", "-"],
        ["floor of a head phase: decode + frozen part", str(run["workers"]), run["precision"], f"{floor_s(run):.1f} s", "-", "-", "-",
         f"{run['peak_mb']:.0f}", "-", "-"],
    ]


def table(runs: dict, setup: Setup) -> str:
    h, f = setup.head_epochs, setup.full_epochs
    labels = {
        "seed": "seed recipe by hand", "hand-opt": "hand-optimised loop (channels_last, bf16 where native)",
        "fastai": f"fastai `fine_tune({f}, freeze_epochs={h})`", "thaw": "thaw `two-phase` (defaults)",
    }
    rows = floor_rows(runs["floor"])
    for name in (*BASELINES, "thaw"):
        run = runs["thaw"] if name == "thaw" else fastest(runs[name])
        if "missing" in run:
            rows.append([labels[name], run["missing"], *["-"] * 8])
        else:
            rows.append([labels[name], *training_cells(run, f)])
    header = [
        "row", "workers", "precision", f"head phase ({h} epoch{'s' * (h > 1)})", f"full phase ({f} epoch{'s' * (f > 1)})", "two-phase",
        "full fine-tuning img/s", "peak MB (with workers)", "val accuracy, last epoch", "val accuracy, best epoch",
    ]
    return markdown(rows, header)


def floor_s(floor_run: dict) -> float:
    return floor_run["decode_s"] + floor_run["forward_s"]


def worker_lines(runs: dict) -> list[str]:
    """Both settings of every baseline, so the choice in the table can be checked."""
    lines = []
    for name in BASELINES:
        if "missing" in runs[name][0]:
            continue
        tried = ", ".join(f"{run['workers']} workers {two_phase_s(run):.1f} s" for run in runs[name])
        lines.append(f"{name}: {tried}; the table keeps {fastest(runs[name])['workers']}")
    return lines


def ratios(runs: dict) -> list[str]:
    thaw, floor_run = runs["thaw"], runs["floor"]
    lines = [
        f"thaw head phase / floor (decode + frozen part once): {thaw['head_s'] / floor_s(floor_run):.2f}x (target <= 1.5); "
        f"thaw's head phase also builds the model ({floor_run['model_build_s']:.1f} s in the floor's process), "
        "trains the head and validates every epoch",
    ]
    fast = fastest(runs["fastai"])
    if "missing" not in fast:
        val_images = thaw["val_images"]
        last_gap = round((fast["last_val_accuracy"] - thaw["last_val_accuracy"]) * val_images)
        best_gap = round((fast["best_val_accuracy"] - thaw["best_val_accuracy"]) * val_images)
        lines.append(
            f"fastai two-phase / thaw two-phase: {two_phase_s(fast) / two_phase_s(thaw):.2f}x (target >= 3); "
            f"fastai - thaw val accuracy: {last_gap} image(s) at the last epoch, {best_gap} at the best (target <= 1)"
        )
    for other, target in (("hand-opt", 0.95), ("seed", 1.5)):
        rate = fastest(runs[other])["full_train_s"] / thaw["full_train_s"]
        lines.append(f"thaw full fine-tuning throughput / {other}: {rate:.2f}x (target >= {target})")
    lines.append(f"thaw delivers the weights of epoch {thaw['delivered_epoch']} (its best); the other rows keep their last epoch's")
    return lines


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 head epoch + 1 full epoch on 64 images: checks every row runs")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the parent runs each row in its own process
    parser.add_argument("--data", type=Path, default=HYMENOPTERA, help=argparse.SUPPRESS)
    parser.add_argument("--head-epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--full-epochs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.row:
        setup = Setup(args.data, args.head_epochs, args.full_epochs)
        print(json.dumps({"workers": args.workers} | run_row(args.row, setup, args.workers)))
        return
    setup = Setup(shrunk_copy(HYMENOPTERA, QUICK_IMAGES_PER_CLASS), 1, 1) if args.quick else Setup(HYMENOPTERA, args.head_epochs, args.full_epochs)
    runs = run_all(setup)
    print()
    print(table(runs, setup))
    print()
    print("\n".join(worker_lines(runs) + ratios(runs)))


if __name__ == "__main__":
    main()
