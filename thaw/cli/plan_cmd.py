"""`thaw plan`: show, per stage and per group, what trains and how. Needs no data and no weights."""

from __future__ import annotations

import argparse
import json

from thaw.cli.options import add_model_options, add_plan_options, class_count, plan_from_args
from thaw.models import build_model
from thaw.models.hf_text import build_text_model
from thaw.models.lora import add_lora
from thaw.models.sources import task_of, hf_source
from thaw.plan import plan_report, render_plan
from thaw.plan.lora_targets import lora_targets
from thaw.plan.optim import check_decay_below_lr
from thaw.plan.stages import check_new_plan, resolve_plan


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("plan", help="dry run: what trains in each stage, at which lr")
    add_model_options(parser)
    parser.add_argument("--num-classes", type=class_count, required=True)
    add_plan_options(parser)
    parser.add_argument("--task", choices=("image", "text"), help="default: text for a Hugging Face folder or hf/ID")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # The meta device gives exact counts without allocating or loading weights.
    if task_of(args) == "text":
        adapter = build_text_model(hf_source(args.model), num_classes=args.num_classes, device="meta", load=False)
    else:
        adapter = build_model(args.model, weights=args.weights, num_classes=args.num_classes, device="meta")
    plan = plan_from_args(args, len(adapter.groups))
    if args.config:  # the dry run checks the whole file, as thaw train would: its training: values too
        from thaw.plan.config import read_plan_file
        from thaw.train.config import checked_training_options

        checked_training_options(args.config, read_plan_file(args.config)[1])
    if plan.lora is not None:
        add_lora(adapter, plan.lora, lora_targets(adapter, plan.lora))
    resolved = resolve_plan(adapter, plan)
    check_new_plan(adapter, plan, resolved)  # thaw train refuses such a plan: its dry run does too
    check_decay_below_lr(adapter, resolved)
    report = plan_report(adapter, plan, args.model)
    print(json.dumps(report) if args.json else render_plan(report))
    return 0
