"""Whatever a user types, every command answers with exit code 0, or one error line and exit code 2.

Hypothesis draws argument vectors for every subcommand: numbers at and past their edges, paths that
are missing, empty, folders where files belong or unreadable, unknown choices, repeated flags.
`thaw.cli.main` runs in-process; any exception that escapes it is a failure by itself.

A valid draw may ask for a long run (--epochs 1000000000000): each run trains at most one epoch
for real, then the patched epoch raises _EnoughTraining, which counts as "ran fine". The demo's
argument handling runs, its minute of training does not.
"""

from __future__ import annotations

import os
import shutil
from itertools import count
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import write_class_images
from thaw import build_model
from thaw.cli import demo_cmd, main
from thaw.plan.freeze import BATCHNORM_POLICIES
from thaw.plan.optim import OPTIMIZERS
from thaw.plan.strategies import STRATEGIES
from thaw.train.config import METRICS, PRECISIONS, SCHEDULES
from thaw.train.fit import Trainer

REAL_EPOCHS = 1  # per run; a valid draw has shown it trains once it reaches a second epoch


class _EnoughTraining(BaseException):
    """Not an Exception: nothing in thaw catches it, so it ends the run where it is raised."""


# Values as a user might type them; "@name" stands for a path of the `world` fixture.
INTS = ("0", "1", "2", "-1", "1000000000000", "nan", "inf", "1.5", "x", "")
FLOATS = ("0", "1", "-1", "0.5", "1e-3", "nan", "inf", "-inf", "1e12", "1e400", "x", "")
PATHS = ("@missing", "@folder", "@empty", "@junk", "@locked", "@locked_folder", "@under_file", "")
MODELS = ("mobilenet_v3_small", "resnet5", "vit_b_16", "timm/no_such_model", "")
WEIGHTS = ("none", "IMAGENET9", "@junk", "@missing.pth", "")
FLAG = None  # an option that takes no value


def choices(valid: tuple[str, ...]) -> tuple[str, ...]:
    return (*valid, "bogus", "")


PLAN_OPTIONS = {
    "--model": MODELS,
    "--weights": WEIGHTS,
    "--strategy": choices(STRATEGIES),
    "--config": ("@plan", "@bad_plan", *PATHS),
    "--epochs": INTS,
    "--head-epochs": INTS,
    "--lr": (*FLOATS, "features.0=1e-3", "nowhere=1e-3", "=", "head="),
    "--lr-range": ("1e-5:1e-3", "1e-3:1e-5", "0:1", "nan:1", "1:inf", "a:b", "1", ""),
    "--layer-decay": FLOATS,
    "--weight-decay": FLOATS,
    "--batchnorm": choices(BATCHNORM_POLICIES),
    "--groups-per-stage": INTS,
    "--top-groups": INTS,
    "--lora-rank": INTS,
    "--lora-alpha": FLOATS,
    "--lora-dropout": FLOATS,
    "--lora-targets": ("features.12", "nothing_here", "head", "["),
}
TRAIN_OPTIONS = PLAN_OPTIONS | {
    "--batch-size": INTS,
    "--val-split": FLOATS,
    "--optimizer": choices(OPTIMIZERS),
    "--schedule": choices(SCHEDULES),
    "--warmup": FLOATS,
    "--precision": choices(PRECISIONS),
    "--no-channels-last": FLAG,
    "--grad-clip": FLOATS,
    "--label-smoothing": FLOATS,
    "--accumulate": INTS,
    "--seed": INTS,
    "--workers": INTS,
    "--metric": choices(METRICS),
    "--early-stopping": INTS,
    "--no-augment": FLAG,
    "--image-size": INTS,
    "--strict": FLAG,
    "--device": ("cpu", "auto", "cuda", "cuda:7", "meta", "bogus", ""),
    "--no-cache": FLAG,
    "--cache-views": INTS,
    "--quiet": FLAG,
    "--task": choices(("image", "text")),
    "--text-column": ("0", "9", "text", ""),
    "--label-column": ("1", "-1", "label", ""),
    "--delimiter": (",", "\t", "ab", ""),
    "--test-split": FLOATS,
    "--max-length": INTS,
    "--pooling": choices(("mean", "cls")),
    "--out": ("@fresh", *PATHS),
    "--resume": ("@run_copy", *PATHS),
    "--json": FLAG,
    "--report": FLAG,
    "--log": ("tensorboard", "mlflow", "bogus", ""),
}
COMMANDS = {
    "plan": (
        ["plan", "--model", "mobilenet_v3_small", "--num-classes", "3"],
        PLAN_OPTIONS | {"--num-classes": INTS, "--task": choices(("image", "text")), "--json": FLAG},
    ),
    "models": (["models"], {"--json": FLAG}),
    "train": (
        # Valid as it stands: a tiny model on tiny images, one epoch, so a valid draw runs to the end (the run folder,
        # the summary) unless it asks for more epochs.
        ["train", "@data", "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--head-epochs", "1", "--epochs", "0", "--quiet", "--out", "@fresh"],
        TRAIN_OPTIONS,
    ),
    "evaluate": (["evaluate", "@run", "@data"], {"--split": choices(("train", "val", "test")), "--json": FLAG, "--report": FLAG, "--tta": FLAG}),
    "report": (
        ["report", "@run", "@data", "--top-losses", "2"],
        {"--split": choices(("train", "val", "test")), "--top-losses": (*INTS, "500", "501"), "--json": FLAG,
         "--output": ("@fresh.html", "@fresh", "@weights", *PATHS)},
    ),
    "predict": (
        ["predict", "@run", "@images"],
        {"--file": ("-", "@texts", *PATHS), "--top-k": INTS, "--json": FLAG, "--tta": FLAG},
    ),
    # ONNX export takes 20 s of CPU here; tests/cli/test_train_cli.py exports to it. The options are the same.
    "export": (["export", "@run", "--format", "torchscript"], {"--format": choices(("torchscript",)), "--output": ("@fresh.pt", *PATHS)}),
    "lr-find": (
        ["lr-find", "@data", "--model", "mobilenet_v3_small", "--weights", "none", "--steps", "6", "--batch-size", "4",
         "--out", "@fresh.png"],
        {"--model": MODELS, "--weights": WEIGHTS, "--train": ("head", "features.12", "nothing_here", ""),
         "--start": FLOATS, "--end": FLOATS, "--steps": INTS, "--batch-size": INTS,
         "--out": ("@fresh.png", "@fresh.xyz", "@fresh", *PATHS), "--json": FLAG},
    ),
    "demo": (["demo", "--out", "@fresh"], {"--out": ("@fresh", *PATHS), "--json": FLAG}),
    "convert-weights": (
        ["convert-weights", "@weights", "--model", "mobilenet_v3_small", "--out", "@fresh.safetensors"],
        {"--model": MODELS, "--out": ("@fresh.safetensors", "@fresh.pth", "@weights", *PATHS)},
    ),
}
# Positionals a command takes, replaced or dropped by a draw.
POSITIONALS = {
    "train": ("@data", "@flat", "@texts", *PATHS),
    "evaluate": ("@run", "@data", "@flat", *PATHS),
    "report": ("@run", "@data", "@flat", "@texts", *PATHS),
    "predict": ("@run", "@images", "@texts", *PATHS),
    "export": ("@run", *PATHS),
    "lr-find": ("@data", "@flat", *PATHS),
    "convert-weights": ("@weights", "@junk", "@junk.safetensors", "@missing.pth", "@plan", *PATHS),
}


@st.composite
def argument_vectors(draw: st.DrawFn, command: str) -> list[str]:
    """The command's valid base, then drawn options (later ones win, as argparse reads them) and mutations."""
    base, options = COMMANDS[command]
    argv = list(base)
    if command in POSITIONALS and draw(st.booleans()):  # replace one positional, or drop it
        spots = [i for i, token in enumerate(argv) if i > 0 and token.startswith("@") and not argv[i - 1].startswith("--")]
        spot = draw(st.sampled_from(spots))
        replacement = draw(st.sampled_from(POSITIONALS[command] + ("<drop>",)))
        argv[spot:spot + 1] = [] if replacement == "<drop>" else [replacement]
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=4)):
        values = options[flag]
        if values is FLAG:
            argv.append(flag)
        else:
            value = draw(st.sampled_from(values))
            argv += draw(st.sampled_from(([flag, value], [f"{flag}={value}"])))
    mutation = draw(st.sampled_from(("none", "none", "none", "unknown flag", "flag without value", "drop a token")))
    if mutation == "unknown flag":
        argv.append("--no-such-option")
    elif mutation == "flag without value":
        argv.append(draw(st.sampled_from([f for f, v in options.items() if v is not FLAG] or ["--json"])))
    elif mutation == "drop a token" and len(argv) > 1:
        del argv[draw(st.integers(1, len(argv) - 1))]
    return argv


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The paths a draw can name: good data and a trained run, and every kind of bad path."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    write_class_images(data / "train", per_class=3, size=16, seed=0)
    write_class_images(data / "val", per_class=2, size=16, seed=1)
    (root / "folder").mkdir()
    (root / "empty").write_text("")
    (root / "junk").write_bytes(b"\x89PNG not really\x00" * 8)
    (root / "junk.safetensors").write_bytes(b"\x89PNG not really\x00" * 8)
    (root / "locked").write_text("stages: []\n")
    (root / "locked").chmod(0)
    (root / "locked_folder").mkdir()
    (root / "locked_folder").chmod(0)
    (root / "plan.yaml").write_text("stages:\n  - {name: head, epochs: 1, train: [head], lr: 1.0e-3}\n")
    (root / "bad_plan.yaml").write_text("stages:\n  - {name: head, epochs: -1, weight_decay: -0.1, lr: fast}\n")
    (root / "texts.txt").write_text("a first text\n\nanother one\n")
    # mobilenet_v3_small's tensors under another implementation's names, for convert-weights
    state = build_model("mobilenet_v3_small", weights=None).model.state_dict()
    torch.save({f"theirs.{index}.{key.rsplit('.', 1)[-1]}": value for index, (key, value) in enumerate(state.items())}, root / "weights.pth")
    return {
        "data": data, "flat": data / "train", "images": data / "val" / "red", "texts": root / "texts.txt",
        "missing": root / "missing", "missing.pth": root / "missing.pth", "folder": root / "folder", "empty": root / "empty",
        "junk": root / "junk", "junk.safetensors": root / "junk.safetensors", "locked": root / "locked", "locked_folder": root / "locked_folder",
        "under_file": root / "junk" / "inside", "plan": root / "plan.yaml", "weights": root / "weights.pth", "bad_plan": root / "bad_plan.yaml", "root": root,
    }


@pytest.fixture(scope="module", autouse=True)
def bounded_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """At most REAL_EPOCHS real epochs per run; the demo stops after its own argument checks; no network."""
    real_epoch = Trainer.run_epoch

    def run_epoch(self: Trainer, *args: object, **kwargs: object) -> dict:
        self._fuzz_epochs = getattr(self, "_fuzz_epochs", 0) + 1
        if self._fuzz_epochs > REAL_EPOCHS:
            raise _EnoughTraining
        return real_epoch(self, *args, **kwargs)

    def run_demo(out: Path, say: object = print) -> list:
        raise _EnoughTraining

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "run_epoch", run_epoch)
        patch.setattr(demo_cmd, "run_demo", run_demo)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        # --log mlflow writes to ./mlruns, and a draw without --out to ./runs: keep both out of the checkout
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def trained(world: dict[str, Path]) -> dict[str, Path]:
    """One tiny run for evaluate, predict, export and --resume (a copy, which a resume may change)."""
    run = world["root"] / "run"
    code = main(["train", str(world["data"]), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
                 "--batch-size", "8", "--head-epochs", "1", "--epochs", "0", "--out", str(run), "--quiet"])
    assert code == 0
    shutil.copytree(run, world["root"] / "run_copy")
    return world | {"run": run, "run_copy": world["root"] / "run_copy"}


FRESH = count()


def resolve(argv: list[str], paths: dict[str, Path]) -> list[str]:
    """Put real paths in place of "@name" (inside "--flag=@name" too); "@fresh..." is a new path each time."""
    resolved = []
    for token in argv:
        flag, equals, value = token.rpartition("=") if token.startswith("--") and "=" in token else ("", "", token)
        if value.startswith("@fresh"):
            value = str(paths["root"] / f"fresh{next(FRESH)}{value[len('@fresh'):]}")
        elif value.startswith("@"):
            value = str(paths[value[1:]])
        resolved.append(f"{flag}{equals}{value}")
    return resolved


def outcome(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, stderr) of `thaw ARGV`, run in-process."""
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: a usage error (2), or --help (0); sys.exit("text") means failure (1)
        code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    except _EnoughTraining:
        code = 0
    return code, capfd.readouterr().err


def assert_one_line_or_success(argv: list[str], paths: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    code, stderr = outcome(resolve(argv, paths), capfd)
    assert "Traceback" not in stderr, stderr
    assert code in (0, 2), (code, stderr)
    said = [line for line in stderr.splitlines() if line.strip() and not _is_warning(line)]
    if code == 2:  # exactly one line, and it is thaw's error
        assert len(said) == 1 and said[0].startswith("thaw") and ": error" in said[0], stderr
    else:
        assert not any(": error" in line for line in said), stderr


def _is_warning(line: str) -> bool:
    """thaw's own warnings and Python's (the warning line and the source line under it) are not errors."""
    return line.startswith("thaw: warning") or "Warning:" in line or line.startswith("  ")


# THAW_FUZZ_SCALE=20 fuzzes twenty times longer, with fresh random draws each time.
SCALE = float(os.environ.get("THAW_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Few examples per command, so the file stays under a minute; the same ones on every run (CI)."""
    return settings(
        max_examples=max(1, round(examples * SCALE)), deadline=None, database=None, derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@fuzz(60)
@given(argv=argument_vectors("plan"))
@example(argv=["plan", "--model", "mobilenet_v3_small", "--num-classes", "3", "--head-epochs", "0", "--epochs", "0"])
@example(argv=["plan", "--model", "mobilenet_v3_small", "--num-classes", "-1"])
@example(argv=["plan", "--model", "mobilenet_v3_small", "--num-classes", "3", "--strategy", "lora", "--lora-alpha", "nan"])
@example(argv=["plan", "--model", "mobilenet_v3_small", "--num-classes", "3", "--config", "@bad_plan"])
def test_plan(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


@fuzz(5)
@given(argv=argument_vectors("models"))
def test_models(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


TRAIN = COMMANDS["train"][0]


@fuzz(60)
@given(argv=argument_vectors("train"))
@example(argv=[*TRAIN, "--accumulate", "0"])
@example(argv=[*TRAIN, "--batch-size", "0"])
@example(argv=[*TRAIN, "--batch-size", "-1"])
@example(argv=[*TRAIN, "--head-epochs", "0", "--epochs", "0"])
@example(argv=[*TRAIN, "--model", "vit_b_16"])
@example(argv=[*TRAIN, "--device", "cuda:7"])
@example(argv=[*TRAIN, "--workers", "1000000000000"])
@example(argv=[*TRAIN, "--out", ""])
def test_train(argv: list[str], trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, trained, capfd)


@fuzz(15)
@given(argv=argument_vectors("evaluate"))
def test_evaluate(argv: list[str], trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, trained, capfd)


@fuzz(15)
@given(argv=argument_vectors("report"))
@example(argv=["report", "@run"])  # the data where the run recorded it
@example(argv=["report", "@run", "@data", "--top-losses", "0"])
def test_report(argv: list[str], trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, trained, capfd)


@fuzz(20)
@given(argv=argument_vectors("predict"))
@example(argv=["predict", "@run", "@images", "--top-k", "0"])
@example(argv=["predict", "@run", ""])
def test_predict(argv: list[str], trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, trained, capfd)


@fuzz(4)
@given(argv=argument_vectors("export"))
def test_export(argv: list[str], trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, trained, capfd)


@fuzz(20)
@given(argv=argument_vectors("lr-find"))
@example(argv=[*COMMANDS["lr-find"][0], "--out", "@folder"])
@example(argv=[*COMMANDS["lr-find"][0], "--out", "@fresh.xyz"])
def test_lr_find(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


@fuzz(10)
@given(argv=argument_vectors("demo"))
@example(argv=["demo", "--out", "@junk"])
@example(argv=["demo", "--out", "@under_file"])
def test_demo(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


@fuzz(15)
@given(argv=argument_vectors("convert-weights"))
@example(argv=[*COMMANDS["convert-weights"][0][:-1], "@weights"])  # --out the source itself (.pth: refused)
@example(argv=["convert-weights", "@junk.safetensors", "--model", "mobilenet_v3_small", "--out", "@fresh.safetensors"])
def test_convert_weights(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


@fuzz(10)
@given(argv=st.lists(st.sampled_from(["", "bogus", "--json", "-h", "train", "--model", "@junk", "--no-such-option"]), max_size=3))
def test_anything_else(argv: list[str], world: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_or_success(argv, world, capfd)


def test_predict_refuses_an_empty_path(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`thaw predict RUN "$IMAGES"` with IMAGES unset: not every image under the current folder."""
    write_class_images(tmp_path, classes=("red",), per_class=1, size=16)
    monkeypatch.chdir(tmp_path)
    code, stderr = outcome(["predict", str(trained["run"]), ""], capfd)
    assert code == 2
    assert stderr.strip() == "thaw: error: an empty path names no image; give image files or folders to classify"


@pytest.mark.parametrize("output", ["folder", "under_file", "missing_parent"])
def test_export_refuses_an_output_it_cannot_write(output: str, trained: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    target = trained["root"] / "no_such_folder" / "model.pt" if output == "missing_parent" else trained[output]
    code, stderr = outcome(["export", str(trained["run"]), "--format", "torchscript", "--output", str(target)], capfd)
    if output == "missing_parent" and code == 0:  # creating the missing folder is as good as refusing
        assert target.is_file()
    else:
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and str(target) in stderr, stderr
