"""--budget: epochs per stage chosen from throughput measured here, and a run that ends within the time."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import Crash, cli_config, crash_after
from thaw import ThawError, build_model
from thaw.cli import main
from thaw.data.loaders import Batch
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.budget import HEAD_BACKWARD_FACTOR, MARGIN, MAX_EPOCHS, Costs, TopStage, measure_costs, parse_budget, resplit, split_budget
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import RunInterrupted
from thaw.train.loop import Engine
from thaw.train.progress import CACHED, FULL, PREFIX

TWO_PHASE = Plan((Stage("head", 3, ("head",), ConstantLr(1e-3)), Stage("full", 3, ("all",), ConstantLr(1e-4), batchnorm="eval")))
COSTS = Costs(forward=0.01, train_step=0.03, head_step=0.0001)
SIZES = {"train": 100, "val": 50}


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1.5h", 5400), ("120", 120), (" 2m ", 120), ("1h30m", 5400), ("2m 30s", 150), ("1h0.5m", 3630), ("90m", 5400), ("1h59.5m", 7170), ("6e2", 600), ("1.5E+3", 1500), ("+600", 600), (".5e3", 500)]
)
def test_a_budget_reads_seconds_minutes_and_hours(text: str, seconds: float) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["3x", "0m", "-1s", "-600", "", "m", "1e3s", "nan", "30m1h", "3m3m", "1 30", "1h30", "0h0m", "\u0666\u0660\u0660", "6_00"])
def test_a_budget_that_is_not_a_time_is_one_line(text: str) -> None:
    with pytest.raises(ThawError, match=r"^budget must be a time above 0, like 90s, 3m, 1.5h or 1h30m \(a bare number is seconds\), got "):
        parse_budget(text)


@pytest.mark.parametrize("text, overflowing", [("1h90m", "90m"), ("2m60s", "60s"), ("1h 0m 75s", "75s")])
def test_minutes_or_seconds_of_60_or_more_after_a_larger_unit_are_refused(text: str, overflowing: str) -> None:
    with pytest.raises(ThawError, match=rf"^budget '{text}': {overflowing} after a larger unit must be below 60"):
        parse_budget(text)


def test_the_cached_head_keeps_its_epochs_and_the_full_stage_gets_the_time_left() -> None:
    budget, spent = 60.0, 2.0
    plan, split = split_budget(TWO_PHASE, [CACHED, FULL], COSTS, SIZES, budget, spent, views=0)
    head, full = plan.stages
    assert head.epochs == 3 and split.epochs == (3, full.epochs)
    assert sum(split.expected_s.values()) <= budget * (1 - MARGIN)  # what it plans fits
    one_more = split.expected_s["full"] / full.epochs  # and one more full epoch would not
    assert sum(split.expected_s.values()) + one_more > budget * (1 - MARGIN)
    assert split.expected_s["feature cache"] == pytest.approx((100 + 50) * COSTS.forward)


def test_several_full_stages_keep_their_ratio_and_no_stage_passes_the_cap() -> None:
    gradual = Plan(tuple(Stage(name, epochs, ("all",), ConstantLr(1e-4)) for name, epochs in (("top", 1), ("all", 2))))
    plan, _ = split_budget(gradual, [FULL, FULL], COSTS, SIZES, 100.0, 0.0, views=0)
    top, every = (stage.epochs for stage in plan.stages)
    assert top >= 2 and every in (2 * top, 2 * top + 1)
    plan, _ = split_budget(gradual, [FULL, FULL], COSTS, SIZES, 10 * 3600.0, 0.0, views=0)
    assert [stage.epochs for stage in plan.stages] == [MAX_EPOCHS, MAX_EPOCHS]


HEAD_TOP_ALL = Plan((
    Stage("head", 3, ("head",), ConstantLr(1e-3)),
    Stage("top2", 3, ("-2:",), ConstantLr(1e-4), batchnorm="eval"),
    Stage("all", 3, ("all",), ConstantLr(1e-4), batchnorm="eval"),
))


def test_a_top_stage_over_cached_inputs_is_planned_at_its_own_cost() -> None:
    costs = Costs(forward=0.01, train_step=0.03, head_step=0.0001, top_step=0.003)
    budget, spent = 60.0, 2.0
    plan, split = split_budget(HEAD_TOP_ALL, [CACHED, PREFIX, FULL], costs, SIZES, budget, spent, views=0, shared=frozenset({0}))
    top_forward = costs.top_step / HEAD_BACKWARD_FACTOR
    assert split.epoch_s[1] == pytest.approx(100 * costs.top_step + 50 * top_forward)
    assert split.epoch_s[2] == pytest.approx(100 * costs.train_step + 50 * costs.forward) == split.full_epoch_s
    # The head takes its features at the top's entry, so the frozen top runs forward in each of its epochs,
    # and one pass of the bottom serves both stages.
    assert split.epoch_s[0] == pytest.approx(150 * (costs.head_step + top_forward))
    assert split.passes == 1 and split.cache_s == pytest.approx(150 * costs.forward)
    head, top, every = (stage.epochs for stage in plan.stages)
    assert head == 3 and every > 3 and top in (every, every + 1)  # the head keeps its epochs; 3:3 holds, then the remainder
    assert sum(split.expected_s.values()) <= budget * (1 - MARGIN)
    assert sum(split.expected_s.values()) + split.epoch_s[2] > budget * (1 - MARGIN)  # no epoch of everything left unspent
    # Timed as if it ran the network, the same top stage would get fewer epochs: the cached bottom is what buys them.
    as_full, _ = split_budget(HEAD_TOP_ALL, [CACHED, FULL, FULL], costs, SIZES, budget, spent, views=0)
    assert as_full.stages[1].epochs < top


def test_a_head_stage_that_does_not_share_the_tops_entry_costs_a_pass_of_its_own() -> None:
    costs = Costs(forward=0.01, train_step=0.03, head_step=0.0001, top_step=0.003)
    _, alone = split_budget(HEAD_TOP_ALL, [CACHED, PREFIX, FULL], costs, SIZES, 60.0, 2.0, views=0)
    assert alone.passes == 2 and alone.cache_s == pytest.approx(2 * 150 * costs.forward)
    assert alone.epoch_s[0] == pytest.approx(150 * costs.head_step)  # the head alone, on its own features


def test_the_remainder_buys_a_cheap_top_stage_where_no_epoch_of_everything_fits() -> None:
    costs = Costs(forward=0.01, train_step=0.03, head_step=0.0001, top_step=0.003)
    plan, _ = split_budget(HEAD_TOP_ALL, [CACHED, PREFIX, FULL], costs, SIZES, 8.0, 2.0, views=0, shared=frozenset({0}))
    head, top, every = (stage.epochs for stage in plan.stages)
    assert (head, every) == (3, 0) and top >= 1  # 3:3 of both does not fit; the top alone does


def test_each_later_stage_refits_the_epochs_from_there_on_to_the_time_actually_left() -> None:
    costs = Costs(forward=0.01, train_step=0.03, head_step=0.0001, top_step=0.003)
    _, split = split_budget(HEAD_TOP_ALL, [CACHED, PREFIX, FULL], costs, SIZES, 60.0, 2.0, views=0, shared=frozenset({0}))
    planned = (3, 3, 3)
    expected = split.expected_s  # the time left at the top stage's start, where everything before took what was expected
    at_top = 60.0 * (1 - MARGIN) - expected["setup"] - expected["feature cache"] - expected["head"]
    assert resplit(split, planned, 1, at_top, cache_ready=True) == split.epochs
    # The stages before took less than expected: the time saved goes to this stage and the ones after it.
    more = resplit(split, planned, 1, at_top + 2 * split.epoch_s[2], cache_ready=True)
    assert more[0] == split.epochs[0] and more[2] >= split.epochs[2] + 1
    # They took more: fewer epochs, so the run is not cut off inside a stage.
    fewer = resplit(split, planned, 2, at_top - expected["top2"] - 2 * split.epoch_s[2], cache_ready=False)
    assert fewer[:2] == split.epochs[:2] and fewer[2] == split.epochs[2] - 2
    # A stage that must still build its cached inputs pays a pass first.
    assert resplit(split, planned, 1, at_top, cache_ready=False) == resplit(split, planned, 1, at_top - split.cache_s, cache_ready=True)
    assert resplit(split, planned, 1, 8.0, cache_ready=False) != resplit(split, planned, 1, 8.0, cache_ready=True)


def test_a_stage_left_no_epoch_is_charged_no_feature_cache_pass() -> None:
    costs = Costs(forward=0.01, train_step=0.03, head_step=0.0001, top_step=0.003)
    top_only = Plan((HEAD_TOP_ALL.stages[0], HEAD_TOP_ALL.stages[1]))
    # 3 s: the head's pass (1.5 s) and its epochs fit, a pass of the top's own (it shares nothing here) would not.
    plan, split = split_budget(top_only, [CACHED, PREFIX], costs, SIZES, 4.0, 0.5, views=0)
    assert [stage.epochs for stage in plan.stages] == [3, 0] and split.passes == 1


def test_a_budget_that_fits_no_epoch_is_refused_and_a_small_one_keeps_the_head() -> None:
    full_only = Plan((Stage("full", 3, ("all",), ConstantLr(1e-4)),))
    with pytest.raises(ThawError, match="a budget of 0:03 does not fit one epoch here .*give a larger --budget"):
        split_budget(full_only, [FULL], COSTS, SIZES, 3.0, 1.0, views=0)
    plan, _ = split_budget(TWO_PHASE, [CACHED, FULL], COSTS, SIZES, 3.0, 1.0, views=0)
    assert [stage.epochs for stage in plan.stages] == [3, 0]  # the cheap head phase alone fits


def test_measuring_leaves_the_weights_statistics_gradients_and_random_state_as_they_were() -> None:
    torch.manual_seed(0)
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)  # BatchNorm and dropout: both would show
    before = {name: tensor.clone() for name, tensor in adapter.model.state_dict().items()}
    batches = [Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), []) for _ in range(3)]
    rng = torch.get_rng_state()
    costs = measure_costs(adapter, batches, batches, Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True))
    assert costs.forward > 0 and costs.train_step > 0 and costs.head_step > 0  # measured; no order asserted: timing on a shared CPU is noise
    after = adapter.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(param.grad is None for param in adapter.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_top_step_runs_only_the_layers_from_the_entry_on_and_leaves_the_run_as_it_was() -> None:
    from thaw import apply_trainable
    from thaw.plan.stages import resolve_stage
    from thaw.train.prefix_cache import find_entry

    torch.manual_seed(0)
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)
    engine = Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True)
    batches = [Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), []) for _ in range(3)]
    top = HEAD_TOP_ALL.stages[1]
    trainable = resolve_stage(adapter, top).trainable
    entered = copy.deepcopy(adapter)  # the entry is found with the stage's locks, as the run finds it
    apply_trainable(entered, list(trainable), top.batchnorm)
    entry = find_entry(entered, trainable, batches[0].images, engine)
    calls = {"first layer": 0, "boundary": 0}
    first = adapter.model.get_submodule("features.0")
    first.register_forward_hook(lambda *_: calls.__setitem__("first layer", calls["first layer"] + 1))  # copies keep hooks
    boundary = adapter.model.get_submodule(entry.boundary)
    boundary.register_forward_hook(lambda *_: calls.__setitem__("boundary", calls["boundary"] + 1))
    before = {name: tensor.clone() for name, tensor in adapter.model.state_dict().items()}
    rng = torch.get_rng_state()
    without = measure_costs(adapter, batches, batches, engine, frozenset())  # no stage on the images: no train step
    seen = dict(calls)
    costs = measure_costs(adapter, batches, batches, engine, frozenset(), top=TopStage(frozenset(trainable), top.batchnorm, entry))
    assert without.top_step == 0 and costs.top_step > 0
    # The second measurement adds one pass of the bottom (the cached input) and then steps of the top alone.
    assert calls["first layer"] - seen["first layer"] == seen["first layer"] + 1
    assert calls["boundary"] - seen["boundary"] > seen["boundary"] + 1
    assert all(torch.equal(before[name], tensor) for name, tensor in adapter.model.state_dict().items())
    assert all(param.grad is None for param in adapter.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("head_epochs, views, passes", [(3, 0, 1), (2, 3, 2)])
def test_a_budgeted_head_top_all_run_trains_its_top_over_cached_inputs_with_the_passes_it_planned(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head_epochs: int, views: int, passes: int,
) -> None:
    """The head stage takes its features at the top's entry, one pass for both; with 3 cached views a 2-epoch head
    stage uses 2 of them and the top stage 3, so each makes a pass of its own, and the budget plans for both."""
    import importlib

    fit_module, built = importlib.import_module("thaw.train.fit"), []
    real = fit_module.build_cache
    monkeypatch.setattr(fit_module, "build_cache", lambda *args, **kwargs: built.append(True) or real(*args, **kwargs))
    plan = replace(HEAD_TOP_ALL, stages=(replace(HEAD_TOP_ALL.stages[0], epochs=head_epochs), *HEAD_TOP_ALL.stages[1:]))
    config = TrainConfig(image_size=64, batch_size=8, quiet=True, budget=60.0, augment=True, cache_views=views)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=tmp_path / "run")
    assert {row["cached"] for row in result.history if row["stage"] == "top2"} == {True}
    assert result.budget["passes"] == len(built) == passes
    head_s, top_s, all_s = result.budget["epoch_s"]
    assert top_s < all_s  # planned at the cost of a step from the entry on, not of the network


@pytest.mark.parametrize("policy, batch_statistics", [("frozen", True), ("eval", False)])
def test_the_training_step_is_timed_with_the_stages_batchnorm_policy(policy: str, batch_statistics: bool) -> None:
    # thaw's full stages run BatchNorm eval-locked by default, which costs less than batch statistics: time what runs.
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)
    modes: list[bool] = []
    for layer in adapter.model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.register_forward_hook(lambda module, _inputs, _output: modes.append(module.training))  # the copy keeps it
    batches = [Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), []) for _ in range(3)]
    measure_costs(adapter, batches, batches, Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True), batchnorm=policy)
    assert modes and any(modes) == batch_statistics


def _budgeted(data: Path, out: Path, budget: float, plan: Plan = TWO_PHASE, **options: object):
    config = TrainConfig(image_size=64, batch_size=8, quiet=True, budget=budget)
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=out, **options)


def _epoch_ends() -> tuple[list[float], object]:
    """A callback that notes when each epoch ended, its checkpoint written (the budget times epochs so)."""
    ends: list[float] = []
    return ends, lambda state: ends.append(time.perf_counter())


def _longest_epoch(result, ends: list[float]) -> float:
    """The longest epoch, its checkpoint write included, as the budget times epochs: a row's seconds leave the write
    out, and a CI run passed a bound taken from the rows alone by 0.69 s."""
    return max([later - earlier for earlier, later in zip(ends, ends[1:])] + [row["seconds"] for row in result.history])


def test_a_budgeted_run_ends_within_its_budget_and_records_the_split(tiny_split_data: Path, tmp_path: Path) -> None:
    plan = Plan((Stage("head", 2, ("head",), ConstantLr(1e-3)), Stage("full", 200, ("all",), ConstantLr(1e-4), batchnorm="eval")))
    ends, note_end = _epoch_ends()
    result = _budgeted(tiny_split_data, tmp_path / "run", 8.0, plan, callbacks=[note_end])
    # The guarantee: no epoch starts that its predecessor says would end past the budget; one slower than its
    # predecessor (a busy machine) can pass it by the difference, at most one epoch.
    # The first epoch (with its feature cache) always runs: on a busy machine it alone can pass the budget.
    assert len(result.history) == 1 or result.wall_s <= 8.0 + _longest_epoch(result, ends)
    meta = json.loads((tmp_path / "run" / "thaw.json").read_text())
    chosen = [stage["epochs"] for stage in meta["plan"]["stages"]]
    assert chosen == meta["budget"]["epochs"] and chosen[0] == 2 and chosen[1] <= MAX_EPOCHS  # 0 on a busy machine
    assert len(result.history) <= sum(chosen)


def test_when_epochs_run_slower_than_measured_the_run_ends_before_the_budget(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The measurement said epochs were nearly free, so the plan asks for the cap: the run must stop by itself."""
    import importlib

    monkeypatch.setattr(importlib.import_module("thaw.train.fit"), "measure_costs", lambda *args: Costs(1e-7, 1e-7, 1e-7))
    ends, note_end = _epoch_ends()
    result = _budgeted(tiny_split_data, tmp_path / "run", 4.0, callbacks=[note_end])
    assert result.budget["epochs"] == [3, MAX_EPOCHS]
    assert result.budget["ended_early"].startswith("before full epoch")
    assert len(result.history) == 1 or result.wall_s <= 4.0 + _longest_epoch(result, ends)
    assert len(result.history) < 3 + MAX_EPOCHS


def test_a_stage_whose_estimates_before_it_ran_high_gets_the_time_they_saved(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The measurement puts the feature cache pass at most of the budget; it takes a fraction of a second, so at
    the full stage's start the epochs are fitted again to the time actually left."""
    import importlib

    fit_module, planned = importlib.import_module("thaw.train.fit"), []
    real = fit_module.measure_costs
    # Costs pinned so the saving dwarfs what load adds to the rest: the pass (54 images) expected at 54 s, taking a
    # second or two, and a full epoch at about 19 s (18 val images, 36 train at 0.02 s). Measured on a loaded CI
    # machine, the train step fitted one full epoch, and what a smaller saving left bought no second one.
    monkeypatch.setattr(fit_module, "measure_costs", lambda *args: replace(real(*args), forward=1.0, train_step=0.02))
    real_split = fit_module.split_budget
    monkeypatch.setattr(fit_module, "split_budget", lambda *args: planned.append(real_split(*args)[1]) or real_split(*args))
    result = _budgeted(tiny_split_data, tmp_path / "run", 120.0)
    first = planned[0].epochs
    assert planned[0].cache_s > 50  # what the split expected of the pass
    assert result.budget["epochs"][0] == first[0] == 3 and result.budget["epochs"][1] > first[1]
    assert sum(1 for row in result.history if row["stage"] == "full") == result.budget["epochs"][1] or result.budget["ended_early"]


def test_a_budget_plans_a_run_of_one_image_batches_where_statistics_are_fixed(tiny_split_data: Path, tmp_path: Path) -> None:
    # The train step was timed on batches of two images or more only: batch size 1 gave "no batch to time".
    config = TrainConfig(image_size=32, batch_size=1, quiet=True, budget=60.0)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=TWO_PHASE, config=config,
                          out=tmp_path / "run")
    assert result.budget["epochs"][1] >= 1 and any(row["stage"] == "full" for row in result.history)


def test_a_refit_that_leaves_no_epoch_ends_the_run_there_and_says_so(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    fit_module, entered = importlib.import_module("thaw.train.fit"), []
    monkeypatch.setattr(fit_module, "resplit", lambda split, planned, first, *_args, **_kw: split.epochs[:first] + (0,) * (len(planned) - first))
    real_enter = fit_module.enter_stage
    monkeypatch.setattr(fit_module, "enter_stage", lambda adapter, stage, *args: entered.append(stage.name) or real_enter(adapter, stage, *args))
    result = _budgeted(tiny_split_data, tmp_path / "run", 60.0, HEAD_TOP_ALL)
    assert [row["stage"] for row in result.history] == ["head"] * 3
    assert entered == ["head"]  # top2 and all set up nothing: no optimizer groups, no cached features
    assert result.budget["epochs"] == [3, 0, 0] and result.budget["ended_early"] == "before top2: no epoch of the stages left fits"


@pytest.mark.parametrize("stop", ["crash after 4 epochs", "Ctrl-C at the first step"])
def test_a_resumed_budgeted_run_keeps_the_epochs_its_budget_chose(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str,
) -> None:
    """Resumed by the same call plus resume=True (the plan as asked): no second measurement, the same epochs."""
    import importlib
    import os
    import signal

    fit_module, measured = importlib.import_module("thaw.train.fit"), []
    real = fit_module.measure_costs
    monkeypatch.setattr(fit_module, "measure_costs", lambda *args: measured.append(True) or real(*args))
    if stop.startswith("crash"):
        options, raised = {"callbacks": [crash_after(4)]}, Crash
    else:  # before any epoch ends: the checkpoint has no history yet
        options, raised = {"step_hooks": [lambda *_: os.kill(os.getpid(), signal.SIGINT)]}, RunInterrupted
    with pytest.raises(raised):
        _budgeted(tiny_split_data, tmp_path / "run", 30.0, **options)
    chosen = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["budget"]["epochs"]
    _budgeted(tiny_split_data, tmp_path / "run", 30.0, resume=True)
    meta = json.loads((tmp_path / "run" / "thaw.json").read_text())
    assert [stage["epochs"] for stage in meta["plan"]["stages"]] == chosen and measured == [True]


def test_budget_on_the_command_line(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse's usage error: one line, exit 2
        main(["train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--budget", "soon"])
    assert refused.value.code == 2
    assert "budget must be a time above 0, like 90s, 3m, 1.5h or 1h30m (a bare number is seconds), got 'soon'" in capsys.readouterr().err
    args = [str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--budget", "20s", "--json", "--out", str(tmp_path / "run")]
    assert main(["train", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The budget's guarantee (no epoch started that would end past it) is tested on the run's epochs above; the
    # summary's wall time also counts the final evaluation, which comes after the budget.
    assert summary["budget"]["seconds"] == 20 and len(summary["budget"]["epochs"]) == 3  # head, top2, all


def test_a_plan_file_budget_is_read_like_the_flag(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"

    def budget(value: str, *typed: str) -> float | None:
        plan.write_text(f"stages: [{{name: all, epochs: 1, train: [all], lr: 1.0e-4}}]\ntraining: {{budget: {value}}}\n")
        return cli_config("data", "--model", "mobilenet_v2", "--config", str(plan), *typed).budget

    assert budget("3m") == 180.0
    assert budget("1.5h") == 5400.0
    assert budget("90") == 90.0  # a bare number is seconds, as on the command line
    assert budget("6e2") == 600.0  # YAML 1.1 reads it as text; a number everywhere in the file, as the README says
    assert budget("3m", "--budget", "90s") == 90.0  # typed on the command line: the flag wins
    with pytest.raises(ThawError, match=r"plan\.yaml: training: budget must be a time above 0, like 90s, 3m, 1\.5h or 1h30m \(a bare number is seconds\), got 'soon'"):
        budget("soon")
    with pytest.raises(ThawError, match=re.escape("budget must be a time above 0, like 90s, 3m, 1.5h or 1h30m (a bare number is seconds), got 0")):
        budget("0")
    with pytest.raises(ThawError, match=re.escape("got '1:30'")):  # YAML 1.1 read it as the base-60 number 90: 90 seconds
        budget("1:30")


def test_every_bad_training_value_in_a_plan_file_is_reported_with_the_file(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-4}]\ntraining: {budget: soon, label_smoothing: 2, ema: maybe}\n")
    with pytest.raises(ThawError) as error:
        cli_config("data", "--model", "mobilenet_v2", "--config", str(plan))
    message = str(error.value)
    assert message.startswith(f"{plan}: training: 3 problems: budget must be a time above 0, like")
    assert "label smoothing must be a share in [0, 1), got 2" in message and "ema must be true or false, got 'maybe'" in message
    # The same options typed on the command line replace the file's, so its bad values no longer matter.
    typed = cli_config("data", "--model", "mobilenet_v2", "--config", str(plan), "--budget", "90s", "--label-smoothing", "0", "--no-ema")
    assert (typed.budget, typed.label_smoothing, typed.ema) == (90.0, 0.0, False)


def test_the_documented_budget_limits() -> None:
    # The README states these numbers; the tests above take them from the code, so pin them here once.
    assert (MAX_EPOCHS, MARGIN) == (20, 0.1)
