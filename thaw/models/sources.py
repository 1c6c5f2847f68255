"""What a --model value names: a torchvision or timm image model, or a Hugging Face text encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

HF_PREFIX = "hf/"
TASKS = ("image", "text")


def is_hf_folder(model: str) -> bool:
    return (Path(model).expanduser() / "config.json").is_file()


def hf_source(model: str) -> str:
    """A local folder as given, `hf/ORG/NAME` as the hub id ORG/NAME."""
    return model[len(HF_PREFIX) :] if model.startswith(HF_PREFIX) else model


def task_of(args: argparse.Namespace) -> str:
    if getattr(args, "task", None):
        return args.task
    return "text" if args.model.startswith(HF_PREFIX) or is_hf_folder(args.model) else "image"
