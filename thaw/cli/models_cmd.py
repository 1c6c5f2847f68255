"""`thaw models`: the supported architectures and which weights files are available offline;
`thaw convert-weights`: another implementation's weights file under a model's own names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torchvision import models as tv_models

from thaw._io import names_a_folder
from thaw.cli.options import path_text
from thaw.errors import ThawError
from thaw.models import build_model, list_torchvision_models
from thaw.models.weights import first_renamed, head_rows_in_order, paired_with, hub_cache_path, load_state_dict_file, packaged_copy, rename_in_order


# Text encoders are not listed one by one: any transformers encoder works, from a folder or the hub.
TEXT_MODELS = "--task text --model FOLDER (a transformers encoder saved locally) or hf/ORG/NAME (the hub, or its local cache offline)"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list supported models and offline weights")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)
    convert = commands.add_parser(
        "convert-weights", help="rename a weights file saved by another implementation of a model to its names, in order"
    )
    convert.add_argument("source", type=Path, help="the weights file (.pth/.pt/.bin, tensors only: their order is kept)")
    convert.add_argument("--model", required=True, help="the architecture it holds: a torchvision name or timm/NAME")
    convert.add_argument("--out", type=path_text, required=True, help="the .safetensors file to write")
    convert.set_defaults(handler=run_convert)


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
        print(json.dumps({"models": models, "timm": "any timm model as timm/NAME (timm installs with thaw)", "text": TEXT_MODELS}))
        return 0
    for model in models:
        weights = ", ".join(
            w["name"] + ("*" if w["default"] else "") + (" [offline]" if w["offline"] else "") for w in model["weights"]
        )
        print(f"{model['name']:20s} {weights}")
    print("\n* DEFAULT weights; [offline] the file is cached or installed. timm models: --model timm/NAME")
    print(f"text: {TEXT_MODELS}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """The model as its builder makes it (original head included) takes the file's tensors one for one, in order;
    refused unless every pair has the same shape and kind. Written atomically, as safetensors."""
    from thaw.train.checkpoint import save_weights  # here: the training package is not needed to list models

    if args.source.suffix == ".safetensors":
        raise ThawError(
            f"{args.source} is safetensors, which stores no tensor order (it reads keys back sorted), so it cannot "
            "be renamed in order; save the original implementation's state_dict with torch.save and convert that"
        )
    if names_a_folder(args.out):  # Path() drops a last / or /.: the file would be written where a folder was meant
        raise ThawError(f"--out {args.out} names a folder; name the file to write, such as {Path(args.out) / 'weights.safetensors'}")
    args.out = Path(args.out)
    if args.out.suffix != ".safetensors":
        raise ThawError(f"--out {args.out} must end in .safetensors (thaw writes converted weights as safetensors)")
    from thaw.train.run_folder import is_run_file

    if is_run_file(args.out):
        raise ThawError(f"--out {args.out} is a run's own weights file; write the converted weights elsewhere")
    state = load_state_dict_file(args.source)
    adapter = build_model(args.model, weights=None)
    classes = head_rows_in_order(state, adapter.model, adapter.head_name)
    if classes is not None:  # a fine-tuned model's head: the model gets one of that width, under the same names
        adapter = build_model(args.model, weights=None, num_classes=classes)
    model = adapter.model
    model.load_state_dict(rename_in_order(state, model, str(args.source)), strict=True)
    save_weights(args.out, model)
    renamed = first_renamed(state, paired_with(state, model.state_dict()))
    example = f" (e.g. {renamed[0]} -> {renamed[1]})" if renamed else " (the names were already the model's)"
    head = f", its head of {classes} classes included" if classes is not None else ""
    print(
        f"wrote {args.out}: {len(state)} tensors of {args.source} renamed in order for {args.model}{example}{head}; "
        f"use it with --model {args.model} --weights {args.out}. Same shapes and kinds in order cannot tell apart two "
        "same-shaped layers stored in another order: check the model's predictions before trusting it"
    )
    return 0
