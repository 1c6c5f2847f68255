"""What is trainable: counted first (data, also for --json), rendered second."""

from __future__ import annotations

import numbers
import unicodedata

from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter, check_adapter
from thaw.plan.stages import Plan, ResolvedStage, resolve_plan


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared parameter counted once; of an adapter's model where given one."""
    if isinstance(model, ModelAdapter):
        model = model.model
    if not isinstance(model, nn.Module):
        raise ThawError(f"count_parameters takes a model (an nn.Module or a ModelAdapter), got {model!r}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_line(trainable: int, total: int) -> str:
    for value in (trainable, total):  # counts: a string here was a ValueError from the number format
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:  # numpy's integers too
            raise ThawError(f"trainable_line takes two parameter counts (count_parameters gives them), got {trainable!r} and {total!r}")
    share = 100.0 * trainable / total if total else 0.0
    return f"Trainable: {trainable:,} / {total:,} ({share:.1f}%)"


def stage_report(resolved: ResolvedStage) -> dict:
    return {
        "name": resolved.stage.name,
        "epochs": resolved.stage.epochs,
        "trainable_params": resolved.trainable_params,
        "groups": [
            {
                "name": g.name,
                "params": g.params,
                "trainable": g.trainable,
                "lr": g.lr,
                "weight_decay": g.weight_decay,
                "batchnorm": g.batchnorm,
            }
            for g in resolved.groups
        ],
    }


def plan_report(adapter: ModelAdapter, plan: Plan, model_name: str) -> dict:
    """The whole plan for one model as data; resolving every stage also validates it."""
    check_adapter(adapter, "plan_report")
    if not isinstance(plan, Plan):
        raise ThawError(f"plan_report takes a thaw.Plan, got {plan!r}; for a strategy: thaw.build_plan({plan!r}, num_groups=len(adapter.groups))")
    _, total = count_parameters(adapter.model)
    return {
        "model": model_name,
        "num_classes": adapter.num_classes,
        "total_params": total,
        "preprocessing": {key: list(value) if isinstance(value, tuple) else value for key, value in vars(adapter.preprocessing).items()},
        "stages": [stage_report(resolved) for resolved in resolve_plan(adapter, plan)],
    }


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK, most emoji) characters two, combining accents none; len() counted
    one each, and a table of such class names went out of line."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _padded(cell: str, width: int, left: bool) -> str:
    padding = " " * (width - display_width(cell))
    return cell + padding if left else padding + cell


LINE_BREAKING = ("Cc", "Zl", "Zp")  # control characters (a tab, a line break) and Unicode's line and paragraph separators


def one_line(text: str) -> str:
    """`text` with its control characters (a tab, a line break in a class name) written as escapes: a table cell that
    held one broke the table across lines, or out of line. Other characters (a no-break space, a zero-width joiner in
    an emoji) stay as they are."""
    return "".join(ascii(character)[1:-1] if unicodedata.category(character) in LINE_BREAKING else character for character in text)


def render_table(rows: list[list[str]], header: list[str]) -> str:
    rows = [[one_line(cell) for cell in row] for row in rows]
    widths = [max(display_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(_padded(cell, w, left=i == 0) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_plan(report: dict) -> str:
    out = [f"{report['model']}: {report['num_classes']} classes, {report['total_params']:,} parameters"]
    header = ["group", "params", "trainable", "lr", "weight decay", "batchnorm"]
    for index, stage in enumerate(report["stages"], 1):
        out.append("")
        skipped = " (skipped: nothing trains in a stage of 0 epochs)" if stage["epochs"] == 0 else ""
        out.append(f"Stage {index}/{len(report['stages'])} {stage['name']!r}: {stage['epochs']} epochs{skipped}")
        out.append(trainable_line(stage["trainable_params"], report["total_params"]))
        rows = [[_cell(g[k]) for k in ("name", "params", "trainable", "lr", "weight_decay", "batchnorm")] for g in stage["groups"]]
        out.append(render_table(rows, header))
    out.append("")
    out.append("Frozen groups get no lr, no weight decay and no optimizer state; norm and bias parameters never decay.")
    return "\n".join(out)
