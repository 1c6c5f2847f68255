"""`RUN/report.html`: one self-contained page that shows what a run learned.

Computed first (`build_report` returns plain data), rendered second (`render_html`). The page needs no
network and no JavaScript: images are inline base64, tables are plain HTML with inline colours. Its
numbers come from the same pass as `thaw evaluate --json` (`score_run`), so they are equal by construction.
"""

from __future__ import annotations

import base64
import csv
import html
import re
import time
from pathlib import Path

from thaw._io import atomic_write, lies_within, names_a_folder
from thaw._version import __version__
from thaw.errors import ThawError
from thaw.data.text import TextColumns
from thaw.data.folders import file_would_be_read
from thaw.export.inference import ScoredSet, score_run
from thaw.export.interpret import TopLoss, heat_maps, most_confused, thumbnail, top_losses
from thaw.export.run_dir import load_run, read_metadata, recorded_data_path
from thaw.models import ModelAdapter
from thaw.train.metrics import undefined_as_null
from thaw.train.run_folder import REPORT, RUN_FOLDERS, holds_run
from thaw.plan import plan_from_dict, plan_report

LR_FIND = "lr_find.png"  # `thaw lr-find DATA ... --out RUN/lr_find.png` puts its plot where the report finds it
CURVES = "curves.png"
TOP_LOSSES = 16
MAX_TOP_LOSSES = 500  # each one is an inline thumbnail (and a Grad-CAM pass): past this the page stops being readable
MAX_NAME_PART = 60  # characters of DATA's name in the page's file name: at 4 bytes each, below the file system's 255
GENERATOR = f"thaw report {__version__}"  # the page's <meta name="generator">: what tells thaw's page from any other .html
PAGE_OPENING = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
# thaw's page: the generator tag, or the opening an older thaw wrote before it (its title, then the style sheet)
THAW_PAGE = re.compile(re.escape(PAGE_OPENING) + r'(<meta name="generator" content="thaw report[ "]|<title>thaw report: [^<]*</title><style>\nbody\{)')
HEAD_BYTES = 4096  # what is read of a file the page would replace: thaw's head fits, and a file of any size may be named
ELSEWHERE = "write the page elsewhere with --output FILE.html"  # where the default place is refused


def check_top_losses(top: object) -> None:
    """The gallery's size: a whole number from 1 to MAX_TOP_LOSSES (a string failed after the scoring, as a TypeError)."""
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP_LOSSES:
        raise ThawError(f"top (the top losses shown) must be a whole number from 1 to {MAX_TOP_LOSSES}, got {top!r}")


def run_data_path(run: Path, meta: dict, data_path: str | Path | None, command: str = "report") -> Path:
    """DATA as given, else where the run recorded its data; one line when neither exists."""
    recorded = recorded_data_path(meta)
    if not data_path and not recorded:  # Path("") would be the current folder
        raise ThawError(f"the run does not record where its data is; pass it: thaw {command} {run} DATA")
    path = Path(data_path) if data_path else Path(recorded)
    if not data_path and not path.exists():
        raise ThawError(f"the run's data was at {path}, which does not exist now; pass its place: thaw {command} {run} DATA")
    return path


def write_report(
    run: str | Path, data_path: str | Path | None = None, split: str | None = "val", top: int = TOP_LOSSES,
    columns: TextColumns | None = None, output: str | Path | None = None,
) -> tuple[Path, dict]:
    """Score the run on `split` of its data and write RUN/report.html, RUN/report--NAME.html for other data
    (report_path), or `output` (the page is self-contained, so it can live anywhere, say beside a run that is
    read-only); returns the file and the report's data.
    `columns`: a text table's own layout, for one scored whole (evaluation_set)."""
    run = Path(run)
    check_top_losses(top)  # before the scoring, which the page's size and place would otherwise waste
    output = check_report_output(output, run, data_path) if output is not None else None
    adapter, meta = load_run(run)
    if output is None:  # the default page's place is checked before the scoring too
        check_replaceable(report_path(run, meta, data_path), run, ELSEWHERE)
    scored = score_run(adapter, meta, run_data_path(run, meta, data_path), split, columns=columns)
    return save_report(run, adapter, meta, scored, top, output, data_path)


def report_path(run: Path, meta: dict, data: str | Path | None = None) -> Path:
    """Where the page goes without --output: RUN/report.html for the run's own data, RUN/report--NAME.html for other
    data (as thaw evaluate names its confusion-SPLIT--NAME.png): a report on a held-out set was written over the
    report of the run's own data."""
    name = other_data_name(data, meta)
    return Path(run) / (REPORT if name is None else f"{Path(REPORT).stem}--{name}{Path(REPORT).suffix}")


def other_data_name(data: str | Path | None, meta: dict) -> str | None:
    """DATA's file or folder name, for a file name, where DATA is not the run's own recorded data; None where it
    is, or none is given. thaw evaluate's rule for its pictures: letters of any script are kept, so that two names
    differ as they did."""
    if data is None or str(data) == "":
        return None
    recorded, scored = recorded_data_path(meta), Path(data).resolve()
    if recorded and scored == Path(recorded).resolve():
        return None
    name = re.sub(r"[^\w.-]+", "_", scored.name).strip("._-")
    return name[:MAX_NAME_PART] or "data"


def is_thaw_report(path: Path) -> bool:
    """Whether the file at `path` is a page thaw report wrote, read from its first HEAD_BYTES only."""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:  # unreadable: not known to be thaw's, so not replaced
        return False
    return THAW_PAGE.match(head.decode("utf-8", "replace")) is not None  # a cut character at the end is no matter


def check_replaceable(path: Path, run: Path, instead: str) -> None:
    """Refuse a file at `path` that the page would replace though thaw report did not write it (a suffix says little:
    .html is every page's). An earlier report is replaced, and so is an empty file (mktemp's): it loses nothing.
    RUN/report.html is the run's own page whatever it holds: older thaws wrote it without the generator tag."""
    if not path.is_file() or not path.stat().st_size or path.resolve() == (Path(run) / REPORT).resolve():
        return
    if not is_thaw_report(path):
        raise ThawError(f"{path} exists and is no page thaw report wrote; it is left as it was: {instead}, or delete that file first")


PAGE_SUFFIXES = (".html", ".htm")


def check_report_output(output: str | Path, run: str | Path, data: str | Path | None = None) -> Path:
    """A file the page can be written to, checked before any scoring: an HTML file (a page written over anything else
    lost it: a run's weights or export, a text run's table), not a folder, not a device, not in another run's folder
    and not where the run's data or the `data` scored would read it (a class folder), and no file but an earlier
    report (or an empty one): a page of another tool's is kept. RUN/report.html is taken."""
    text, run = str(output), Path(run)
    elsewhere = f"{run.resolve().name}-report.html"  # in the current folder: a run's own folder may be read-only
    if not text.strip():
        raise ThawError(f"--output is empty; name the file to write, such as {elsewhere}")
    if text == "-":
        raise ThawError(f"--output - : the report is a page written to a file, not to standard output; name the file, such as {elsewhere}")
    roots = [Path(root) for root in (recorded_data_path(read_metadata(run)), data) if root]
    try:
        return _checked_page(Path(text), text, run, roots, elsewhere)
    except (OSError, ValueError) as error:  # a name the file system refuses (too long, a NUL): said, not a traceback
        raise ThawError(f"cannot use --output {text!r} ({getattr(error, 'strerror', None) or error}); name another file, such as {elsewhere}") from None


def _checked_page(output: Path, text: str, run: Path, roots: list[Path], elsewhere: str) -> Path:
    if "\x00" in text:  # no file can be named so; pathlib's questions answer False, and the write raised late
        raise ValueError("embedded null byte")
    if names_a_folder(text) or output.is_dir():
        # a page among the images, or in another run's folder, would be refused next: the suggestion is elsewhere
        taken = holds_run(output) or any(lies_within(output, root) for root in roots)
        suggested = elsewhere if taken and output.resolve() != run.resolve() else output / REPORT
        said = "names a folder" if names_a_folder(text) else "is a folder"
        raise ThawError(f"--output {text} {said}; name the file to write, such as {suggested}")
    if output.suffix.lower() not in PAGE_SUFFIXES:
        raise ThawError(f"--output {output} must end in .html: the report is one HTML page (a file of another kind would be written over); such as {elsewhere}")
    if output.exists() and not output.is_file():
        raise ThawError(f"--output {output} is not a regular file (a device or a pipe); name a file, such as {elsewhere}")
    read_by = next((root for root in roots if file_would_be_read(root, output)), None)
    if read_by is not None:
        raise ThawError(f"--output {output} is among the images of {read_by}, where the next run on it would read it; write the page elsewhere, such as {elsewhere}")
    holder = output.parent.parent if output.parent.name in RUN_FOLDERS else output.parent
    if holds_run(holder) and holder.resolve() != run.resolve():  # that run's report.html is that run's page
        raise ThawError(f"--output {output} is in the folder of another run, {holder}; write the page elsewhere, such as {elsewhere}")
    named = Path(elsewhere).resolve() != output.resolve()  # the file refused is not suggested
    check_replaceable(output, run, f"write the page to another file, such as --output {elsewhere}" if named else "name another file with --output")
    return output


def save_report(
    run: Path, adapter: ModelAdapter, meta: dict, scored: ScoredSet, top: int = TOP_LOSSES, output: str | Path | None = None,
    data: str | Path | None = None,
) -> tuple[Path, dict]:
    """Write the page of a scored set: `output`, else report_path's (RUN/report.html, or RUN/report--NAME.html where
    `data`, what was scored, is not the run's own). Checked again here, just before the write: a page written over
    the run's weights would lose the model, over another tool's page that page."""
    check_top_losses(top)
    output = check_report_output(output, run, data) if output is not None else None
    target = output if output is not None else report_path(run, meta, data)
    if output is None:
        check_replaceable(target, run, ELSEWHERE)
    report = build_report(run, adapter, meta, scored, top)
    # A file name that is not UTF-8 (an old zip's) is shown with a replacement character, not a failed report.
    page = render_html(report).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    atomic_write(target, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return target, report


def build_report(run: Path, adapter: ModelAdapter, meta: dict, scored: ScoredSet, top: int = TOP_LOSSES) -> dict:
    """Everything the page shows, as data."""
    metrics, classes = scored.metrics, scored.metrics["classes"]
    losses = top_losses(scored, top)
    maps, heat_note = heat_maps(adapter, losses)
    return {
        "run": run.name,
        "task": meta.get("task", "image"),
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "glance": _glance(adapter, meta),
        "metrics": metrics,
        "scored_skipped": list(scored.skipped),  # the files of what was scored that did not read: the command names them
        "confused": most_confused(metrics["confusion"], classes),
        "gallery": [_gallery_item(item, classes, maps.get(i)) for i, item in enumerate(losses)],
        "heat_note": heat_note,
        "history": _history(run),
        "pictures": {name: picture for name in (CURVES, LR_FIND) if (run / name).is_file() and (picture := _png(run / name))},
    }


def _glance(adapter: ModelAdapter, meta: dict) -> dict:
    plan = plan_report(adapter, plan_from_dict(meta["plan"], "the run's plan"), meta["model"])
    for stage, recorded in zip(plan["stages"], meta["plan"]["stages"]):
        stage["train"] = recorded.get("train")
    return {
        "model": meta["model"], "weights": meta.get("weights"), "family": meta.get("family"), "classes": meta["classes"],
        "data": meta.get("data", {}), "skipped": meta.get("skipped_files", []), "plan": plan, "lora": meta["plan"].get("lora"),
        "best": meta.get("best", {}), "wall_s": meta.get("wall_s"), "images_per_s": meta.get("images_per_s"),
        "versions": meta.get("versions", {}), "preprocessing": meta.get("preprocessing", {}),
    }


def _gallery_item(item: TopLoss, classes: list[str], heat_map: str | None) -> dict:
    entry = {
        "true": classes[item.true], "predicted": classes[item.predicted], "probability": item.probability,
        "true_probability": item.true_probability, "loss": item.loss,
    }
    if isinstance(item.sample, str):
        return entry | {"text": item.sample}
    name = f"{item.sample.parent.name}/{item.sample.name}"  # class folder and file: enough to find it, no absolute path
    return entry | {"file": name, "thumbnail": thumbnail(item.sample), "heat_map": heat_map}


def _history(run: Path) -> list[dict]:
    """metrics.csv's rows; a damaged file shows no curves rather than failing the report (a cut row reads as blanks)."""
    try:
        with open(run / "metrics.csv", newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream, restval=""))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> str | None:
    """The plot inline, or None where the file is not a PNG (then the page leaves it out instead of a broken image)."""
    data = path.read_bytes()
    return base64.b64encode(data).decode("ascii") if data.startswith(PNG_SIGNATURE) else None


# Rendering: plain HTML, every value escaped.

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.note{color:#666}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;padding:.5em;width:220px;font-size:.9em}
.card img{display:inline-block;margin-right:4px}.wrong{color:#b00}.text{white-space:pre-wrap;word-break:break-word}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None, key: str) -> str:
    """A number shown to 4 places, with its exact value in data-value for readers that check it; None (a score that
    is 0/0) as "-", its data-value null."""
    if value is None:  # as JSON says it
        return f'<td data-key="{_e(key)}" data-value="null">-</td>'
    return f'<td data-key="{_e(key)}" data-value="{value!r}">{value:.4f}</td>'


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _image(data: str, mime: str, alt: str) -> str:
    return f'<img src="data:{mime};base64,{data}" alt="{_e(alt)}">'


def render_html(report: dict) -> str:
    sections = [_glance_html(report), _curves_html(report), _metrics_html(report), _confused_html(report), _gallery_html(report)]
    return (
        f'{PAGE_OPENING}<meta name="generator" content="{_e(GENERATOR)}"><title>thaw report: {_e(report["run"])}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>thaw report: {_e(report['run'])}</h1><p class=\"note\">written {_e(report['written'])}</p>"
        + "".join(sections) + "</body></html>\n"
    )


def _glance_html(report: dict) -> str:
    glance = report["glance"]
    data, best = glance["data"], glance["best"]
    counts = ", ".join(f"{split} {data[split]}" for split in ("train", "val", "test") if data.get(split))
    skipped = glance["skipped"]
    root = data.get("path", "")
    shown = "; ".join(f"{_inside(s['path'], root)} ({s['reason']})" for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    rows = [
        ("data trained on", f"{Path(data.get('path') or '?').name}: {data.get('layout', '')}"),  # names, not this machine's folders
        ("classes", f"{len(glance['classes'])}: {', '.join(glance['classes'])}"),
        ("samples per split", counts),
        ("skipped files", f"{len(skipped)}{': ' + shown if skipped else ''}"),
        ("model", f"{Path(glance['model']).name if '/' in glance['model'] and Path(glance['model']).is_absolute() else glance['model']} "
                  f"({glance['family']}), weights {glance['weights']}"),
        ("parameters", f"{glance['plan']['total_params']:,}"),
        ("delivered epoch", f"{best.get('epoch')} ({best.get('stage')}): {best.get('why') or 'val ' + str(best.get('metric'))}"),
        ("wall time", f"{glance['wall_s'] or 0:.1f} s, {glance['images_per_s'] or 0:.1f} training samples/s"),
        ("versions", ", ".join(f"{k} {v}" for k, v in glance["versions"].items())),
    ]
    facts = "".join(f"<tr><th>{_e(k)}</th><td style=\"text-align:left\">{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>The run at a glance</h2><table>{facts}</table>{_plan_html(glance)}"


def _inside(path: str, root: str) -> str:
    """A skipped file named inside the data folder: the page travels, the machine's folders need not."""
    try:
        return str(Path(path).relative_to(root)) if root else path
    except ValueError:
        return path


def _plan_html(glance: dict) -> str:
    total, rows = glance["plan"]["total_params"], []
    for index, stage in enumerate(glance["plan"]["stages"], 1):
        trained = [g for g in stage["groups"] if g["trainable"]]
        lrs = ", ".join(f"{g['name']} {g['lr']:.2g}" for g in trained)
        policies = ", ".join(sorted({g["batchnorm"] for g in stage["groups"] if g["batchnorm"]})) or "no BatchNorm"
        share = 100 * stage["trainable_params"] / total if total else 0
        cells = [f"{index}. {stage['name']}", stage["epochs"], ", ".join(stage.get("train") or []),
                 f"{stage['trainable_params']:,} ({share:.1f}%)", lrs, policies]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    lora = f"<p>LoRA: {_e(glance['lora'])}</p>" if glance["lora"] else ""
    header = ["stage", "epochs", "what trained", "trainable", "lr per group", "BatchNorm"]
    return f"<h3>The plan as run</h3>{_table(header, rows)}{lora}"


def _curves_html(report: dict) -> str:
    pictures = report["pictures"]
    parts = ["<h2>Learning curves</h2>"]
    if CURVES in pictures:
        parts.append(_image(pictures[CURVES], "image/png", "loss and accuracy per epoch, stage boundaries dashed"))
    columns = ["epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds"]
    rows = ["<tr>" + "".join(f"<td>{_e(_short(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in report["history"]]
    parts.append(_table(columns, rows))
    if LR_FIND in pictures:
        parts.append("<h3>lr finder</h3>" + _image(pictures[LR_FIND], "image/png", "loss against lr"))
    else:
        parts.append(f'<p class="note">No lr-finder plot: run thaw lr-find DATA ... --out RUN/{LR_FIND} to add one, RUN being this run\'s folder ({_e(report["run"])}), where the report reads it from.</p>')
    return "".join(parts)


def _short(text: str | None) -> str:
    try:
        return f"{float(text):.4g}"
    except (TypeError, ValueError):
        return text or ""


def _metrics_html(report: dict) -> str:
    m = undefined_as_null(report["metrics"])  # as `thaw evaluate --json` says them
    unit = "texts" if report["task"] == "text" else "images"
    summary = (
        f"<p>{_e(m['split'])} split: {m['count']} {unit}, {m['skipped_files']} skipped"
        f"{', each averaged with its mirror image (--tta)' if m.get('tta') else ''}.</p>"
        f'<table><tr><th>accuracy</th>{_number(m["accuracy"], "accuracy")}</tr>'
        f'<tr><th>macro-F1</th>{_number(m["macro_f1"], "macro_f1")}</tr>'
        f'<tr><th>loss</th>{_number(m["loss"], "loss")}</tr></table>'
    )
    rows = []
    for i, name in enumerate(m["classes"]):
        cells = [_number(m[f"per_class_{k}"][i], f"per_class_{k}.{i}") for k in ("precision", "accuracy", "f1")]
        support = f'<td data-key="per_class_support.{i}" data-value="{m["per_class_support"][i]}">{m["per_class_support"][i]}</td>'
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}{support}</tr>")
    per_class = _table(["class", "precision", "recall", "F1", "support"], rows)
    return f"<h2>How well it does</h2>{summary}<h3>Per class</h3>{per_class}{_confusion_html(m)}"


MAX_MATRIX_CLASSES = 50  # past this a matrix is megabytes of cells nobody reads: per-class scores and pairs tell it


def _confusion_html(m: dict) -> str:
    classes, confusion = m["classes"], m["confusion"]
    if len(classes) > MAX_MATRIX_CLASSES:
        return (f'<p class="note">{len(classes)} classes: the confusion matrices are left out (over {MAX_MATRIX_CLASSES}); '
                "the per-class table and the most confused pairs hold what they would show.</p>")
    counts, shares = [], []
    for t, row in enumerate(confusion):
        total = sum(row) or 1
        cells = "".join(
            f'<td data-key="confusion.{t}.{p}" data-value="{n}" style="{_shade(n / total)}">{n}</td>' for p, n in enumerate(row)
        )
        counts.append(f"<tr><th>{_e(classes[t])}</th>{cells}</tr>")
        cells = "".join(f'<td style="{_shade(n / total)}">{n / total:.2f}</td>' for n in row)
        shares.append(f"<tr><th>{_e(classes[t])}</th>{cells}</tr>")
    header = ["true \\ predicted", *classes]
    return (
        f"<h3>Confusion matrix (counts; rows: true class)</h3>{_table(header, counts)}"
        f"<h3>Confusion matrix (normalised: share of each true class)</h3>{_table(header, shares)}"
    )


def _shade(share: float) -> str:
    level = round(255 - 175 * share)
    return f"background:rgb({level},{level},255)" + (";color:#fff" if share > 0.6 else "")


def _confused_html(report: dict) -> str:
    pairs = report["confused"]
    if not pairs:
        return "<h2>Most confused</h2><p>No mistakes on this split.</p>"
    rows = [f"<tr><td>{_e(t)}</td><td>{_e(p)}</td><td>{n}</td></tr>" for t, p, n in pairs]
    return f"<h2>Most confused</h2>{_table(['true', 'predicted as', 'times'], rows)}"


def _gallery_html(report: dict) -> str:
    items = report["gallery"]
    title = f"<h2>Top losses: the {len(items)} {'texts' if report['task'] == 'text' else 'images'} with the highest loss</h2>"
    note = f'<p class="note">{_e(report["heat_note"])}. Loss is the cross-entropy of the true class.</p>'
    cards = "".join(_card(item) for item in items)
    return f'{title}{note}<div class="gallery">{cards}</div>'


def _card(item: dict) -> str:
    wrong = ' class="wrong"' if item["true"] != item["predicted"] else ""
    if "text" in item:
        shown = item["text"] if len(item["text"]) <= 400 else item["text"][:400] + " ..."
        body = f'<div class="text">{_e(shown)}</div>'
    else:
        pictures = [_image(item["thumbnail"], "image/jpeg", item["file"])] if item["thumbnail"] else ["(no longer decodes)"]
        if item["heat_map"]:
            pictures.append(_image(item["heat_map"], "image/jpeg", f"where the model looked: {item['file']}"))
        body = "".join(pictures) + f"<div>{_e(item['file'])}</div>"
    return (
        f'<div class="card" data-loss="{item["loss"]!r}">{body}'
        f"<div>true <b>{_e(item['true'])}</b> ({item['true_probability']:.3f})</div>"
        f"<div{wrong}>predicted <b>{_e(item['predicted'])}</b> ({item['probability']:.3f})</div>"
        f"<div>loss {item['loss']:.3f}</div></div>"
    )
