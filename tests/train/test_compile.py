"""--compile: stages that run the network train through torch.compile, to the same model as eager training
(up to rounding), repeat exactly under a seed, save plain weights, and a failed compile is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from tests.conftest import Crash, SmallConvNet, cli_config, crash_after
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import fit

# Inductor compiles C++ on the CPU; a machine without a compiler cannot run --compile at all.
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler (g++)")

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


def test_a_failed_compile_is_one_line_and_the_run_resumes_without_compile(tiny_split_data: Path, tmp_path: Path) -> None:
    no_compiler = {"cpp.cxx": (None, str(tmp_path / "no-such-compiler")), "force_disable_caches": True}
    with torch._inductor.config.patch(no_compiler), pytest.raises(ThawError, match=r"^torch\.compile failed \(.+\); train without") as raised:
        _train(tiny_split_data, tmp_path / "run")
    assert "\n" not in str(raised.value) and "compiler" in str(raised.value)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["history"][0]["stage"] == "head"  # the head stage is kept
    torch._dynamo.reset()
    result = _train(tiny_split_data, tmp_path / "run", TrainConfig(**{**CONFIG.__dict__, "compile": False}), resume=True)
    assert [row["stage"] for row in result.history] == ["head", "all", "all"]


def test_a_compiled_run_resumed_after_a_crash_ends_with_the_uninterrupted_weights(tiny_split_data: Path, tmp_path: Path) -> None:
    _train(tiny_split_data, tmp_path / "whole")
    with pytest.raises(Crash):
        _train(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(2)])  # after the first full epoch
    _train(tiny_split_data, tmp_path / "cut", resume=True)
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_the_flag_is_off_by_default_and_refused_beside_a_budget() -> None:
    assert TrainConfig().compile is False
    assert cli_config("data", "--model", "mobilenet_v2").compile is False
    assert cli_config("data", "--model", "mobilenet_v2", "--compile").compile is True
    with pytest.raises(ThawError, match="--budget plans from eager training steps and does not count compile time"):
        cli_config("data", "--model", "mobilenet_v2", "--compile", "--budget", "3m")
    with pytest.raises(ThawError, match="compile must be true or false, got 'yes'"):
        TrainConfig(compile="yes")
