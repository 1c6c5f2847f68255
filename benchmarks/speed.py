"""Speed on hymenoptera, mobilenet_v2 IMAGENET1K_V1 at 224 px: thaw against what users would otherwise run.

Every row trains 3 head-only epochs, then 1 epoch of everything, with a val
pass after each epoch, and runs in its own process (so peak memory is its own):
  limit      one bf16 channels_last forward pass over train and val, decoding included
  seed       the seed recipe by hand: ImageFolder, fp32, AdamW on what trains
  hand-opt   the same loop with channels_last and bf16 autocast (no cache)
  fastai     vision_learner + fine_tune(1, freeze_epochs=3) (needs the `bench` extra)
  thaw       thaw's two-phase strategy with its defaults

    .venv/bin/python benchmarks/speed.py          # all rows, then the table and the ratios
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HYMENOPTERA, offline_torch_home, scratch  # noqa: E402

ROWS = ("limit", "seed", "hand-opt", "fastai", "thaw")
HEAD_EPOCHS, FULL_EPOCHS, BATCH = 3, 1, 32
TRAIN_IMAGES = 245


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def imagenet_loaders(workers: int = 2):
    import torch
    from torchvision import datasets, transforms

    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise])
    train = datasets.ImageFolder(HYMENOPTERA / "train", train_tf)
    val = datasets.ImageFolder(HYMENOPTERA / "val", val_tf)
    return (
        torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=workers),
        torch.utils.data.DataLoader(val, batch_size=BATCH, num_workers=workers),
    )


def hand_loop(optimised: bool) -> dict:
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
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if optimised else contextlib.nullcontext
    train_loader, val_loader = imagenet_loaders()

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

    head_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(HEAD_EPOCHS):
        epoch(head_optimizer)
        head_accuracy = validate()
    head_done = time.perf_counter()
    for param in model.parameters():
        param.requires_grad = True
    full_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    full_train = sum(epoch(full_optimizer) for _ in range(FULL_EPOCHS))
    accuracy = validate()
    finished = time.perf_counter()
    return {"head_s": head_done - started, "full_s": finished - head_done, "full_train_s": full_train, "head_val_accuracy": head_accuracy, "val_accuracy": accuracy}


def limit() -> dict:
    """The floor for a head-only phase: decode and run the network once over train and val."""
    import torch
    from torchvision import models

    from thaw.data.folders import discover
    from thaw.data.loaders import ImageDataset, make_loader
    from thaw.data.transforms import eval_transform
    from thaw.models import Preprocessing

    started = time.perf_counter()
    model = models.mobilenet_v2(weights="IMAGENET1K_V1").eval().to(memory_format=torch.channels_last)
    data = discover(HYMENOPTERA)
    dataset = ImageDataset(data.train + data.val, eval_transform(Preprocessing()), draft_size=512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in make_loader(dataset, batch_size=64, shuffle=False, seed=0):
            model(batch.images.contiguous(memory_format=torch.channels_last))
    return {"head_s": time.perf_counter() - started}


def fastai_row() -> dict:
    try:
        from fastai.callback.core import Callback
        from fastai.vision.all import ImageDataLoaders, RandomResizedCrop, accuracy, default_split, imagenet_stats, model_meta, vision_learner
    except ImportError:
        return {"missing": "fastai is not installed (pip install 'thaw[bench]')"}
    from torchvision import models

    class PhaseClock(Callback):
        def before_fit(self):
            self.learn.fits = getattr(self.learn, "fits", []) + [{"start": time.perf_counter(), "train": 0.0}]

        def before_train(self):
            self.began = time.perf_counter()

        def after_train(self):
            self.learn.fits[-1]["train"] += time.perf_counter() - self.began

        def after_fit(self):
            self.learn.fits[-1]["end"] = time.perf_counter()

    def mobilenet_v2(pretrained: bool = True):
        return models.mobilenet_v2(weights="IMAGENET1K_V1" if pretrained else None)

    # fastai has no metadata for MobileNetV2, and vision_learner drops its `cut` argument: register it.
    model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats}
    started = time.perf_counter()
    dls = ImageDataLoaders.from_folder(HYMENOPTERA, train="train", valid="val", item_tfms=RandomResizedCrop(224), bs=BATCH, num_workers=2)
    learn = vision_learner(dls, mobilenet_v2, metrics=accuracy, cbs=PhaseClock())
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(FULL_EPOCHS, freeze_epochs=HEAD_EPOCHS)
    head, full = learn.fits
    return {
        "head_s": head["end"] - started, "full_s": full["end"] - full["start"], "full_train_s": full["train"],
        "val_accuracy": float(learn.validate()[1]),
    }


def thaw_row() -> dict:
    from thaw.train import TrainConfig, train_images

    clock = []
    started = time.perf_counter()
    result = train_images(
        HYMENOPTERA, model="mobilenet_v2", weights="IMAGENET1K_V1", plan="two-phase",
        plan_options={"head_epochs": HEAD_EPOCHS, "epochs": FULL_EPOCHS}, config=TrainConfig(quiet=True),
        out=scratch("thaw"), callbacks=[lambda state: clock.append(time.perf_counter())],
    )
    last = result.history[-1]
    return {
        "head_s": clock[HEAD_EPOCHS - 1] - started, "full_s": clock[-1] - clock[HEAD_EPOCHS - 1],
        "full_train_s": TRAIN_IMAGES * FULL_EPOCHS / last["images_per_s"],
        "head_val_accuracy": result.history[HEAD_EPOCHS - 1]["val_accuracy"],
        "last_epoch_val_accuracy": last["val_accuracy"],
        "val_accuracy": result.best["val"]["accuracy"],  # the model thaw delivers: its best epoch
    }


def run_row(name: str) -> dict:
    offline_torch_home()
    row = {"limit": limit, "seed": lambda: hand_loop(False), "hand-opt": lambda: hand_loop(True), "fastai": fastai_row, "thaw": thaw_row}[name]()
    return row | {"peak_mb": peak_mb()}


def table(results: dict[str, dict]) -> str:
    from thaw.plan.report import render_table

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    rows = []
    for name, row in results.items():
        if "missing" in row:
            rows.append([name, row["missing"], "", "", "", "", ""])
            continue
        full_rate = f"{TRAIN_IMAGES * FULL_EPOCHS / row['full_train_s']:.1f}" if "full_train_s" in row else "-"
        total = f"{row['head_s'] + row['full_s']:.1f}" if "full_s" in row else "-"
        rows.append([name, cell(row, "head_s", ".1f"), cell(row, "full_s", ".1f"), total, full_rate, f"{row['peak_mb']:.0f}", cell(row, "val_accuracy", ".4f")])
    return render_table(rows, ["row", "head phase s (3 ep)", "full phase s (1 ep)", "two-phase s", "full img/s", "peak MB", "val acc (delivered)"])


def ratios(results: dict[str, dict]) -> list[str]:
    thaw, lines = results["thaw"], []
    lines.append(f"thaw head phase / one-pass limit: {thaw['head_s'] / results['limit']['head_s']:.2f}x (target <= 1.5)")
    if "missing" not in results["fastai"]:
        fast = results["fastai"]
        speedup = (fast["head_s"] + fast["full_s"]) / (thaw["head_s"] + thaw["full_s"])
        gap = round((fast["val_accuracy"] - thaw["val_accuracy"]) * 153)
        lines.append(f"fastai two-phase / thaw two-phase: {speedup:.2f}x faster (target >= 3); fastai - thaw val accuracy: {gap} image(s) (target <= 1)")
    for other, target in (("hand-opt", 0.95), ("seed", 1.5)):
        rate = results[other]["full_train_s"] / thaw["full_train_s"]
        lines.append(f"thaw full fine-tuning throughput / {other}: {rate:.2f}x (target >= {target})")
    return lines


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--row":
        print(json.dumps(run_row(sys.argv[2])))
        return
    results = {}
    for name in ROWS:
        output = subprocess.run([sys.executable, __file__, "--row", name], capture_output=True, text=True)
        if output.returncode != 0:
            raise SystemExit(f"row {name} failed:\n{output.stderr[-3000:]}")
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(results))
    print("\n".join(ratios(results)))


if __name__ == "__main__":
    main()
