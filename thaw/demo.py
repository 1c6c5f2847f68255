"""The demo: real ImageNet MobileNetV2 weights fine-tuned on real handwritten digits, offline, two ways."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from thaw.data.digits import write_digits_folder
from thaw.data.folders import holds_image_files
from thaw.export.inference import evaluate_run
from thaw.export.run_dir import load_run
from thaw.plan import count_parameters, resolve_stage
from thaw.errors import ThawError
from thaw.train import TrainConfig, saved_settings, train_images
from thaw.train.run_folder import METADATA, SET_ASIDE, holds_run

MODEL, WEIGHTS = "mobilenet_v2", "IMAGENET1K_V1"
# 8x8 scans carry no detail of their own; 96 px gives the network room (two-phase test accuracy
# was 0.958 at 64 px and 0.978 at 96 px when chosen) and keeps the demo well inside 3 minutes on 2 cores.
IMAGE_SIZE = 96
# Digits are not mirror-symmetric, so the default flip augmentation would teach wrong shapes.
CONFIG = TrainConfig(image_size=IMAGE_SIZE, augment=False, batch_size=64, quiet=True)
STRATEGIES = {
    "feature-extract": {"epochs": 3},
    "two-phase": {"head_epochs": 3, "epochs": 2},
}


@dataclass
class DemoRow:
    strategy: str
    trainable_share: float
    wall_s: float
    test_accuracy: float
    out: Path


def run_demo(out: Path, say=print) -> list[DemoRow]:
    check_not_in_class_folders(out)
    for strategy in STRATEGIES:  # before any work: the demo replaces its own runs, never a user's
        check_demo_run_folder(out / strategy, out / "digits")
    data = write_digits_folder(out / "digits")
    rows = []
    for strategy, options in STRATEGIES.items():
        say(f"training {MODEL} ({WEIGHTS}) with {strategy} on {data} ...")
        run = out / strategy
        result = train_images(
            data, model=MODEL, weights=WEIGHTS, plan=strategy, plan_options=options, config=CONFIG, out=run, overwrite=True
        )  # the demo's own folder: a second demo replaces the first
        adapter, meta = load_run(run)
        test = evaluate_run(adapter, meta, data, "test")
        rows.append(DemoRow(strategy, _trainable_share(adapter, meta), result.wall_s, test["accuracy"], run))
    return rows


def check_not_in_class_folders(out: Path) -> None:
    """The demo's folders must not land in a user's image data: `thaw train photos` after `thaw demo --out photos`
    read digits/ and the runs' plots as classes; inside a class folder they would be that class's images. A folder
    of class folders is told by two or more folders with images straight in them, that make up most of its folders
    (a home's Desktop/ and Pictures/ beside its Documents/ and Music/ are no classes); a run's folder and the demo's
    own count as none. Only the folders `out` names are looked at, not those above the working folder: the
    README's first command writes runs/demo wherever it is typed."""
    classes = _class_folders_in(out)
    if classes:
        shown = ", ".join(f"{name}/" for name in classes[:3]) + (", ..." if len(classes) > 3 else "")
        raise ThawError(
            f"--out {out} holds class folders of images ({shown}): thaw train on it would read the demo's folders as "
            "classes; choose another --out"
        )
    for folder in _named_folders(out):
        if folder.name in _class_folders_in(folder.parent):
            raise ThawError(
                f"--out {out} is in the class folder {folder.name}/ of the images in {folder.parent}: thaw train on them "
                f"would read the demo's digits as images of {folder.name}; choose another --out"
            )


def _named_folders(out: Path) -> list[Path]:
    """The folders the path `out` names, each resolved: photos/red/demo names photos, photos/red and photos/red/demo;
    `.` the working folder. A path into the working folder, however written ($PWD/runs/demo, ../here/runs/demo), names
    what its relative form does; another absolute path, every folder from the root."""
    try:
        here, where = Path.cwd().resolve(), out.resolve()
    except (OSError, RuntimeError):  # a loop of links (`ln -s loop loop`): Python's own message is a traceback
        raise ThawError(f"--out {out} cannot be followed (a loop of links, or a folder that cannot be read); choose another --out") from None
    parts = (where.relative_to(here).parts or (".",)) if where.is_relative_to(here) else (out.parts or (".",))
    base = here if where.is_relative_to(here) else Path()
    return [(base / Path(*parts[:end])).resolve() for end in range(1, len(parts) + 1)]


def _class_folders_in(folder: Path) -> list[str]:
    """The class folders straight in `folder`: its folders with images in them, where there are two or more and they
    are most of its folders (hidden ones, the demo's and runs' aside); none otherwise."""
    try:
        inside = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    except OSError:  # none yet, or unlistable: the write says so if it cannot write either
        return []
    own = {"digits", *STRATEGIES}
    counted = [path for path in inside if path.name not in own and not holds_run(path)]
    with_images = [path.name for path in counted if holds_image_files(path)]
    return with_images if len(with_images) >= 2 and 2 * len(with_images) > len(counted) else []


def check_demo_run_folder(run: Path, digits: Path) -> None:
    """A folder the demo may write its run into: none yet, empty, or a demo's run on these digits (its checkpoint
    says so). `thaw demo --out runs` beside `thaw train ... --out runs/two-phase` deleted that run without a word."""
    if not holds_run(run):  # anything else there is train_images' to refuse or keep, as for any --out
        return
    # A demo killed while it replaced its run, before the new one's first checkpoint, left only the old run, set aside.
    recorded = _recorded_data_path(run) or _recorded_data_path(run / SET_ASIDE)
    if recorded != str(digits.resolve()):
        trained_on = f" (it trained on {recorded})" if recorded else ""
        raise ThawError(
            f"{run} holds a run that is not this demo's{trained_on}; the demo replaces only the runs it made in this folder: "
            "choose another --out"
        )


def _recorded_data_path(run: Path) -> str | None:
    """Where a run's data was: its thaw.json's record (a finished run), else its checkpoint's; None where neither says."""
    try:
        recorded = json.loads((run / METADATA).read_text()).get("data_path") if (run / METADATA).is_file() else None
        return recorded if recorded is not None else (saved_settings(run) or {}).get("data_path")
    except (OSError, ValueError, AttributeError, ThawError):  # damaged: not known to be the demo's
        return None


def _trainable_share(adapter, meta) -> float:
    """Share of parameters the last stage trains (feature-extract: the head alone)."""
    from thaw.plan import plan_from_dict

    stage = plan_from_dict(meta["plan"]).stages[-1]
    _, total = count_parameters(adapter.model)
    return resolve_stage(adapter, stage).trainable_params / total
