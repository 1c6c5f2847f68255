"""How to train (not what: that is the plan). A frozen dataclass the CLI and YAML only fill.

Impossible values are refused when the config is made, all at once, so that neither the
library nor the CLI discovers them halfway through a run (a DataLoader with batch size 0,
a division by an accumulation of 0).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, Callable

import numpy
import torch

from thaw.data.transforms import AUTO_AUGMENTS
from thaw._device import device_problem
from thaw.errors import ThawError, join_problems
from thaw.models._structure import meta_copy, meta_forward_failure
from thaw.models import build_model
from thaw.models.adapter import ModelAdapter, Preprocessing
from thaw.models.hf_text import build_text_model
from thaw.models.lora import add_lora
from thaw.plan.freeze import batch_norms, batchnorm_trains, locks_statistics
from thaw.plan.lora_targets import lora_targets
from thaw.plan.optim import OPTIMIZERS, check_decay_below_lr
from thaw.plan.stages import Plan, check_new_plan, resolve_plan
from thaw.plan.strategies import build_plan
from thaw.train.budget import parse_budget
from thaw.train.resizing import sizes_used

SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
METRICS = ("accuracy", "macro_f1", "loss")
MAX_IMAGE_SIZE = 4096  # a 4096 px batch of one already needs tens of GB of activations in a ResNet
MAX_WORKERS = 256  # each worker is a process holding a copy of the dataset
MAX_BATCH_SIZE = 1 << 20  # a million samples a step: far above any memory's; a larger count broke the loader's slicing
MAX_CACHE_VIEWS = 1000  # every view is one pass over the train set, computed before the stage starts
MAX_PROGRESSIVE_EPOCHS = 64  # above the most epochs --budget gives a stage (thaw.train.budget.MAX_EPOCHS)
MIX_HINTS = {"mixup": "0.2 is usual", "cutmix": "1.0 is usual"}
# Beta alphas torchvision's MixUp and CutMix draw from in float32: 1e-50 is 0 there (a Dirichlet of zeros, a traceback
# in the first batch) and 1e39 infinite; anything between trains, as it always did.
MIX_ALPHA_RANGE = (1e-38, 1e38)
SWITCHES = ("channels_last", "augment", "strict", "quiet", "cache", "cache_prefix", "ema", "compile")  # TrainConfig's booleans
MAX_SEED = 2**63  # torch's generators take seeds below 2**64; leave headroom for per-epoch offsets


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup: float = 0.1  # share of each stage's steps; newly unfrozen groups start low, not at full lr
    precision: str = "auto"
    channels_last: bool = True  # only applied to models with convolutions
    grad_clip: float | None = None
    accumulate: int = 1
    seed: int = 0
    workers: int | None = None
    metric: str = "accuracy"
    early_stopping: int | None = None  # epochs without improvement before a stage ends early
    augment: bool = True
    image_size: int | None = None  # overrides the weights' crop size (the demo's 8x8 digits)
    strict: bool = False  # unreadable files fail the run instead of being skipped
    device: str = "auto"
    quiet: bool = False
    cache: bool = True  # frozen-feature cache for head-only stages, where it is exact
    cache_views: int = 0  # 0: cache the evaluation view; K: K augmented views, cycled by epoch
    cache_prefix: bool = True  # stages that train only the top groups: cache the frozen bottom's output (thaw.train.prefix_cache)
    cache_memory_gb: float = 4.0  # per split; past it features spill to a memory-mapped file
    decoded_memory_gb: float = 2.0  # decoded pixels kept in memory (see PixelStore); past it they wait in a file in the run folder
    label_smoothing: float = 0.1  # of the training loss only: val loss, which picks among tied epochs, stays plain
    budget: float | None = None  # seconds: epochs per stage chosen to fit them (thaw.train.budget)
    ema: bool = True  # stages that train pretrained layers are measured and delivered as a moving average of their weights
    progressive_resize: float | None = None  # full-network epochs start at this share of the crop size (thaw.train.resizing)
    auto_augment: str | None = None  # trivial (TrivialAugmentWide) or rand (RandAugment) after the random crop and flip
    mixup: float = 0.0  # alpha of the Beta distribution of mixup's mixing weight; 0: off (thaw.train.mixing)
    cutmix: float = 0.0  # alpha of cutmix's; with both on, each batch takes one of the two at random
    compile: bool = False  # torch.compile the training forward of stages that run the network (thaw.train.compiled)

    def __post_init__(self) -> None:
        for item in fields(self):  # numpy's numbers (np.int64(8), np.float32(0.1)) as Python's: a run writes them to JSON
            object.__setattr__(self, item.name, plain_number(getattr(self, item.name)))
        problems = config_problems(self)
        if problems:
            raise ThawError(join_problems(problems))


def plain_number(value: object) -> object:
    """A number or bool of another type than Python's (numpy's, as a value read from an array is) as Python's int,
    float or bool; anything else (a str, None) as it is, for the checks to judge."""
    if isinstance(value, numpy.bool_):
        return bool(value)
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    """A number (no bool) that a float holds: a plan file's whole number 10**400 has no float, and was a traceback."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _count_problem(name: str, value: object, low: int, high: int | None = None, hint: str = "") -> str | None:
    """`name` must be a whole number in [low, high]."""
    if _whole(value) and value >= low and (high is None or value <= high):
        return None
    bound = f">= {low}" if high is None else f"from {low} to {high}"
    return f"{name} must be a whole number {bound}, got {value!r}{hint}"


def _choice_problem(name: str, value: object, valid: tuple[str, ...]) -> str | None:
    return None if value in valid else f"{name} must be one of {', '.join(valid)}, got {value!r}"


def config_problems(config: TrainConfig) -> list[str]:
    """Every impossible value of `config`, each as what is wrong and what to do."""
    c = config
    problems = [
        _count_problem("batch size", c.batch_size, 1, MAX_BATCH_SIZE, "; try 32, or 8 on small machines"),
        _count_problem("accumulate", c.accumulate, 1, hint="; 1 steps after every batch"),
        _count_problem("seed", c.seed, 0, MAX_SEED - 1),
        _count_problem("cache views", c.cache_views, 0, MAX_CACHE_VIEWS, "; 0 caches the evaluation view once"),
        _choice_problem("optimizer", c.optimizer, OPTIMIZERS),
        _choice_problem("schedule", c.schedule, SCHEDULES),
        _choice_problem("precision", c.precision, PRECISIONS),
        _choice_problem("metric", c.metric, METRICS),
        device_problem(c.device),
    ]
    if c.workers is not None:
        problems.append(_count_problem("workers", c.workers, 0, MAX_WORKERS, "; 0 decodes in the training process"))
    if c.early_stopping is not None:
        problems.append(_count_problem("early stopping", c.early_stopping, 1, hint=" epochs; leave it unset to train every epoch"))
    if c.image_size is not None:
        problems.append(_count_problem("image size", c.image_size, 1, MAX_IMAGE_SIZE, " px; leave it unset for the weights' own size"))
    if not (_finite(c.warmup) and 0 <= c.warmup < 1):
        problems.append(f"warmup must be a share of the stage's steps in [0, 1), got {c.warmup!r}; 0.1 is usual")
    if not (_finite(c.label_smoothing) and 0 <= c.label_smoothing < 1):
        problems.append(f"label smoothing must be a share in [0, 1), got {c.label_smoothing!r}; 0.1 is usual, 0 turns it off")
    if c.budget is not None and not (_finite(c.budget) and c.budget > 0):
        problems.append(f"budget must be a positive number of seconds, got {c.budget!r}; e.g. 180 (--budget 3m)")
    if c.progressive_resize is not None:
        if not (_finite(c.progressive_resize) and 0 < c.progressive_resize < 1):
            problems.append(
                f"progressive resize must be a share of the image size above 0 and below 1, got {c.progressive_resize!r}; "
                "0.6 starts at 60% of it, or leave it unset"
            )
        elif not c.augment:
            problems.append("progressive resize resizes the random training crops, which augment=False (--no-augment) turns off; drop one of the two")
    problems += _augment_problems(c)
    # A string such as "no" is true in Python: augment="no" trained with augmentation on, and was recorded as "no".
    for name in SWITCHES:
        if not isinstance(getattr(c, name), bool):
            problems.append(f"{name.replace('_', ' ')} must be true or false, got {getattr(c, name)!r}")
    if c.compile is True and c.budget is not None:  # the budget times eager steps; a compile's first batches would overrun it
        problems.append("compile (--compile) cannot run with a budget: the budget is planned from eager training steps and does not count compile time")
    if c.grad_clip is not None and not (_finite(c.grad_clip) and c.grad_clip > 0):
        problems.append(f"grad clip must be a positive finite norm, got {c.grad_clip!r}; 1.0 is usual, or leave it unset")
    for name in ("cache_memory_gb", "decoded_memory_gb"):
        value = getattr(c, name)
        if not (_finite(value) and value >= 0):
            problems.append(f"{name} must be a finite number of GB >= 0, got {value!r}")
    return [problem for problem in problems if problem is not None]


def checked_training_options(plan_file: str, from_file: dict[str, Any]) -> dict[str, Any]:
    """A plan file's `training:` options, checked on their own so that every problem with them names the file."""
    problems = []
    if from_file.get("budget") is not None:  # written like the flag (3m, 90s) or as seconds
        try:
            from_file = from_file | {"budget": parse_budget(from_file["budget"])}
        except ThawError as error:
            problems.append(str(error))
    checked = {key: value for key, value in from_file.items() if not (key == "budget" and problems)}
    problems += config_problems(SimpleNamespace(**(vars(TrainConfig()) | checked)))
    if problems:
        raise ThawError(f"{plan_file}: training: " + join_problems(problems))
    return from_file


def image_augment_flags(config: TrainConfig) -> list[str]:
    """The image augmentations `config` turns on, each named as an argument and as a flag: API and CLI users both read it."""
    chosen = (("auto_augment (--auto-augment)", config.auto_augment), ("mixup (--mixup)", config.mixup), ("cutmix (--cutmix)", config.cutmix))
    return [name for name, value in chosen if value]


def _augment_problems(c: TrainConfig) -> list[str]:
    """The augmentation options: valid values, and none of them beside --no-augment (which they would contradict)."""
    problems = []
    if c.auto_augment is not None and c.auto_augment not in AUTO_AUGMENTS:
        problems.append(
            f"auto augment must be one of {', '.join(AUTO_AUGMENTS)}, got {c.auto_augment!r}; or leave it unset (null in a plan file)"
        )
    for name in ("mixup", "cutmix"):
        value = getattr(c, name)
        low, high = MIX_ALPHA_RANGE
        if not (_finite(value) and (value == 0 or low <= value <= high)):
            problems.append(f"{name} must be a Beta alpha from {low:g} to {high:g}, got {value!r}; {MIX_HINTS[name]}, 0 turns it off")
    if not c.augment:
        problems += [f"{flag} augments the training images, which augment=False (--no-augment) turns off; drop one of the two" for flag in image_augment_flags(c)]
    return problems


def check_image_size(adapter: ModelAdapter, config: TrainConfig, model_name: str) -> None:
    """Refuse an `image_size` the network cannot take, and a network that takes no RGB image at the run's size (a
    1-channel model, a Linear sized for other images), before any data is read.

    A forward pass on the meta device computes only shapes: it fails where a real one would
    (a torchvision ViT asserts its own size; AlexNet or Inception v3 pool a small image to nothing).
    """
    if not isinstance(adapter.preprocessing, Preprocessing):
        return
    crop = adapter.preprocessing.crop_size
    size = config.image_size or crop
    fixed = getattr(adapter.model, "image_size", None)
    if size != crop and isinstance(fixed, int) and fixed != size:  # torchvision's ViT: position embeddings for one grid of patches
        raise ThawError(
            f"{model_name} takes {fixed} px images only (its position embeddings are learned for that size); "
            "leave image_size (--image-size) unset"
        )
    failure_at = _forward_failures(adapter)
    failure = failure_at(size)
    if not failure:
        return
    if size != crop and not failure_at(crop):
        raise ThawError(
            f"{model_name} cannot take {size} px images ({failure}); "
            f"use a larger image_size (--image-size), or leave it unset for its own {crop} px"
        )
    advice = _input_mismatch_advice(failure)
    if advice:  # it failed only once the features were being cached, leaving an empty run folder
        raise ThawError(f"{model_name} cannot take a batch of RGB images of {size} px ({failure}); {advice}")


def _input_mismatch_advice(failure: str) -> str | None:
    """What to do where a meta-device forward failed because the network takes other images (shape errors, which the
    meta device reports as a real forward would); None for any other failure (an op the meta device lacks, such as
    nonzero): that model may well train, and its first step says what is wrong if not."""
    # the meta device's wording first, then a real forward's (the same checks, worded by other code)
    if re.search(r"Invalid channel dimensions|expected input\[.*\] to have \d+ channels", failure):
        return "thaw feeds it 3-channel images: change its first layer to take 3 channels"
    if re.search(r"must have same reduction dim|shapes cannot be multiplied", failure):
        return "a layer is sized for another image size: set the image_size (--image-size) it was built for, or change that layer"
    return None


def check_progressive_resize(adapter: ModelAdapter, config: TrainConfig, stage_epochs: list[int], model_name: str) -> None:
    """Refuse progressive resizing where the network cannot take one of the crop sizes the stages of these epoch
    counts would train at (every stage's: any may run the whole network), before any data is read."""
    start = config.progressive_resize
    if start is None:
        return
    if not isinstance(adapter.preprocessing, Preprocessing):
        raise ThawError("progressive resize resizes images; leave it unset for text")
    final = config.image_size or adapter.preprocessing.crop_size
    if config.budget is not None:  # the budget may give any stage other epoch counts than the plan: check them all
        stage_epochs = [*stage_epochs, *range(2, MAX_PROGRESSIVE_EPOCHS + 1)]
    failure_at = _forward_failures(adapter)
    for size in sizes_used(final, start, stage_epochs):
        failure = failure_at(size)
        if failure and not failure_at(final):
            raise ThawError(
                f"{model_name} cannot take the {size} px crops progressive resize {start:g} trains with ({failure}); "
                "use a larger share, or leave it unset"
            )


def plan_probe(model: object, weights: str | None, task: str) -> ModelAdapter | None:
    """A stand-in on the meta device for the model a run by name will train, built before any data is read (no
    weights loaded, no memory): its layer groups are the run's, and the head's width, unknown until the classes are
    counted, changes no selector. None for a model object: its plan is resolved once it is adapted (check_plan)."""
    if not isinstance(model, str):
        return None
    if task == "text":
        return build_text_model(model, num_classes=2, device="meta", load=False)
    return build_model(model, weights=weights, num_classes=2, device="meta", load=False)


def check_plan(adapter: ModelAdapter, plan: Plan | str, plan_options: dict | None = None, new_run: bool = True) -> Plan:
    """The plan built for `adapter` (a strategy name with its options) and every stage resolved against it, LoRA layers
    added first as a run adds them (to `adapter` itself): what `thaw plan` checks. A run does this before it reads
    data, sets an old run aside or trains, so a selector that matches nothing in stage 2 is refused before stage 1
    trains, not after it (with --overwrite, after the old run was deleted). Returns the plan."""
    if isinstance(plan, str):
        plan = build_plan(plan, num_groups=len(adapter.groups), **(plan_options or {}))
    if plan.lora is not None:
        add_lora(adapter, plan.lora, lora_targets(adapter, plan.lora))
    resolved = resolve_plan(adapter, plan)
    if new_run:  # a resumed run's plan was accepted when it began
        check_new_plan(adapter, plan, resolved)
        check_decay_below_lr(adapter, resolved)
    return plan


def check_batch_statistics(adapter: ModelAdapter, plan: Plan, batch_size: int) -> None:
    """Refuse, before anything trains or an old run is set aside, a batch of one image for a stage whose BatchNorm
    layers normalise with batch statistics (policy train, or frozen where they train) or are re-estimated (adapt):
    found only when that stage began, it stopped a run whose first stages had trained, an --overwrite's old run
    already gone, and a resume could never get past it. fit's own check at the stage's start stays as the last guard."""
    if batch_size >= 2:
        return
    layers = batch_norms(adapter.model)
    for index, resolved in enumerate(resolve_plan(adapter, plan), 1):
        trainable = set(resolved.trainable)
        policy = resolved.stage.batchnorm
        if resolved.stage.epochs and any(not locks_statistics(policy, batchnorm_trains(adapter, name, layer, trainable)) for name, layer in layers):
            raise ThawError(f"stage {index}/{len(plan.stages)} {resolved.stage.name!r}: {ONE_IMAGE_BATCHES}")
        if resolved.stage.epochs and policy == "adapt" and layers:  # its pass skips batches of one: it would adapt nothing
            raise ThawError(f"stage {index}/{len(plan.stages)} {resolved.stage.name!r}: batchnorm 'adapt' estimates the "
                            "statistics over batches of 2 images or more, and one image per batch gives none; use "
                            "batch_size 2 or more (--batch-size), or another policy")


ONE_IMAGE_BATCHES = ("BatchNorm layers use batch statistics (policy train), which one image per batch does not have; use "
                     "batch_size 2 or more (--batch-size), or batchnorm='eval' (plan_options or build_plan, --batchnorm eval, "
                     "or batchnorm: eval in a plan file's stage)")


def check_plan_before_data(
    model: object, weights: str | None, task: str, plan: Plan | str, plan_options: dict | None, new_run: bool = True,
) -> None:
    """check_plan on a meta-device stand-in of a model named by `model`, before the data is listed (which reads every
    image's header) or read; a model object's plan is checked on the model itself once it is adapted."""
    probe = plan_probe(model, weights, task)
    if probe is not None:
        check_plan(probe, plan, plan_options, new_run)


def check_image_augments(config: TrainConfig, task: str, resumed: bool = False) -> None:
    """Refuse image augmentations and image sizes for a text run (train_text calls this before it reads the
    table): set there, they would change nothing, and a user would believe they had."""
    if task != "text":
        return
    chosen = image_augment_flags(config)
    if chosen:
        verb, pronoun = ("augment", "them") if len(chosen) > 1 else ("augments", "it")
        raise ThawError(f"{' and '.join(chosen)} {verb} images; leave {pronoun} unset for text")
    # (progressive resize has its own refusal: check_progressive_resize). A run started before thaw refused it keeps
    # its recorded size, unused: its resume must not be refused for an option nobody types again.
    if config.image_size is not None and not resumed:
        raise ThawError("image_size (--image-size) sizes images; leave it unset for text (max_length, --max-length, sets the tokens kept per text)")


def check_class_scores(adapter: ModelAdapter, num_classes: int) -> None:
    """Refuse a model object whose forward returns something other than one tensor of class scores per image (a
    dict, a tuple, a Hugging Face ModelOutput, another width), before any data is read: thaw's loss takes logits, and
    a stage that runs the whole network might otherwise fail only after the head stages have trained. Checked on a
    meta-device copy at the weights' crop size; a forward that does not run there is left to the first step."""
    if not isinstance(adapter.preprocessing, Preprocessing):
        return
    probe = meta_copy(adapter.model)
    if probe is None:
        return
    probe.eval()
    size = adapter.preprocessing.crop_size
    try:
        with torch.no_grad():
            output = probe(torch.empty(2, 3, size, size, device="meta"))
    except Exception:  # noqa: BLE001 - a forward that does not run on the meta device: the first step reports it
        return
    if isinstance(output, torch.Tensor) and tuple(output.shape) == (2, num_classes):
        return
    what = f"a tensor of shape {list(output.shape)} for 2 images" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"
    raise ThawError(
        f"{type(adapter.model).__name__}'s forward returns {what}; thaw trains on one row of {num_classes} class scores per image: "
        "wrap the model in a module whose forward returns its logits tensor"
    )


def _forward_failures(adapter: ModelAdapter) -> Callable[[int], str | None]:
    """Why a forward pass at a size in px fails (None where it runs): on one meta-device copy of the model, in eval
    mode (no running-statistics update, and BatchNorm accepts a 1x1 map); no memory, no compute, the model untouched."""
    probe = meta_copy(adapter.model)
    if probe is None:  # a model that cannot be copied: torch's own error comes at the first step instead
        return lambda _size: None
    probe.eval()
    return lambda size: meta_forward_failure(probe, torch.empty(2, 3, size, size, device="meta"))


def check_switch(name: str, value: object) -> None:
    """True or False (numpy's bools, 0 and 1 too): a string such as "no" is true in Python (overwrite="no" replaced a
    finished run; tta="no" switched test-time augmentation on)."""
    if not (isinstance(value, (bool, numpy.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
        raise ThawError(f"{name} must be True or False, got {value!r}")
