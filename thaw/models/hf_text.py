"""Hugging Face text encoders (BERT, MiniLM, RoBERTa, DistilBERT, ...) as thaw classifiers.

The encoder comes from `transformers.AutoModel` (a local folder, or a hub id
for users online); thaw adds a pooling of the token states and a new linear
head for N labels. Groups run embeddings, each encoder layer in order, any
encoder parameters after the layers ("top"), then the head.

Pooling defaults to the mean over real tokens: sentence-transformers models
are trained for it, and for plain BERT-style checkpoints it gives frozen
features at least as good as the [CLS] token. `cls` is the alternative.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from thaw._io import answers
from thaw._numbers import as_whole
from thaw.errors import ThawError, first_line
from thaw.models.adapter import LayerGroup, ModelAdapter

POOLINGS = ("mean", "cls")
DEFAULT_MAX_LENGTH = 128
HEAD_DROPOUT = 0.1  # BERT's own classifier dropout


@dataclass(frozen=True)
class TextPreprocessing:
    """What turns text into model inputs: the tokenizer's folder, truncation length, pooling."""

    tokenizer: str
    max_length: int = DEFAULT_MAX_LENGTH
    pooling: str = "mean"
    source: str = "the model's own tokenizer"


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextClassifier(nn.Module):
    """Encoder, pooling, dropout, linear head; takes the tokenizer's dict of tensors."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean", dropout: float = HEAD_DROPOUT) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self.encoder(**inputs).last_hidden_state
        return pool(states, inputs["attention_mask"], self.pooling)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.features(inputs))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ThawError("text models need Hugging Face transformers: pip install 'thaw[text]'") from None
    transformers.logging.set_verbosity_error()  # load reports (an unused pooler, ...) are not the user's problem
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _load_error(source: str, error: Exception) -> ThawError:
    local = _local(source)
    if answers(local.exists):
        return ThawError(f"cannot load a Hugging Face model from {local} ({type(error).__name__}: {first_line(error, 160)}); it needs config.json, weights and tokenizer files")
    if not isinstance(error, OSError):  # it was there, and could not be read
        return ThawError(f"cannot load model {source!r} ({type(error).__name__}: {first_line(error, 160)}); check that transformers knows its model type")
    return ThawError(
        f"cannot load model {source!r}: it is not a local folder and the hub did not provide it "
        f"({type(error).__name__}). Pass the folder of a downloaded model, or go online and unset HF_HUB_OFFLINE"
    )


def _local(source: str) -> Path:
    """`source` as a local path; `~user` of no such user stays as typed (expanduser raised)."""
    try:
        return Path(source).expanduser()
    except RuntimeError:
        return Path(source)


def check_encoder_source(source: str) -> None:
    """Sources that cannot be a Hugging Face encoder, said at once: each went to the hub, which offline took most of
    a minute to say it did not provide a model it never could have. A hub ID is NAME or ORG/NAME: a path written as
    one (/, ./, ../, ~, or two slashes or more) is not, nor is a torchvision model's name."""
    local = _local(source)
    if answers((local / "thaw.json").is_file):
        raise ThawError(
            f"{source} is a thaw run folder; a text run cannot start from another run yet: --model takes a Hugging Face "
            "encoder (a folder with config.json, or hf/ORG/NAME)"
        )
    if (source.startswith(("/", "./", "../", "~")) or source.count("/") >= 2) and not answers(local.exists):
        raise ThawError(f"model folder {source} does not exist; pass the folder of a downloaded Hugging Face model, or hf/ORG/NAME")
    from thaw.models.torchvision_models import list_torchvision_models

    if source in list_torchvision_models():
        raise ThawError(
            f"{source} is a torchvision image model; text runs take a Hugging Face encoder (a folder with config.json, "
            "or hf/ORG/NAME): to train it on images, leave out --task text"
        )


def load_encoder(source: str, *, load: bool = True) -> tuple[nn.Module, object]:
    """The encoder (without any pooler: thaw pools itself) and its tokenizer. A hub ID is read from the local Hugging
    Face cache where it is there, without asking the hub (which offline retried for most of a minute, a line each
    time); only a model not in the cache is fetched, said in one line, with the hub's retry lines held back."""
    source = str(source)  # the Python API takes a Path too
    check_encoder_source(source)
    transformers = _transformers()
    try:
        return _read_encoder(transformers, source, load, local_files_only=True)
    except ThawError:
        raise
    except (OSError, ValueError, KeyError) as error:
        # Only a file missing from the cache (OSError) is the hub's to provide; a cached model transformers cannot
        # read (a model type newer than it) says why at once, not after minutes of asking the hub.
        if answers(_local(source).exists) or _hub_offline() or not isinstance(error, OSError):
            raise _load_error(source, error) from None
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks fetch the same files
        print(f"thaw: {source} is not wholly in the Hugging Face cache; fetching it from the hub", file=sys.stderr, flush=True)
    try:
        with _hub_retries_unsaid():
            return _read_encoder(transformers, source, load, local_files_only=False)
    except ThawError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise _load_error(source, error) from None


def _read_encoder(transformers: object, source: str, load: bool, local_files_only: bool) -> tuple[nn.Module, object]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    if not load:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        return _without_pooler(lambda **kw: transformers.AutoModel.from_config(config, **kw)), tokenizer
    make = lambda **kw: transformers.AutoModel.from_pretrained(source, local_files_only=local_files_only, **kw)  # noqa: E731
    return _without_pooler(make), tokenizer


def _hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_retries_unsaid() -> Iterator[None]:
    """huggingface_hub logs a warning per retry of a failed request (five, offline): thaw's one line says the outcome."""
    hub_http = logging.getLogger("huggingface_hub.utils._http")
    level = hub_http.level
    hub_http.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_http.setLevel(level)


def _without_pooler(make: object) -> nn.Module:
    """BERT-like encoders take add_pooling_layer=False; others have no pooler to drop."""
    try:
        return make(add_pooling_layer=False)
    except TypeError:
        return make()


def _layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's stack of transformer layers: its longest ModuleList."""
    lists = [(name, module) for name, module in encoder.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        raise ThawError(f"{type(encoder).__name__} has no list of layers; thaw groups text encoders by their layer stack")
    return max(lists, key=lambda item: len(item[1]))


def text_groups(model: TextClassifier) -> list[LayerGroup]:
    """embeddings, layer.0 ... layer.N-1, top (parameters after the layers, if any), head."""
    list_name, layers = _layer_list(model.encoder)
    prefix = f"encoder.{list_name}."
    names = [name for name, _ in model.named_parameters()]
    layer_params: list[list[str]] = [[] for _ in layers]
    before, after = [], []
    for name in names:
        if name.startswith("head."):
            continue
        if name.startswith(prefix):
            layer_params[int(name[len(prefix) :].split(".")[0])].append(name)
        elif not any(layer_params):
            before.append(name)
        else:
            after.append(name)
    groups = [LayerGroup("embeddings", _owners(before), tuple(before))]
    groups += [LayerGroup(f"layer.{i}", (f"{prefix}{i}",), tuple(params)) for i, params in enumerate(layer_params) if params]
    if after:
        groups.append(LayerGroup("top", _owners(after), tuple(after)))
    groups.append(LayerGroup("head", ("head",), tuple(n for n in names if n.startswith("head."))))
    return [group for group in groups if group.params]


def _owners(params: list[str]) -> tuple[str, ...]:
    """The modules that own `params`, for selectors and reports."""
    return tuple(dict.fromkeys(name.rsplit(".", 1)[0] for name in params))


def adapt_text_model(model: TextClassifier, preprocessing: TextPreprocessing, family: str) -> ModelAdapter:
    adapter = ModelAdapter(
        model, family=family, head_name="head", groups=text_groups(model), preprocessing=preprocessing,
        features_fn=model.features, head_fn=model.classify,
    )
    adapter.tokenizer = model.tokenizer
    return adapter


def check_max_length(max_length: object, tokenizer: object = None) -> None:
    """A whole number of tokens; given the `tokenizer` a run trains with, room for one token of text beside its own
    ([CLS], [SEP]): below it the tokenizer does not truncate at all (with a warning), so a long text reaches the model
    whole, past its positions. (A finished run is loaded with what it trained with, whatever that was.)"""
    known = hasattr(tokenizer, "num_special_tokens_to_add")
    special = tokenizer.num_special_tokens_to_add() if known else 0
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= special:
        adds = f" (the tokenizer adds {special} of its own)" if known else ""  # without it, its count is not known yet
        raise ThawError(f"max length must be a whole number of tokens, at least {special + 1}{adds}, got {max_length!r}")


def readable_tokens(encoder: nn.Module, tokenizer: object) -> int:
    """The most tokens the model reads. Where it has a table of absolute positions (an embedding named
    `*position_embeddings`: `embeddings.` in BERT's family, the model's own in XLM's), a longer input is a shape
    error inside the model, not a truncation: the table's rows, less those before the first position where positions
    start after the padding index (RoBERTa, MPNet: 514 rows, 512 positions), and at most the config's
    max_position_embeddings (YOSO's table has 2 rows more than it reads, with no padding index). A model with no such
    table (DeBERTa-v2/v3's relative positions) reads any length its tokenizer allows. The tokenizer's own limit,
    where it sets one, holds too."""
    found = [getattr(tokenizer, "model_max_length", None)]
    tables = [module for name, module in encoder.named_modules() if name.endswith("position_embeddings") and isinstance(module, nn.Embedding)]
    if tables:
        table = tables[0]
        found.append(table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0))
        found.append(getattr(getattr(encoder, "config", None), "max_position_embeddings", None))
    return min((limit for limit in found if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0), default=sys.maxsize)


def build_text_model(
    source: str,
    *,
    num_classes: int,
    pooling: str = "mean",
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device = "cpu",
    load: bool = True,
) -> ModelAdapter:
    """A Hugging Face encoder from `source` (folder or hub id) with a new `num_classes` head."""
    if pooling not in POOLINGS:
        raise ThawError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")
    classes = as_whole(num_classes)  # any integer type (numpy's too), checked before the encoder loads
    if classes is None or classes < 2:
        raise ThawError(f"num_classes must be a whole number of at least 2 (a classifier tells classes apart), got {num_classes!r}")
    # A whole number here; room beside the tokenizer's own tokens is a new run's check (train_text): a finished run
    # loads, and a stopped one resumes, with what it trained with
    check_max_length(max_length)
    encoder, tokenizer = load_encoder(source, load=load and str(device) != "meta")
    model = TextClassifier(encoder, classes, pooling).to(device)
    model.tokenizer = tokenizer
    length = min(max_length, readable_tokens(encoder, tokenizer))
    preprocessing = TextPreprocessing(str(Path(source).resolve()) if os.path.isdir(source) else source, length, pooling)
    return adapt_text_model(model, preprocessing, f"hf-text:{encoder.config.model_type}")
