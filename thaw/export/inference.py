"""Using a finished run: evaluate it on its data or a held-out set, predict classes, pick images to check an export on."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from thaw._allocator import memory_kept_between_steps
from thaw._io import answers
from thaw.data.folders import MANIFEST_DELIMITERS, ImageData, candidate_files, describe_skipped, discover, unicode_form_hint
from thaw.data.images import UnreadableImage, load_rgb
from thaw.data.loaders import ImageDataset, make_loader
from thaw.data.manifest_check import check_image_table
from thaw.data.text import TextColumns, TextData, TextDataset, load_text_data, read_table, recorded_split_rules
from thaw.data.transforms import eval_transform
from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.models.adapter import Preprocessing
from thaw.train.config import TrainConfig, check_switch
from thaw.train.fit import choose_engine
from thaw.train.loop import evaluate
from thaw.train.settings import samples_digest, split_as_recorded


class FlipAveraged(nn.Module):
    """Test-time augmentation: the model's softmax averaged over each image and its mirror image.

    Returns the log of the averaged probabilities, so everything downstream reads it as logits:
    softmax gives the averaged probabilities back, cross-entropy is the loss of the averaged prediction.
    One forward pass over both views, a batch twice the size.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        both = self.model(torch.cat([images, images.flip(-1)])).float().softmax(dim=1)
        averaged = (both[: len(images)] + both[len(images) :]) / 2
        return averaged.clamp_min(torch.finfo(averaged.dtype).tiny).log()  # a probability of 0 would be a logit of -inf


def with_tta(model: nn.Module, meta: dict, tta: bool) -> nn.Module:
    """The model, or (`tta`) the model averaged over mirror images; a text run has no mirror: one line."""
    check_switch("tta", tta)
    if not tta:
        return model
    if meta.get("task") == "text":
        raise ThawError("--tta averages over mirrored images; a text run has no views to average: drop it (tta=False, no --tta)")
    return FlipAveraged(model)


def _run_data(meta: dict, data_path: str | Path) -> ImageData | TextData:
    """The run's data, split exactly as in training (same shares, same seed)."""
    seed = meta.get("train_config", {}).get("seed", 0)
    if meta.get("task") == "text":
        columns, test_split = TextColumns(**meta.get("columns", {})), meta.get("test_split", 0.0)
        rules = recorded_split_rules(meta, "thaw.json")  # a run made with an earlier rule is scored on the split it was made with
        return split_as_recorded(
            lambda rule: load_text_data(data_path, columns=columns, val_split=meta["val_split"], test_split=test_split, seed=seed, split_rule=rule),
            rules, meta.get("data", {}).get("samples"),
        )[0]
    check_image_table(str(data_path), "the run is an image run: score text with a text run")  # not its rows as missing files
    return discover(data_path, val_split=meta.get("val_split", 0.2), seed=seed, min_classes=1)  # scored, not trained on


@dataclass(frozen=True)
class EvaluationSet:
    """What `thaw evaluate` scores: one split of the data, or all of it (split "all")."""

    split: str
    samples: tuple
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _whole_table(meta: dict, data_path: str | Path, columns: TextColumns | None = None) -> EvaluationSet:
    """Every usable row of a text table; no split, so no split's rules (such as two rows per label). `columns`: the
    table's own, where it is laid out unlike the run's (another delimiter, other column names); else the run's."""
    pairs, skipped = read_table(data_path, columns or TextColumns(**meta.get("columns", {})))
    classes = tuple(sorted({label for _, label in pairs}))
    index = {name: i for i, name in enumerate(classes)}
    return EvaluationSet("all", tuple((text, index[label]) for text, label in pairs), classes, tuple(skipped))


def _check_own_columns(meta: dict, split: str | None) -> None:
    if meta.get("task") != "text":
        raise ThawError("text columns and a delimiter (columns, --text-column, --label-column, --delimiter) read text tables; this is an image run")
    if split is not None:
        raise ThawError(
            f"split {split} (--split) is the run's own split of its table, read as the run read it; drop the split to score "
            "the whole table with its own columns, or drop the columns (--text-column, --label-column, --delimiter)"
        )


def evaluation_set(meta: dict, data_path: str | Path, split: str | None = None, columns: TextColumns | None = None) -> EvaluationSet:
    """The samples to score. `split` None: val where the data comes in split folders, else all of it.

    A folder of class folders, a CSV manifest or a text table is scored whole by default (a held-out
    set of the user's own); naming a split there reproduces the training run's split of it. `columns`: how a text
    table scored whole is laid out, where not as the run's table was.
    """
    if columns is not None:
        _check_own_columns(meta, split)
    if split is None and meta.get("task") == "text":
        return _whole_table(meta, data_path, columns)
    data = _run_data(meta, data_path)
    if split is None:
        split = "val" if data.split_folders else "all"
    text = meta.get("task") == "text"  # a text run's test share is held out of the table too, by its seed
    rebuilt_test = split == "test" and text and data.test is not None  # without a test share: data.split says so
    if (split in ("train", "val") or rebuilt_test) and not getattr(data, "val_from_folder", False):
        _check_same_samples(meta, data, data_path, split)
    samples = data.everything() if split == "all" else data.split(split)
    return EvaluationSet(split, samples, data.classes, _skipped_in(data, split, samples, Path(data_path)))


def _skipped_in(data: ImageData | TextData, split: str, samples: tuple, root: Path) -> tuple[tuple[str, str], ...]:
    """What was skipped in the split scored: in split folders, the unreadable files under the scored split's folder (a
    val split held out of train/ counts train/'s, as any of them might have been held out); otherwise all of them."""
    if split == "all" or not getattr(data, "split_folders", False):
        return tuple(data.skipped)
    folders = {Path(path).relative_to(root).parts[0] for path, _ in samples}  # train, val, test (at any depth below)
    return tuple((path, reason) for path, reason in data.skipped if Path(path).relative_to(root).parts[0] in folders)


def in_run_classes(chosen: EvaluationSet, run_classes: list[str]) -> EvaluationSet:
    """The samples labelled with the run's class indices, matched by name: held-out data may hold some of the run's
    classes only (a test folder of one class). A class the run never learned cannot be scored: one line naming it."""
    if list(chosen.classes) == list(run_classes):
        return chosen
    unknown = [name for name in chosen.classes if name not in run_classes]
    if unknown:
        raise ThawError(
            f"the data has {len(unknown)} class(es) this run never learned ({_listed(unknown)}); the run knows "
            f"{_listed(run_classes)}: evaluate on data whose class folders or labels are among the run's"
            + unicode_form_hint(unknown, run_classes, "the run")
        )
    index = [list(run_classes).index(name) for name in chosen.classes]
    return replace(chosen, samples=tuple((sample, index[label]) for sample, label in chosen.samples), classes=tuple(run_classes))


def _listed(names: list[str] | tuple[str, ...], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _check_same_samples(meta: dict, data: ImageData | TextData, data_path: str | Path, split: str) -> None:
    """A val split held out of the training samples (and a text table's test share) is rebuilt by its seed: from other
    samples (files added, removed, changed or now unreadable) it would be another split, holding samples the model
    trained on."""
    recorded = meta.get("data", {}).get("samples")  # runs written before thaw recorded it are not checked
    # Another folder is the user's own data to split (a held-out set, say); the run's folder changed in place is not.
    same_place = Path(data_path).resolve() == Path(meta.get("data", {}).get("path") or "/nonexistent").resolve()
    if recorded and same_place and samples_digest(data) != recorded:
        raise ThawError(
            f"{data_path} differs from the data this run trained on (samples added, removed, changed or now unreadable), "
            f"so the run's {split} split cannot be rebuilt from it and could hold samples the model trained on; "
            "pass held-out data as DATA, scored whole (no --split)" + (", or score its test split (--split test)" if data.test and meta.get("task") != "text" else "")  # a test/ folder, not a share
        )


@dataclass(frozen=True)
class ScoredSet:
    """One evaluation pass: the metrics `thaw evaluate --json` prints, and how each sample scored.

    Four numbers a sample, not its logits: a large set with many classes would not fit in memory as logits.
    """

    metrics: dict
    samples: tuple  # (image path or text, class index), in the order of the tensors; files that failed to decode left out
    losses: torch.Tensor  # cross-entropy of the true class
    predicted: torch.Tensor  # class index
    probability: torch.Tensor  # of the predicted class
    true_probability: torch.Tensor
    skipped: tuple[tuple[str, str], ...] = ()  # (file or table line, reason): what could not be scored


def evaluate_run(
    adapter: ModelAdapter, meta: dict, data_path: str | Path, split: str | None = None, batch_size: int = 64, quiet: bool = True,
    tta: bool = False, columns: TextColumns | None = None,
) -> dict:
    """Metrics of the run's model on `data_path` (see evaluation_set for what is scored, and `columns`); its classes
    must be among the run's, matched by name (in_run_classes).
    `tta`: average the softmax over each image and its mirror (FlipAveraged).
    A per-class score that is 0/0 (a class the data lacks, or never predicted) is 0.0 here;
    thaw.train.metrics.undefined_as_null turns those into None, as `thaw evaluate --json` writes them."""
    return score_run(adapter, meta, data_path, split, batch_size, quiet, tta, columns).metrics


@memory_kept_between_steps()  # each batch reuses the pages the batch before freed, as in training
def score_run(
    adapter: ModelAdapter, meta: dict, data_path: str | Path, split: str | None = None, batch_size: int = 64, quiet: bool = True,
    tta: bool = False, columns: TextColumns | None = None,
) -> ScoredSet:
    """evaluate_run, keeping every sample's logits: the report's numbers are the same pass as `thaw evaluate`'s."""
    _check_score_call(adapter, meta, data_path, batch_size, columns)
    model = with_tta(adapter.model, meta, tta)  # before any work: --tta on a text run is one line
    chosen = in_run_classes(evaluation_set(meta, data_path, split, columns), meta["classes"])
    if not chosen.samples:  # a table whose every row was skipped: a score of nothing would read as accuracy 0
        if split is not None:  # a split drawn from a few rows can be empty where the rows are fine
            raise ThawError(f"{data_path}: its {split} split holds nothing to score (no readable sample with a label); "
                            "score the data whole without --split, or check its rows or files")
        raise ThawError(f"{data_path} holds nothing to score (no readable sample with a label); check its rows or files")
    engine = choose_engine(TrainConfig(quiet=quiet, precision=run_precision(meta)), adapter.model)
    adapter.model.to(engine.device)
    if meta.get("task") == "text":
        dataset = TextDataset(chosen.samples, adapter.tokenizer, adapter.preprocessing.max_length)
    else:
        dataset = ImageDataset(chosen.samples, eval_transform(adapter.preprocessing), 2 * adapter.preprocessing.resize_size)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    batches: list[torch.Tensor] = []
    keep = lambda logits, labels: batches.append(_per_sample(logits, labels))  # noqa: E731
    metrics = evaluate(adapter.model, loader, engine, len(chosen.classes), label=chosen.split, forward=model, observe=keep)
    skipped = list(chosen.skipped) + engine.failed
    failed = {path for path, _ in engine.failed}
    # The loader's own order (text is batched by length), less the files that did not decode.
    order = [i for batch in loader.batch_sampler for i in batch if str(chosen.samples[i][0]) not in failed]
    scores = torch.cat(batches) if batches else torch.empty(0, 4)
    if len(order) != len(scores):  # a sample named for another's score would put wrong pictures in the report
        raise ThawError(f"scored {len(scores)} samples but can name {len(order)}; please report this as a thaw bug")
    metrics = metrics | {"split": chosen.split, "classes": list(chosen.classes), "skipped_files": len(skipped), "tta": "flip" if tta else None}
    losses, predicted, probability, true_probability = scores.T
    return ScoredSet(metrics, tuple(chosen.samples[i] for i in order), losses, predicted.long(), probability, true_probability, tuple(skipped))


def _check_score_call(adapter: object, meta: object, data_path: object, batch_size: object, columns: object) -> None:
    """What evaluate_run and score_run are given, one line each, before any data is read."""
    if not isinstance(adapter, ModelAdapter) or not isinstance(meta, dict) or "classes" not in meta:  # {}: a KeyError
        raise ThawError("adapter and meta must be what load_run(RUN) returns: adapter, meta = load_run(RUN)")
    if not isinstance(data_path, (str, Path)) or not str(data_path):
        raise ThawError(f"data_path must be the data's folder or table, got {data_path!r}")
    _check_count("batch_size", batch_size)
    if columns is not None and not isinstance(columns, TextColumns):
        raise ThawError(f"columns must be a TextColumns (thaw.data.text.TextColumns(delimiter=';')), got {columns!r}")


def check_finite_outputs(logits: torch.Tensor) -> None:
    """A trained run's outputs are finite (training stops at a non-finite loss): NaN here means damaged weights, and it
    printed as probability nan, exit 0, and as NaN in --json, which is no JSON."""
    if not torch.isfinite(logits).all():
        raise ThawError("the model's outputs are NaN or infinite: its weights are likely damaged (a bit flip; training "
                        "stops at a non-finite loss, so a trained run's outputs are finite); restore the run's model.safetensors or train it again")


def _per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[batch, 4]: loss of the true class, predicted class, its probability, the true class's probability."""
    check_finite_outputs(logits)
    probabilities = logits.softmax(dim=1)
    best, predicted = probabilities.max(dim=1)
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    return torch.stack([losses, predicted.float(), best, probabilities.gather(1, labels[:, None])[:, 0]], dim=1)


def check_images(meta: dict, preprocessing: Preprocessing, count: int = 4) -> list[torch.Tensor]:
    """Up to `count` images of the run's data (its val split, spread over the classes) in the run's
    evaluation preprocessing, to check an export on; none when the data folder is gone or unreadable."""
    recorded = meta.get("data", {}).get("path")
    if meta.get("task") == "text" or not recorded or not Path(recorded).exists():
        return []
    path = Path(recorded)
    try:
        data = _run_data(meta, path)
        candidates = [file for file, _ in data.val[:: max(1, len(data.val) // count)]] + [file for file, _ in data.train]
    except ThawError:  # the folder changed since training: any images in it will do
        candidates = candidate_files(path) if path.is_dir() else []
    transform, images = eval_transform(preprocessing), []
    for file in candidates:
        try:
            images.append(transform(load_rgb(file, 2 * preprocessing.resize_size)))
        except UnreadableImage:
            continue
        if len(images) == count:
            break
    return images


def image_files(paths: list[str]) -> list[Path]:
    """The files to classify: each file named, and in each folder every file training would read there (whatever its
    extension); the ones that are not images are skipped and listed by predict_files, as training lists them."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += candidate_files(path)
        elif path.is_file() or path.is_symlink():  # a link to nowhere is reported as unreadable, not as missing
            files.append(path)
        elif path.exists():  # /dev/null, a pipe (`<(...)`): there is no image file to open by name
            raise ThawError(f"{path} is neither a file nor a folder; pass image files or folders")
        else:
            raise ThawError(f"{path} does not exist; pass image files or folders")
    if not files:
        raise ThawError(f"no image files found in {', '.join(paths)}")
    return files


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]]


def run_precision(meta: dict) -> str:
    """The precision to use a run in: fp32 where it trained in fp32 (bf16 would move its probabilities by up to a few
    hundredths from its own val pass and from its fp32 export), else auto (bf16 where the device does it natively)."""
    return "fp32" if (meta.get("train_config") or {}).get("precision") == "fp32" else "auto"


def _manifest_hint(skipped: list[tuple[str, str]]) -> str:
    """A manifest given to predict lists images rather than being one: say how to use its images."""
    manifest = next((path for path, _ in skipped if Path(path).suffix.lower() in MANIFEST_DELIMITERS), None)
    if manifest is None:
        return ""
    return f"; {manifest} is a list of images, not one: score them against its labels with thaw evaluate RUN {manifest}, or pass the images"


@torch.no_grad()
@memory_kept_between_steps()
def predict_files(
    adapter: ModelAdapter, classes: list[str], files: list[Path] | str | Path, top_k: int = 3, batch_size: int = 32, tta: bool = False,
    precision: str = "auto",
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Top-k classes of each image file (a file or a folder alone, or a list of files); `tta` averages each image's
    softmax with its mirror image's; `precision` as `run_precision(meta)` gives it, to compute as the run trained."""
    _check_request(top_k, batch_size)
    _check_predict_call(adapter, classes, "image")
    check_switch("tta", tta)
    given, files = files, files if isinstance(files, (str, Path)) else _as_list(files)  # a generator (Path.glob), a Series
    if not isinstance(files, (str, Path)) and not all(isinstance(f, (str, Path)) for f in files):
        raise ThawError(f"files must be an image file or folder, or a list of them, got {given!r}")
    # A path alone or in a list may be a folder (read for its images); a file that cannot be read is skipped.
    files = image_files([str(files)]) if isinstance(files, (str, Path)) else [f for path in files for f in _files_in(Path(path))]
    if not files:
        raise ThawError("no files to classify; pass image files or folders")
    engine = choose_engine(TrainConfig(quiet=True, precision=precision), adapter.model)
    adapter.model.to(engine.device).eval()
    model = FlipAveraged(adapter.model) if tta else adapter.model
    transform = eval_transform(adapter.preprocessing)
    predictions, skipped = [], []
    for start in range(0, len(files), batch_size):
        batch, kept = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path, 2 * adapter.preprocessing.resize_size)))
                kept.append(path)
            except UnreadableImage as reason:
                skipped.append((str(path), str(reason)))
        if not batch:
            continue
        with engine.autocast():
            logits = model(engine.to_device(torch.stack(batch)))
        top = _top_classes(logits, classes, top_k)
        for path, values, indices in zip(kept, top.values, top.indices):
            predictions.append(Prediction(str(path), [(classes[i], float(v)) for v, i in zip(values, indices)]))
    if not predictions:  # nothing to show: one error, not a warning of the skipped files and then the same as an error
        raise ThawError(f"no image to classify: {describe_skipped(tuple(skipped))}{_manifest_hint(skipped)}")
    return predictions, skipped


def _check_request(top_k: object, batch_size: object) -> None:
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        _check_count(name, value)


def _as_list(items: object) -> list:
    """Any iterable as a list (bytes and None are no list of paths or texts: [] then, refused by the caller's check)."""
    if items is None or isinstance(items, bytes):
        return [items]
    try:
        return list(items)
    except TypeError:
        return [items]


def _check_count(name: str, value: object) -> int:
    """A whole number of at least 1 (numpy's integers too), as a plain int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ThawError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _check_predict_call(adapter: object, classes: object, task: str) -> None:
    """What predict_files and predict_texts are given: a run's adapter of their kind and its class names, one line each."""
    if not isinstance(adapter, ModelAdapter):
        raise ThawError(f"adapter must be a run's model (load_run(RUN)[0]), got a {type(adapter).__name__}")
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)) or not all(isinstance(name, str) for name in classes):
        raise ThawError(f"classes must be a list of the run's class names (load_run's meta['classes']), got {classes!r}")
    is_text = getattr(adapter, "tokenizer", None) is not None
    if task == "image" and is_text:
        raise ThawError("predict_files classifies images; this is a text run's model: use predict_texts")
    if task == "text" and not is_text:
        raise ThawError("predict_texts classifies texts; this is an image run's model: use predict_files")


def _files_in(path: Path) -> list[Path]:
    """A folder's images, or the path itself (a name too long for the file system is then skipped as unreadable)."""
    return candidate_files(path) if answers(path.is_dir) else [path]


def _top_classes(logits: torch.Tensor, classes: list[str], top_k: int) -> torch.return_types.topk:
    """The top-k probabilities and their classes' indices; class names that do not match the model's outputs one to one
    would name the wrong class (or none): refused."""
    if logits.shape[1] != len(classes):
        raise ThawError(f"{len(classes)} class names for a model of {logits.shape[1]} outputs; pass the run's classes (load_run's meta['classes'])")
    check_finite_outputs(logits)
    return logits.float().softmax(dim=1).cpu().topk(min(top_k, len(classes)), dim=1)


@torch.no_grad()
def predict_texts(
    adapter: ModelAdapter, classes: list[str], texts: list[str] | str, top_k: int = 3, batch_size: int = 64, precision: str = "auto"
) -> list[Prediction]:
    """Labels and probabilities for each text (one text alone, or a list of them), in the order given; `precision` as
    for predict_files."""
    _check_request(top_k, batch_size)
    _check_predict_call(adapter, classes, "text")
    given, texts = texts, texts if isinstance(texts, str) else _as_list(texts)  # a generator, a pandas Series
    if not isinstance(texts, str) and not all(isinstance(text, str) for text in texts):
        raise ThawError(f"texts must be a text or a list of texts, got {given!r}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ThawError("give one or more non-empty texts to classify")
    empty = [str(number) for number, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        which = f"text {empty[0]} of {len(texts)} is" if len(empty) == 1 else f"texts {', '.join(empty)} of {len(texts)} are"
        raise ThawError(f"give one or more non-empty texts to classify; {which} empty")
    engine = choose_engine(TrainConfig(quiet=True, precision=precision), adapter.model)
    adapter.model.to(engine.device).eval()
    predictions = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        inputs = adapter.tokenizer(chunk, truncation=True, max_length=adapter.preprocessing.max_length, padding=True, return_tensors="pt")
        with engine.autocast():
            logits = adapter.model(engine.to_device(dict(inputs)))
        top = _top_classes(logits, classes, top_k)
        for text, values, indices in zip(chunk, top.values, top.indices):
            predictions.append(Prediction(text, [(classes[i], float(v)) for v, i in zip(values, indices)]))
    return predictions
