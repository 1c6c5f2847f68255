"""A plan is resolved against the model, every stage of it, before a run reads data, sets an old run aside or trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SmallConvNet
from thaw import ThawError
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images, train_text
from thaw.train.config import check_plan, plan_probe

CONFIG = TrainConfig(quiet=True, image_size=32, batch_size=8)
LATER_TYPO = Plan((Stage("head", 1, ("head",)), Stage("all", 1, ("al",), ConstantLr(5e-4))))
TYPO_LINE = r"^stage 2/2 'all': selector 'al' matches no parameters"


def test_a_typo_in_a_later_stage_stops_an_image_run_before_its_data_is_read(tmp_path: Path) -> None:
    # The data path does not exist: the plan's error comes first, so the images were not listed or read.
    with pytest.raises(ThawError, match=TYPO_LINE):
        train_images(tmp_path / "no-data", model="mobilenet_v3_small", weights=None, plan=LATER_TYPO, config=CONFIG, out=tmp_path / "run")
    with pytest.raises(ThawError, match=r"^stage 1/3 'head': 'layer9' is neither a layer group"):  # a strategy's options too
        train_images(tmp_path / "no-data", model="mobilenet_v3_small", weights=None, plan="head-top-all",
                     plan_options={"lrs": {"layer9": 1e-4}}, config=CONFIG, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_later_stage_stops_a_model_object_run_before_it_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    """A model object's groups are known once it is adapted to the data's classes: resolved then, still before the
    first stage trains or writes a checkpoint."""
    with pytest.raises(ThawError, match=TYPO_LINE):
        train_images(tiny_split_data, model=SmallConvNet(), plan=LATER_TYPO, config=CONFIG, out=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_typo_in_a_later_stage_stops_a_text_run_before_its_table_is_read(tiny_encoder: Path, tmp_path: Path) -> None:
    with pytest.raises(ThawError, match=TYPO_LINE):
        train_text(tmp_path / "missing.csv", model=str(tiny_encoder), plan=LATER_TYPO, config=TrainConfig(quiet=True), out=tmp_path / "run")


def test_lora_stages_are_resolved_with_their_adapters_added_as_the_run_adds_them() -> None:
    """`adapters` matches only once LoRA layers exist: the check adds them first, to a meta-device stand-in."""
    from thaw.models.lora import LoraSpec

    probe = plan_probe("mobilenet_v3_small", None, "image")
    stages = (Stage("head", 1, ("head",)), Stage("lora", 1, ("head", "adapters")))
    plan = check_plan(probe, Plan(stages, LoraSpec()))
    assert [stage.name for stage in plan.stages] == ["head", "lora"]
    typo = (Stage("head", 1, ("head",)), Stage("lora", 1, ("head", "adapter")))
    with pytest.raises(ThawError, match=r"^stage 2/2 'lora': selector 'adapter' matches no parameters"):
        check_plan(plan_probe("mobilenet_v3_small", None, "image"), Plan(typo, LoraSpec()))


def test_one_image_batches_for_a_later_stage_that_needs_batch_statistics_are_refused_before_an_old_run_is_touched(
    tiny_split_data: Path, tmp_path: Path,
) -> None:
    """Found when the second stage began, it stopped a run whose head had trained: with overwrite, after the old run
    was set aside for good, and no resume could get past it."""
    run = tmp_path / "run"
    old = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan="feature-extract", config=CONFIG, out=run)
    old_weights = (run / "model.safetensors").read_bytes()
    plan = Plan((Stage("head", 1, ("head",)), Stage("top", 1, ("-3:",), ConstantLr(1e-4))))  # frozen policy: its BN trains
    one_image = TrainConfig(quiet=True, image_size=32, batch_size=1)
    with pytest.raises(ThawError, match=r"^stage 2/2 'top': BatchNorm layers use batch statistics .* batch_size 2 or more"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=one_image, out=run, overwrite=True)
    assert (run / "model.safetensors").read_bytes() == old_weights and (run / "thaw.json").is_file() and old.history
    eval_top = Plan((Stage("head", 1, ("head",)), Stage("top", 1, ("-3:",), ConstantLr(1e-4), batchnorm="eval")))
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=eval_top, config=one_image,
                          out=tmp_path / "fixed")
    assert [row["stage"] for row in result.history] == ["head", "top"]  # statistics fixed: one image a batch trains
    adapt = Plan((Stage("head", 1, ("head",), batchnorm="adapt"),))  # its estimate skips one-image batches: nothing
    with pytest.raises(ThawError, match=r"^stage 1/1 'head': batchnorm 'adapt' estimates the statistics over batches of 2"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=adapt, config=one_image, out=tmp_path / "adapt")


def _refused_new_but_resumed_when_older(plan: Plan, refusal: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plan is refused for a new run; a run a thaw before that check started (accepted then) resumes to its end."""
    from tests.conftest import Crash, crash_after
    from thaw.train import config as train_config

    with pytest.raises(ThawError, match=refusal):
        train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=CONFIG, out=tmp_path / "new")
    with monkeypatch.context() as before_the_check:
        before_the_check.setattr(train_config, "check_new_plan", lambda *args: None)
        with pytest.raises(Crash):
            train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=CONFIG, out=tmp_path / "old", callbacks=[crash_after(1)])
    resumed = train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=CONFIG, out=tmp_path / "old", resume=True)
    assert len(resumed.history) == 2
    return tmp_path / "old"


def test_a_run_saved_with_an_lr_no_stage_uses_still_resumes(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.plan import ExplicitLr

    unused_lr = Plan((Stage("head", 2, ("head",), ExplicitLr({"features.0": 1e-4, "head": 1e-3})),))
    _refused_new_but_resumed_when_older(unused_lr, "an lr is given for features.0, which no stage of the plan trains", tiny_split_data, tmp_path, monkeypatch)


def test_a_run_saved_with_adapters_no_stage_trains_still_resumes_and_reports(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thaw.cli import main
    from thaw.models.lora import LoraSpec

    untrained = Plan((Stage("head", 2, ("head",)), Stage("adapters", 0, ("adapters",))), LoraSpec(rank=4))  # 0 epochs: none
    run = _refused_new_but_resumed_when_older(untrained, "^the plan's lora: adds adapters that no stage trains", tiny_split_data, tmp_path, monkeypatch)
    assert main(["report", str(run), "--top-losses", "1"]) == 0
