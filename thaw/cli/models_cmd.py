"""`thaw models`: the supported architectures and which weights files are available offline."""

from __future__ import annotations

import argparse
import json

from torchvision import models as tv_models

from thaw.models import list_torchvision_models
from thaw.models.weights import hub_cache_path, packaged_copy


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list supported models and offline weights")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def weights_status(name: str) -> list[dict]:
    entries = []
    for weights_name, entry in tv_models.get_model_weights(name).__members__.items():
        if weights_name == "DEFAULT":
            continue
        cached = hub_cache_path(entry.url)
        offline = cached.is_file() or packaged_copy(cached.name) is not None
        default = tv_models.get_model_weights(name).DEFAULT is entry
        entries.append({"name": weights_name, "file": cached.name, "offline": offline, "default": default})
    return entries


def catalogue() -> list[dict]:
    return [{"name": n, "family": "torchvision", "weights": weights_status(n)} for n in list_torchvision_models()]


def run(args: argparse.Namespace) -> int:
    models = catalogue()
    if args.json:
        print(json.dumps({"models": models, "timm": "any timm model as timm/NAME (timm installs with thaw)"}))
        return 0
    for model in models:
        weights = ", ".join(
            w["name"] + ("*" if w["default"] else "") + (" [offline]" if w["offline"] else "") for w in model["weights"]
        )
        print(f"{model['name']:20s} {weights}")
    print("\n* DEFAULT weights; [offline] the file is cached or installed. timm models: --model timm/NAME")
    return 0
