"""Frozen means frozen, proved step by step over random models and random multi-stage plans,
through stage changes and a resume."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SmallConvNet, write_class_images
from thaw import adapt, build_model
from thaw.data.folders import discover
from thaw.plan import ConstantLr, DecayLr, Plan, RangeLr, Stage, audit_optimizer, resolve_stage
from thaw.plan.freeze import batchnorm_layers, is_eval_locked
from thaw.train import TrainConfig
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import fit

# Module-level (hypothesis runs many examples per test, and function-scoped fixtures would be shared
# between them anyway); removed when the test process ends, so no run leaves it behind.
DATA_ROOT = Path(tempfile.mkdtemp(prefix="thaw-props-"))
atexit.register(shutil.rmtree, DATA_ROOT, ignore_errors=True)
write_class_images(DATA_ROOT / "train", per_class=8, size=16, seed=0)
write_class_images(DATA_ROOT / "val", per_class=3, size=16, seed=1)
# 128 px keeps every feature map at least as large as its kernel (MobileNetV3's 5x5 depthwise
# convolutions), so no weight sits where it never touches the input.
IMAGE_SIZE = 128
DATA = discover(DATA_ROOT)
MODELS = {
    "generic": lambda: adapt(SmallConvNet(), num_classes=3),
    "mobilenet_v3_small": lambda: build_model("mobilenet_v3_small", num_classes=3),
}
RULES = st.sampled_from([ConstantLr(2e-3), RangeLr(1e-4, 3e-3), DecayLr(3e-3, 0.6)])


class Crash(Exception):
    pass


class StepChecker:
    """After every optimizer step: the audit, the plan's lrs, and frozen weights and fixed BatchNorm
    statistics unmoved since the step before. At a stage's first step "before" is the end of the
    previous stage (or the checkpoint a resume starts from), so a stage change that moves a tensor
    the new stage freezes is caught there."""

    def __init__(self, adapter, plan: Plan, before: dict[str, torch.Tensor] | None = None) -> None:
        self.adapter, self.plan, self.stage, self.steps = adapter, plan, 0, 0
        self.expected = [resolve_stage(adapter, s).group_lrs for s in plan.stages]
        self.before = before if before is not None else self._everything()

    def _everything(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.adapter.model.state_dict().items()}

    def _fixed_now(self) -> list[str]:
        """Names of the tensors that must not move in this stage: frozen parameters, eval-locked statistics."""
        model = self.adapter.model
        names = [n for n, p in model.named_parameters() if not p.requires_grad]
        for name, layer in batchnorm_layers(model):
            if is_eval_locked(layer):
                names += [f"{name}.{b}" for b, _ in layer.named_buffers()]
        return names

    def next_epoch(self, state) -> None:
        self.stage = len(state.history)  # one epoch per stage
        self.before = self._everything()

    def __call__(self, optimizer, step: int, factor: float) -> None:
        self.steps += 1
        audit_optimizer(self.adapter.model, optimizer)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(self.expected[self.stage][group["thaw_group"]] * factor, rel=1e-9)
        now = self._everything()
        moved = [name for name in self._fixed_now() if not torch.equal(now[name], self.before[name])]
        assert not moved, f"tensors fixed in stage {self.stage} moved at its step {step}: {moved[:3]}; plan {self.plan}"
        self.before = now
        assert not any(not p.requires_grad and p in optimizer.state for p in self.adapter.model.parameters())


def _stages(draw, group_count: int) -> list[Stage]:
    stages = []
    for index in range(draw(st.integers(min_value=2, max_value=3))):
        picks = draw(st.lists(st.integers(0, group_count - 1), min_size=1, max_size=3, unique=True))
        policy = draw(st.sampled_from(["frozen", "train", "eval"]))
        stages.append(Stage(f"s{index}", 1, tuple(f"{i}" for i in sorted(picks)), draw(RULES), 0.05, policy))
    return stages


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model_name=st.sampled_from(sorted(MODELS)), data=st.data(), crash_after=st.sampled_from([None, 1]))
def test_every_step_of_every_stage_keeps_the_plan(tmp_path: Path, model_name: str, data, crash_after: int | None) -> None:
    torch.manual_seed(0)
    adapter = MODELS[model_name]()
    plan = Plan(tuple(_stages(data.draw, len(adapter.groups))))
    config = TrainConfig(image_size=IMAGE_SIZE, batch_size=4, quiet=True, augment=False)
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    checker = StepChecker(adapter, plan)
    callbacks = [checker.next_epoch]
    if crash_after is not None:
        def crash(state) -> None:
            if len(state.history) == crash_after:
                raise Crash

        with pytest.raises(Crash):
            fit(adapter, DATA, plan, config, out, meta={"model": model_name}, callbacks=[*callbacks, crash], step_hooks=[checker])
        torch.manual_seed(0)
        adapter = MODELS[model_name]()
        checker = StepChecker(adapter, plan, before=load_checkpoint(out / "checkpoint.pt")["model"])  # where the resume starts
        checker.stage = crash_after
        callbacks = [checker.next_epoch]
    result = fit(adapter, DATA, plan, config, out, meta={"model": model_name}, resume=crash_after is not None, callbacks=callbacks, step_hooks=[checker])
    assert len(result.history) == len(plan.stages) and checker.steps > 0
