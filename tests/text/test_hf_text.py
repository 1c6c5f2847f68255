"""The Hugging Face text adapter: groups in order, the feature/head split, loading errors, plans."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.conftest import python_path_with_repo, write_tiny_encoder
from thaw.cli import main
from thaw.errors import ThawError
from thaw.models.adapter import check_groups_cover_model
from thaw.models.hf_text import build_text_model, readable_tokens


def test_minilm_groups_run_embeddings_then_each_layer_then_head(minilm: Path) -> None:
    adapter = build_text_model(str(minilm), num_classes=2)
    assert adapter.group_names == ["embeddings", *[f"layer.{i}" for i in range(6)], "head"]
    check_groups_cover_model(adapter.model, adapter.groups)
    assert adapter.num_classes == 2 and adapter.family == "hf-text:bert"


def test_features_then_head_equals_the_full_forward(minilm: Path) -> None:
    adapter = build_text_model(str(minilm), num_classes=3)
    adapter.model.eval()
    inputs = dict(adapter.tokenizer(["free prize, call now", "see you soon"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(adapter.forward_head(adapter.forward_features(inputs)), adapter.model(inputs))


def test_mean_pooling_ignores_padding(minilm: Path) -> None:
    adapter = build_text_model(str(minilm), num_classes=2)
    adapter.model.eval()
    alone = dict(adapter.tokenizer(["hi"], return_tensors="pt"))
    padded = dict(adapter.tokenizer(["hi", "a much longer message that forces padding on the first"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.allclose(adapter.forward_features(alone)[0], adapter.forward_features(padded)[0], atol=1e-5)


@pytest.mark.parametrize("model_type", ["distilbert", "roberta", "bert"])
def test_other_encoder_families_group_the_same_way(tmp_path: Path, minilm: Path, model_type: str) -> None:
    folder = write_tiny_encoder(tmp_path / model_type, minilm, model_type, layers=3)
    adapter = build_text_model(str(folder), num_classes=4)
    assert adapter.group_names[0] == "embeddings" and adapter.group_names[-1] == "head"
    assert adapter.group_names[1:4] == ["layer.0", "layer.1", "layer.2"]
    check_groups_cover_model(adapter.model, adapter.groups)


def test_a_missing_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone is too late
    with pytest.raises(ThawError, match="not a local folder and the hub did not provide it"):
        build_text_model("no-such-org/no-such-model", num_classes=2)


def test_train_text_takes_the_hf_prefix_as_the_command_line_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # From Python "hf/ORG/NAME" was read as a folder: "model folder hf/... does not exist; pass ... or hf/ORG/NAME".
    import huggingface_hub.constants
    from tests.conftest import write_text_table
    from thaw.train import train_text

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    table = write_text_table(tmp_path / "t.tsv")
    with pytest.raises(ThawError, match="^cannot load model 'no-such-org/no-such-model': it is not a local folder and the hub did not provide it"):
        train_text(table, model="hf/no-such-org/no-such-model", out=tmp_path / "run")


def test_a_hub_model_in_the_local_cache_loads_without_asking_the_hub(tmp_path: Path, tiny_encoder: Path) -> None:
    """hf/ORG/NAME downloaded once: read from the cache, with the hub unreachable and HF_HUB_OFFLINE unset; asking the
    hub first cost five retries (a warning line each) before transformers fell back to the cache."""
    snapshot = tmp_path / "hub" / "models--thaw-test--tiny" / "snapshots" / ("0" * 40)  # the hub cache's own layout
    shutil.copytree(tiny_encoder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    unreachable = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "thaw", "plan", "--model", "hf/thaw-test/tiny", "--num-classes", "2", "--json"],
        capture_output=True, text=True, timeout=300, env=os.environ | unreachable | {"PYTHONPATH": python_path_with_repo()},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stages"] and done.stderr == ""  # no retry lines, no "fetching"


def test_a_hub_model_not_in_the_cache_is_fetched_in_one_line_and_refused_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # unreachable, whatever the machine
    monkeypatch.setattr(hub_http.time, "sleep", lambda _seconds: None)  # the hub's back-off between its retries
    with pytest.raises(ThawError, match="^cannot load model 'thaw-test/absent': it is not a local folder and the hub did not provide it"):
        build_text_model("thaw-test/absent", num_classes=2)
    said = capfd.readouterr().err
    assert said.strip() == "thaw: thaw-test/absent is not wholly in the Hugging Face cache; fetching it from the hub"  # no retry lines


def test_a_folder_without_weights_is_one_clear_error(tmp_path: Path, minilm: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).write_bytes((minilm / name).read_bytes())
    with pytest.raises(ThawError, match="cannot load a Hugging Face model from"):
        build_text_model(str(folder), num_classes=2)


def test_plan_shows_layer_decay_and_gradual_unfreezing_from_the_top(minilm: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--model", str(minilm), "--num-classes", "2", "--strategy", "gradual", "--layer-decay", "0.8", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["head", "top2", "top3", "top4", "top5", "top6", "top7", "all"]
    second = {g["name"]: g for g in stages[1]["groups"]}
    assert second["layer.5"]["trainable"] > 0 and second["layer.4"]["trainable"] == 0
    lrs = [g["lr"] for g in stages[-1]["groups"]]
    assert all(lower < upper for lower, upper in zip(lrs, lrs[1:]))  # every group slower than the one above it
    assert lrs[-2] == pytest.approx(lrs[-1] * 0.8)


@pytest.mark.parametrize("max_length", [1, 2])
def test_a_max_length_with_no_room_for_text_is_refused(tiny_encoder: Path, tmp_path: Path, max_length: int) -> None:
    """At or below the tokenizer's own [CLS] and [SEP] it would not truncate at all: a long text reached the model
    whole, past its positions (a traceback), while thaw.json recorded the limit."""
    from tests.conftest import write_text_table
    from thaw.train import train_text

    table = write_text_table(tmp_path / "t.tsv")
    with pytest.raises(ThawError, match=rf"max length must be a whole number of tokens, at least 3 \(the tokenizer adds 2 of its own\), got {max_length}$"):
        train_text(table, model=str(tiny_encoder), out=tmp_path / "run", plan="feature-extract", max_length=max_length)
    with pytest.raises(ThawError, match="max length must be a whole number of tokens, at least 3"):  # a resume with nothing to resume
        train_text(table, model=str(tiny_encoder), out=tmp_path / "run", plan="feature-extract", max_length=max_length, resume=True)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_with_no_room_beside_the_tokenizers_tokens_still_loads(tiny_encoder: Path, tmp_path: Path) -> None:
    """A run an older thaw trained with max_length 2 (before the check) loads with what it trained with."""
    from tests.conftest import write_text_table
    from thaw.export.run_dir import load_run
    from thaw.train import TrainConfig, train_text

    table, run = write_text_table(tmp_path / "t.tsv", rows_per_class=6), tmp_path / "run"
    train_text(table, model=str(tiny_encoder), out=run, plan="feature-extract", plan_options={"epochs": 1}, max_length=8,
               config=TrainConfig(quiet=True, batch_size=8))
    meta = json.loads((run / "thaw.json").read_text())
    meta["preprocessing"]["max_length"] = 2
    (run / "thaw.json").write_text(json.dumps(meta))
    adapter, _ = load_run(run)
    assert adapter.preprocessing.max_length == 2


@pytest.mark.parametrize("max_length", [0, "32", 2.5, True])
def test_a_max_length_that_is_no_count_of_tokens_is_refused(tiny_encoder: Path, max_length: object) -> None:
    with pytest.raises(ThawError, match=rf"max length must be a whole number of tokens, at least 1, got {max_length!r}$"):
        build_text_model(str(tiny_encoder), num_classes=2, max_length=max_length)


def test_build_text_model_checks_the_classes_before_the_encoder_loads(tiny_encoder: Path) -> None:
    """num_classes '2' was a TypeError, 2.5 torch's error after the whole encoder loaded; numpy's integers are taken."""
    import numpy as np

    assert build_text_model(str(tiny_encoder), num_classes=np.int64(3)).num_classes == 3
    for classes in ("2", 2.5, True, 1):
        with pytest.raises(ThawError, match=rf"num_classes must be a whole number of at least 2 \(a classifier tells classes apart\), got {re.escape(repr(classes))}$"):
            build_text_model(str(tiny_encoder), num_classes=classes)


def test_the_shortest_max_length_truncates_every_text(tiny_encoder: Path) -> None:
    from thaw.data.text import TextDataset

    adapter = build_text_model(str(tiny_encoder), num_classes=2, max_length=3)
    texts = TextDataset((("a long text " * 500, 0), ("short", 1)), adapter.model.tokenizer, adapter.preprocessing.max_length)
    assert texts.lengths == [3, 3]


def _encoder_with(positions: nn.Module | None) -> nn.Module:
    encoder, embeddings = nn.Module(), nn.Module()
    embeddings.position_embeddings = positions
    encoder.embeddings = embeddings
    return encoder


@pytest.mark.parametrize(
    ("positions", "tokenizer_limit", "expected"),
    [
        (nn.Embedding(128, 4), 512, 128),  # BERT-like: one row per position
        (nn.Embedding(130, 4, padding_idx=1), None, 128),  # RoBERTa-like: positions start after the padding index
        (nn.Embedding(514, 4, padding_idx=1), 512, 512),
        (None, None, sys.maxsize),  # DeBERTa-v3: relative positions, no table; any length
        (None, 1024, 1024),
    ],
)
def test_readable_tokens_are_what_the_position_table_and_tokenizer_allow(positions, tokenizer_limit, expected) -> None:
    tokenizer = SimpleNamespace(model_max_length=tokenizer_limit) if tokenizer_limit else object()
    assert readable_tokens(_encoder_with(positions), tokenizer) == expected


TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 100, "max_position_embeddings": 16}


@pytest.mark.parametrize(
    ("model_type", "options", "readable"),
    [
        ("bert", TINY, 16),
        ("roberta", TINY, 14),  # positions start after the padding index
        ("distilbert", {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 37, "vocab_size": 100, "max_position_embeddings": 16}, 16),
        ("xlm", {"emb_dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 100, "max_position_embeddings": 16}, 16),  # the model's own table
        ("yoso", TINY, 16),  # a table of 18 rows that reads 16
        ("deberta-v2", TINY | {"relative_attention": True, "position_biased_input": False}, None),  # relative positions: any length
    ],
)
def test_readable_tokens_of_real_encoders_are_the_longest_input_they_take(model_type: str, options: dict, readable: int | None) -> None:
    from transformers import AutoConfig, AutoModel

    encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **options)).eval()

    def takes(length: int) -> bool:
        try:
            with torch.no_grad():
                encoder(input_ids=torch.full((1, length), 5), attention_mask=torch.ones(1, length, dtype=torch.long))
        except (IndexError, RuntimeError):
            return False
        return True

    found = readable_tokens(encoder, object())
    if readable is None:
        assert found == sys.maxsize and takes(40)  # past max_position_embeddings
    else:
        assert found == readable and takes(readable) and not takes(readable + 1)
