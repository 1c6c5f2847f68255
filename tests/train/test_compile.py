"""--compile: stages that run the network train through torch.compile, to the same model as eager training
(up to rounding), repeat exactly under a seed, save plain weights, and a failed compile is one line."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from tests.conftest import Crash, SmallConvNet, cli_config, crash_after, write_text_table
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_text
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import fit

# Inductor compiles C++ on the CPU; a machine without a compiler cannot run --compile at all (that refusal is tested).
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler (g++)")
NO_COMPILER = {"cpp.cxx": (None, "/no-such-folder/no-such-compiler"), "force_disable_caches": True}

PLAN = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), ConstantLr(1e-3), batchnorm="eval")))
CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True, precision="fp32", ema=False, compile=True)


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Each test compiles for itself: nothing another test compiled (under other settings) is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(data: Path, out: Path, config: TrainConfig = CONFIG, **options):
    torch.manual_seed(0)
    adapter = adapt(SmallConvNet(), num_classes=3)
    return fit(adapter, discover(data), PLAN, config, out, meta={"model": "small"}, **options)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


@needs_compiler
def test_the_network_stages_train_compiled_to_the_eager_model_and_repeat_exactly(tiny_split_data: Path, tmp_path: Path) -> None:
    eager_config = TrainConfig(**{**CONFIG.__dict__, "compile": False})
    _train(tiny_split_data, tmp_path / "eager", eager_config)
    counters.clear()
    # Compiled code draws dropout masks from a random stream of its own; with eager's, the two runs compare.
    with torch._inductor.config.patch(fallback_random=True):
        _train(tiny_split_data, tmp_path / "compiled")
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the forward
        _train(tiny_split_data, tmp_path / "again")
    eager, compiled, again = (_weights(tmp_path / name) for name in ("eager", "compiled", "again"))
    assert eager.keys() == compiled.keys()  # plain parameter names: no torch.compile wrapper in what is saved
    assert all(torch.equal(compiled[k], again[k]) for k in compiled)  # a fixed seed repeats exactly
    # The same computation in another order of floating-point operations: close, and not the same bits.
    assert all(torch.allclose(eager[k].float(), compiled[k].float(), rtol=1e-3, atol=1e-4) for k in eager)


def test_no_compiler_is_refused_in_one_line_before_anything_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    with torch._inductor.config.patch(NO_COMPILER), pytest.raises(ThawError, match=r"^torch\.compile needs a C\+\+ compiler") as raised:
        _train(tiny_split_data, tmp_path / "run")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before the head stage, not after it


@needs_compiler
def test_a_compile_failing_mid_run_is_one_line_and_the_run_resumes_without_compile(tiny_split_data: Path, tmp_path: Path) -> None:
    with ExitStack() as broken:

        def break_the_compiler(state) -> None:  # after the head stage, before the full stage compiles
            if len(state.history) == 1:
                broken.enter_context(torch._inductor.config.patch(NO_COMPILER))

        with pytest.raises(ThawError, match=r"^torch\.compile failed \(InvalidCxxCompiler: .+\); train without --compile") as raised:
            _train(tiny_split_data, tmp_path / "run", callbacks=[break_the_compiler])
    assert "\n" not in str(raised.value)
    assert [row["stage"] for row in load_checkpoint(tmp_path / "run" / "checkpoint.pt")["history"]] == ["head"]  # kept
    result = _train(tiny_split_data, tmp_path / "run", TrainConfig(**{**CONFIG.__dict__, "compile": False}), resume=True)
    assert [row["stage"] for row in result.history] == ["head", "all", "all"]


@needs_compiler
def test_a_compiled_run_resumed_after_a_crash_ends_with_the_uninterrupted_weights(tiny_split_data: Path, tmp_path: Path) -> None:
    _train(tiny_split_data, tmp_path / "whole")
    with pytest.raises(Crash):
        _train(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(2)])  # after the first full epoch
    counters.clear()
    _train(tiny_split_data, tmp_path / "cut", resume=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the resumed full epoch ran compiled too
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_the_flag_is_off_by_default_and_refused_beside_a_budget() -> None:
    assert TrainConfig().compile is False
    assert cli_config("data", "--model", "mobilenet_v2").compile is False
    assert cli_config("data", "--model", "mobilenet_v2", "--compile").compile is True
    with pytest.raises(ThawError, match=r"compile \(--compile\) cannot run with a budget: the budget is planned from eager training steps"):
        cli_config("data", "--model", "mobilenet_v2", "--compile", "--budget", "3m")
    with pytest.raises(ThawError, match="compile must be true or false, got 'yes'"):
        TrainConfig(compile="yes")


@needs_compiler  # --compile is refused up front without one, whatever the plan
def test_a_plan_on_cached_features_only_compiles_nothing(tiny_split_data: Path, tmp_path: Path) -> None:
    counters.clear()
    head_only = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)),))
    torch.manual_seed(0)
    fit(adapt(SmallConvNet(), num_classes=3), discover(tiny_split_data), head_only, CONFIG, tmp_path / "run", meta={"model": "small"})
    assert counters["stats"]["unique_graphs"] == 0


def test_a_text_run_refuses_it_in_one_line(tmp_path: Path, tiny_encoder: Path) -> None:
    table = write_text_table(tmp_path / "t.tsv", rows_per_class=10)
    with pytest.raises(ThawError, match=r"^--compile is for image models"):
        train_text(table, model=str(tiny_encoder), config=TrainConfig(compile=True, quiet=True), out=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_resume_passes_the_typed_compile_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from thaw.cli import build_parser, train_cmd

    given: dict = {}
    monkeypatch.setattr(train_cmd, "resume_run", lambda run, **options: given.update(options))
    for typed, expected in ((["--compile"], True), ([], False)):
        argv = ["train", "--resume", str(tmp_path), *typed]
        args = build_parser().parse_args(argv)
        args.argv = argv
        train_cmd._resume(args, tmp_path, {"config": {}}, [], [])
        assert given["compile"] is expected
