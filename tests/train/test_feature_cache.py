"""The frozen-feature cache: exact, keyed by what produced it, off where it would not be exact."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from thaw import adapt, apply_trainable, resolve
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.feature_cache import fingerprint, why_not_cached

HEAD_ONLY = Plan((Stage("head", 3, ("head",), ConstantLr(3e-3)),))
BASE = dict(image_size=32, batch_size=8, quiet=True, augment=False)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _train(data: Path, out: Path, plan: Plan = HEAD_ONLY, **config):
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=TrainConfig(**(BASE | config)), out=out)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cached_features_equals_running_the_network(tiny_split_data: Path, tmp_path: Path, precision: str) -> None:
    cached = _train(tiny_split_data, tmp_path / "cached", precision=precision)
    direct = _train(tiny_split_data, tmp_path / "direct", cache=False, precision=precision)
    assert all(row["cached"] for row in cached.history) and not any(row["cached"] for row in direct.history)
    a, b = _final_weights(tmp_path / "cached"), _final_weights(tmp_path / "direct")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in direct.history]


def _spill_files(out: Path) -> list[str]:
    return sorted(path.name for path in (out / "feature-cache").glob("*.npy"))


def test_features_spill_to_disk_past_the_memory_budget_and_the_files_go_with_the_stage(tiny_split_data: Path, tmp_path: Path) -> None:
    out, seen = tmp_path / "spilled", []
    spilled = train_images(
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=HEAD_ONLY, out=out,
        config=TrainConfig(**(BASE | {"cache_memory_gb": 1e-9})), callbacks=[lambda state: seen.append(_spill_files(out))],
    )
    assert all(len(files) == 2 for files in seen)  # train and val features on disk while the stage runs
    assert not (out / "feature-cache").exists()  # and gone once it ended
    in_memory = _train(tiny_split_data, tmp_path / "memory")
    assert [r["val_loss"] for r in spilled.history] == [r["val_loss"] for r in in_memory.history]


def test_one_memory_budget_for_the_whole_run(tiny_split_data: Path, tmp_path: Path) -> None:
    # fp32 features of mobilenet_v3_small's head input: 1,024 floats a row; 36 train rows fill the budget exactly.
    budget_gb = 36 * 1024 * 4 / 2**30
    out, seen = tmp_path / "run", []
    train_images(
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=HEAD_ONLY, out=out,
        config=TrainConfig(**(BASE | {"cache_memory_gb": budget_gb, "precision": "fp32"})),
        callbacks=[lambda state: seen.append(_spill_files(out))],
    )
    assert seen and all(len(files) == 1 and files[0].endswith("-val.npy") for files in seen), seen


def test_spill_files_a_killed_run_left_are_removed(tiny_split_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "feature-cache").mkdir(parents=True)
    (out / "feature-cache" / "0123456789-train0.npy").write_bytes(b"left by kill -9")
    _train(tiny_split_data, out)
    assert not (out / "feature-cache").exists()


@pytest.mark.parametrize(
    ("stages", "press_at", "said"),
    [
        # a new run's first pass: view 1 (5 batches of 8) done, view 2 under way
        ((("head", 2),), 7, "interrupted while caching features for stage 'head', before training began: nothing to resume"),
        # a pass after a checkpoint (one view and val for a 1-epoch stage, two views for the next): that checkpoint is the way on
        ((("head", 1), ("more", 2)), 5 + 3 + 2, "interrupted while caching features for stage 'more'; the checkpoint in"),
    ],
)
def test_ctrl_c_in_a_caching_pass_stops_there_and_leaves_no_features(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: tuple, press_at: int, said: str,
) -> None:
    """A pass over a large set takes minutes: a stop asked for in it is taken at the next batch, not after the pass."""
    from thaw.train import feature_cache
    from thaw.train.fit import RunInterrupted

    batches, real_tqdm = [], feature_cache.tqdm

    def pressing_tqdm(iterable, **options):
        for batch in real_tqdm(iterable, **options):
            batches.append(options["desc"])
            if len(batches) == press_at:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(feature_cache, "tqdm", pressing_tqdm)
    plan = Plan(tuple(Stage(name, epochs, ("head",), ConstantLr(3e-3)) for name, epochs in stages))
    out = tmp_path / "run"
    options = BASE | {"augment": True, "cache_views": 2, "cache_memory_gb": 1e-9}  # every view spills to a file
    with pytest.raises(RunInterrupted, match=f"^{said}"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=TrainConfig(**options), out=out)
    # The batch in whose hand-over the press came was the last one read: the pass stopped there, its files deleted.
    assert len(batches) == press_at and not (out / "feature-cache").exists()
    if len(stages) == 1:
        assert not out.exists() or not (out / "checkpoint.pt").exists()
    else:  # the resume caches the stage's views again and ends where an uninterrupted run does
        monkeypatch.setattr(feature_cache, "tqdm", real_tqdm)
        run = lambda folder, **resume: train_images(  # noqa: E731
            tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=TrainConfig(**options), out=folder, **resume)
        resumed, whole = run(out, resume=True), run(tmp_path / "whole")
        assert [row["stage"] for row in resumed.history] == ["head", "more", "more"]
        assert [row["val_loss"] for row in resumed.history] == [row["val_loss"] for row in whole.history]
        a, b = _final_weights(out), _final_weights(tmp_path / "whole")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_caching_pass_that_fails_part_way_leaves_no_feature_files(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a decoding worker ended by a scheduler's SIGTERM fails the pass: the views done and the one under way go."""
    from thaw.train import feature_cache

    real_tqdm, batches, on_disk = feature_cache.tqdm, [], []
    out = tmp_path / "run"

    def failing_tqdm(iterable, **options):
        for batch in real_tqdm(iterable, **options):
            batches.append(batch)
            if len(batches) == 7:
                on_disk.extend(_spill_files(out))
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.")
            yield batch

    monkeypatch.setattr(feature_cache, "tqdm", failing_tqdm)
    options = BASE | {"augment": True, "cache_views": 2, "cache_memory_gb": 1e-9}
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)),)),
                     config=TrainConfig(**options), out=out)
    assert len(on_disk) == 2  # view 1's file and the one under way were there when it failed
    assert len(batches) == 7 and _spill_files(out) == []


def test_cache_views_without_augmentation_cache_the_evaluation_view_once(tiny_split_data: Path, tmp_path: Path) -> None:
    views = _train(tiny_split_data, tmp_path / "views", cache_views=3, augment=False)
    plain = _train(tiny_split_data, tmp_path / "plain", augment=False)
    assert [r["train_loss"] for r in views.history] == [r["train_loss"] for r in plain.history]


def test_a_stage_that_unfreezes_runs_the_network_again(tiny_split_data: Path, tmp_path: Path) -> None:
    plan = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 1, ("all",), RangeLr(1e-5, 1e-3), batchnorm="eval")))
    result = _train(tiny_split_data, tmp_path / "r", plan=plan)
    assert [row["cached"] for row in result.history] == [True, False]


def test_augmented_views_are_cached_and_cycled(tiny_split_data: Path, tmp_path: Path) -> None:
    result = _train(tiny_split_data, tmp_path / "views", cache_views=2, augment=True)
    assert all(row["cached"] for row in result.history)
    losses = [row["train_loss"] for row in result.history]
    assert len(set(losses)) == 3


def test_cache_is_off_where_it_would_not_be_exact_or_would_leave_a_trainable_parameter_out(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)
    trainable = tuple(apply_trainable(adapter, resolve(adapter, ["head"]), batchnorm="frozen"))
    assert why_not_cached(adapter, trainable) is None
    trainable = tuple(apply_trainable(adapter, resolve(adapter, ["head"]), batchnorm="train"))
    assert why_not_cached(adapter, trainable).startswith("parameters before the head train in this stage (stem.1.weight")
    # fastai's train_bn with fixed statistics: BatchNorm weights train, so they must be in the graph.
    trainable = tuple(apply_trainable(adapter, resolve(adapter, ["head", "norm"]), batchnorm="eval"))
    assert why_not_cached(adapter, trainable).startswith("parameters before the head train in this stage (stem.1.weight")
    trainable = tuple(apply_trainable(adapter, resolve(adapter, ["block2", "head"])))
    assert why_not_cached(adapter, trainable).startswith("parameters before the head train in this stage (block2.0.weight")


def test_fingerprint_follows_weights_trainable_set_and_files(small_net, tiny_split_data: Path) -> None:
    adapter = adapt(small_net, num_classes=3)
    data = discover(tiny_split_data)
    head = tuple(resolve(adapter, ["head"]))
    key = fingerprint(adapter, head, adapter.preprocessing, data.train, "views=0")
    assert fingerprint(adapter, head, adapter.preprocessing, data.train, "views=0") == key
    assert fingerprint(adapter, head, adapter.preprocessing, data.train, "views=2") != key
    assert fingerprint(adapter, tuple(resolve(adapter, ["block2", "head"])), adapter.preprocessing, data.train, "views=0") != key
    first = data.train[0][0]
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint(adapter, head, adapter.preprocessing, data.train, "views=0") != key
    with torch.no_grad():
        small_net.stem[0].weight.add_(1e-3)
    assert fingerprint(adapter, head, adapter.preprocessing, data.train, "views=0") != key


class _ScaledLogits(torch.nn.Module):
    """A forward that computes after its head (logits over a temperature): the head alone is another function."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 10)
        self.register_buffer("temperature", torch.tensor(temperature))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(images).mean((2, 3))) / self.temperature


@pytest.mark.parametrize("temperature, cached", [(0.05, False), (1.0, True)])
def test_a_forward_that_computes_after_its_head_trains_the_head_on_the_images(
    tiny_split_data: Path, tmp_path: Path, temperature: float, cached: bool, capsys: pytest.CaptureFixture[str],
) -> None:
    """The cached head trained on the head alone and recorded a val loss 4x below the delivered model's."""
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run

    torch.manual_seed(0)
    config = TrainConfig(**(BASE | {"quiet": False, "ema": False, "precision": "fp32", "augment": True, "mixup": 0.2}))
    result = train_images(tiny_split_data, model=_ScaledLogits(temperature), plan=HEAD_ONLY, config=config, out=tmp_path / "run")
    assert [row["cached"] for row in result.history] == [cached] * 3
    said = capsys.readouterr().out
    assert ("frozen-feature cache off (the head on the frozen features does not give the model's own logits" in said) is not cached
    # the stages are predicted as they run: mixup is said to change nothing only where every stage is on cached features
    assert ("mixup (--mixup) changes nothing here" in said) is cached
    adapter, meta = load_run(tmp_path / "run", model=_ScaledLogits(temperature))
    delivered = evaluate_run(adapter, meta, tiny_split_data, split="val")["loss"]
    assert delivered == pytest.approx(result.best["val"]["loss"], rel=1e-4)


class _LearnedScale(torch.nn.Module):
    """A learned scale after the head: 1 at the start (the head alone agrees), changed once a stage trains it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(images).mean((2, 3))) * self.scale


def test_a_head_stage_checks_the_split_on_the_weights_it_starts_with(tiny_split_data: Path, tmp_path: Path) -> None:
    """Checked once as the run was set up (scale 1: the head alone agreed), a head stage after the scale had trained
    cached features of another function, and recorded a val loss 16x below the delivered model's."""
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run

    def model():
        torch.manual_seed(0)
        return adapt(_LearnedScale(), groups={"body": ["body", "scale"]}, head="fc")

    plan = Plan((Stage("all", 1, ("all",), ConstantLr(0.3)), Stage("head", 2, ("head",), ConstantLr(3e-3))))
    config = TrainConfig(**(BASE | {"ema": False, "precision": "fp32", "image_size": 24}))
    result = train_images(tiny_split_data, model=model(), plan=plan, config=config, out=tmp_path / "run")
    assert [row["cached"] for row in result.history] == [False, False, False]
    adapter, meta = load_run(tmp_path / "run", model=model())
    assert adapter.model.scale.item() != 1.0  # the first stage moved it
    assert evaluate_run(adapter, meta, tiny_split_data, split="val")["loss"] == pytest.approx(result.best["val"]["loss"], rel=1e-4)
