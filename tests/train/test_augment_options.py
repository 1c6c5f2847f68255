"""--auto-augment, --mixup and --cutmix: each changes training as documented, repeats exactly under a seed and
across a resume, leaves stages on cached features and every evaluation alone, and bad values are refused up front."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from tests.cli.test_cli import thaw
from tests.conftest import Crash, SmallConvNet, crash_after, cli_config, ctrl_c_in_the_next_epoch, write_text_table
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.data.loaders import Batch, ImageDataset
from thaw.data.transforms import train_transform
from thaw.models.adapter import Preprocessing
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.plan.config import read_plan_file
from thaw.train import TrainConfig, train_text
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import RunInterrupted, fit, split_check_noise
from thaw.train.loop import Engine, MetricTracker, _forward_backward
from thaw.train.mixing import BatchMixer

PREPROCESSING = Preprocessing(crop_size=32, resize_size=36)
PLAN = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True, auto_augment="trivial", mixup=0.2, cutmix=1.0)


def _images(count: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1][:count])


@pytest.mark.parametrize("policy, kind", [("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)])
def test_a_policy_runs_after_the_crop_and_flip_and_only_when_asked(policy: str, kind: type) -> None:
    steps = [type(step) for step in train_transform(PREPROCESSING, policy).transforms]
    assert steps[:4] == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, kind]
    assert not any(issubclass(step, (v2.TrivialAugmentWide, v2.RandAugment)) for step in map(type, train_transform(PREPROCESSING).transforms))


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_a_policy_changes_the_training_images_and_repeats_under_a_seed(tiny_split_data: Path, policy: str) -> None:
    samples = discover(tiny_split_data).train[:4]
    plain, augmented = (ImageDataset(samples, train_transform(PREPROCESSING, chosen)) for chosen in (None, policy))
    keys = [(index, seed) for index in range(4) for seed in range(3)]
    first = [augmented[key][0] for key in keys]
    assert all(torch.equal(a, augmented[key][0]) for a, key in zip(first, keys))  # the same (sample, seed): the same image
    assert any(not torch.equal(a, plain[key][0]) for a, key in zip(first, keys))  # the policy altered what training sees


def test_mixup_blends_images_and_labels_in_the_same_share() -> None:
    images, labels = _images()
    mixed, targets = BatchMixer(4, mixup=0.4, cutmix=0.0)(images, labels, seed=3)
    share = targets[0, labels[0]].item()  # image 0 is blended with image 5 (the batch rolled by one), label 0 with 1
    assert 0 < share < 1 and torch.allclose(targets.sum(dim=1), torch.ones(6))
    assert torch.allclose(mixed, share * images + (1 - share) * images.roll(1, 0), atol=1e-6)
    assert torch.allclose(targets, share * torch.eye(4)[labels] + (1 - share) * torch.eye(4)[labels.roll(1, 0)], atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_is_the_label_share() -> None:
    images, labels = _images()
    mixed, targets = BatchMixer(4, mixup=0.0, cutmix=1.0)(images, labels, seed=5)
    pasted = (mixed != images).all(dim=1)[0]  # the pixels of image 0 that now come from image 5
    assert torch.equal(mixed[:, :, pasted], images.roll(1, 0)[:, :, pasted]) and torch.equal(mixed[:, :, ~pasted], images[:, :, ~pasted])
    own = targets[0, labels[0]].item()
    assert own == pytest.approx(1 - pasted.float().mean().item(), abs=1e-6) and 0 < own < 1


def test_a_whole_number_alpha_mixes_as_the_same_float_does() -> None:
    """A plan file's `cutmix: 1` arrives as an int: torch's Dirichlet of Long was a traceback in the first batch."""
    images, labels = _images()
    for whole, same in (({"mixup": 0, "cutmix": 1}, {"mixup": 0.0, "cutmix": 1.0}), ({"mixup": 2, "cutmix": 0}, {"mixup": 2.0, "cutmix": 0.0})):
        mixed, targets = BatchMixer(4, **whole)(images, labels, seed=5)
        expected, expected_targets = BatchMixer(4, **same)(images, labels, seed=5)
        assert torch.equal(mixed, expected) and torch.equal(targets, expected_targets) and not torch.equal(mixed, images)


def test_with_both_each_batch_takes_one_of_the_two() -> None:
    images, labels = _images()
    mixer = BatchMixer(4, mixup=0.2, cutmix=1.0)
    kinds = set()
    for seed in range(20):
        mixed, _ = mixer(images, labels, seed)
        kept = (mixed == images).all(dim=1)[0]  # image 0's pixels left as they were: none under mixup, all but a box under cutmix
        kinds.add("cutmix" if kept.any() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixing_repeats_for_a_seed_and_leaves_the_run_s_random_stream_alone() -> None:
    images, labels = _images()
    mixer = BatchMixer(4, mixup=0.2, cutmix=1.0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = [mixer(images, labels, seed) for seed in range(6)]
    assert torch.equal(torch.get_rng_state(), before)
    again = [mixer(images, labels, seed) for seed in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len({tuple(targets[0].tolist()) for _, targets in first}) > 1  # each batch its own draw
    # an epoch's batches are seeded by their number in the epoch: a loader resumed at batch 2 blends batch 2 as before
    whole, resumed = mixer.for_epoch(11), mixer.for_epoch(11, first_batch=2)
    assert torch.equal(whole(images, labels, 2)[1], resumed(images, labels, 0)[1])


def test_the_training_loss_is_the_cross_entropy_against_the_smoothed_blend() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    batch = Batch(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1]), [])
    targets = torch.softmax(torch.randn(5, 4), dim=1)
    images = torch.randn(5, 6)
    smoothed = 0.9 * targets + 0.1 / 4
    expected = -(smoothed * head(images).log_softmax(dim=1)).sum(dim=1).mean().item()
    engine = Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True, label_smoothing=0.1)
    tracker = MetricTracker(4)
    assert _forward_backward(head, batch, engine, "test", tracker, lambda x, y: (images, targets)) == pytest.approx(expected, rel=1e-6)
    predicted = head(images).argmax(dim=1)
    assert int(tracker.confusion.trace()) == int((predicted == batch.labels).sum())  # accuracy counts the images' own labels


def test_ranks_draw_their_own_blends() -> None:
    images, labels = _images()
    mixer = BatchMixer(4, mixup=0.2, cutmix=0.0)
    first, second = (mixer.for_epoch(11, rank=rank)(images, labels, 0)[1] for rank in (0, 1))
    assert not torch.equal(first, second)


def _adapter():
    torch.manual_seed(0)
    return adapt(SmallConvNet(), num_classes=3)


def _train(data: Path, out: Path, config: TrainConfig = CONFIG, adapter=None, **options):
    return fit(adapter or _adapter(), discover(data), PLAN, config, out, meta={"model": "small"}, **options)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def _recorded(data: Path, out: Path, config: TrainConfig, plan: Plan = PLAN) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """The run's train losses, and the images its network was given in training and in evaluation, in order."""
    adapter, trained, evaluated = _adapter(), [], []
    noise = split_check_noise(config.image_size)  # the head-split check's: no image of the data

    def record(module, args) -> None:
        if not args[0].is_meta and not (args[0].shape == noise.shape and torch.equal(args[0].float().cpu(), noise)):
            (trained if module.training else evaluated).append(args[0].clone())

    adapter.model.register_forward_pre_hook(record)
    result = fit(adapter, discover(data), plan, config, out, meta={"model": "small"})
    return [row["train_loss"] for row in result.history], trained, evaluated


# progressive resize 0.5: the full stage's first epoch trains on 16 px crops, which the options reach too
@pytest.mark.parametrize("options", [{"auto_augment": "trivial"}, {"auto_augment": "rand"}, {"mixup": 0.2}, {"cutmix": 1.0}])
def test_each_option_changes_the_images_the_network_trains_on_and_nothing_else(tiny_split_data: Path, tmp_path: Path, options: dict) -> None:
    plain = TrainConfig(image_size=32, batch_size=8, quiet=True, progressive_resize=0.5)
    losses, trained, evaluated = _recorded(tiny_split_data, tmp_path / "without", plain)
    losses_with, trained_with, evaluated_with = _recorded(tiny_split_data, tmp_path / "with", TrainConfig(**{**plain.__dict__, **options}))
    # the head stage trains on cached features of the evaluation view: neither blended nor policy-augmented
    assert losses_with[0] == losses[0] and losses_with[1:] != losses[1:]
    assert [x.shape[-1] for x in trained_with] == [x.shape[-1] for x in trained] == [16] * 5 + [32] * 5
    changed = [not torch.equal(a, b) for a, b in zip(trained, trained_with)]
    assert any(changed[:5]) and any(changed[5:])  # at both sizes (a cutmix box can shrink to no pixel in one batch)
    assert len(evaluated_with) == len(evaluated) == 5 + 3 + 3 + 3  # the cache's passes (train, val), then each epoch's val
    assert all(torch.equal(a, b) for a, b in zip(evaluated, evaluated_with))  # every evaluation pass: the same images


def test_mixup_blends_the_network_s_training_images_with_their_neighbours(tiny_split_data: Path, tmp_path: Path) -> None:
    plain = TrainConfig(image_size=32, batch_size=8, quiet=True)
    _, trained, evaluated = _recorded(tiny_split_data, tmp_path / "without", plain)
    _, blended, evaluated_with = _recorded(tiny_split_data, tmp_path / "with", TrainConfig(**{**plain.__dict__, "mixup": 0.2}))
    shares = []
    for images, mixed in zip(trained, blended):
        rolled = images.roll(1, 0)
        share = ((mixed - rolled) * (images - rolled)).sum() / ((images - rolled) ** 2).sum()  # the least-squares weight
        assert torch.allclose(mixed, share * images + (1 - share) * rolled, atol=1e-5)
        shares.append(float(share))
    # Beta(0.2, 0.2) puts most weight near 0 and 1: some batches are barely blended, never all
    assert all(-1e-6 <= share <= 1 + 1e-6 for share in shares) and any(0.01 < share < 0.99 for share in shares)
    assert [x.shape for x in evaluated_with] == [x.shape for x in evaluated]
    val = evaluated[5:8]  # the cache's val pass, before any training; every later val pass shows the same images
    assert all(torch.equal(a, b) for a, b in zip(evaluated_with[5:], val + val + val))


def test_cached_views_carry_the_policy(tiny_split_data: Path, tmp_path: Path) -> None:
    head_only = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)),))
    views = TrainConfig(image_size=32, batch_size=8, quiet=True, cache_views=2)
    plain, _, _ = _recorded(tiny_split_data, tmp_path / "plain", views, head_only)
    policy, _, _ = _recorded(tiny_split_data, tmp_path / "policy", TrainConfig(**{**views.__dict__, "auto_augment": "trivial"}), head_only)
    assert plain[0] != policy[0] and plain[1] != policy[1]


# workers 2: the policy runs in persistent worker processes, the blending in this process after them;
# accumulate 2: the interrupt lands after an optimizer step, two batches into the epoch
@pytest.mark.parametrize("workers, accumulate", [(0, 1), (2, 1), (0, 2)])
def test_a_fixed_seed_repeats_and_ctrl_c_resumes_to_the_same_weights(tiny_split_data: Path, tmp_path: Path, workers: int, accumulate: int) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 4, "workers": workers, "accumulate": accumulate})
    _train(tiny_split_data, tmp_path / "whole", config)
    _train(tiny_split_data, tmp_path / "again", config)

    with pytest.raises(RunInterrupted, match="--resume"):  # in the full stage's second epoch, which the resumed run finishes
        _train(tiny_split_data, tmp_path / "cut", config, **ctrl_c_in_the_next_epoch(2))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == accumulate
    _train(tiny_split_data, tmp_path / "cut", config, resume=True)
    whole, again, cut = (_weights(tmp_path / name) for name in ("whole", "again", "cut"))
    assert all(torch.equal(whole[k], again[k]) and torch.equal(whole[k], cut[k]) for k in whole)


def test_resume_refuses_other_augmentation(tiny_split_data: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        _train(tiny_split_data, tmp_path / "run", callbacks=[crash_after(2)])
    refused = (
        ("mixup", 0.4, r"mixup \(the run: 0.2, now: 0.4\)"),
        ("cutmix", 0.0, r"cutmix \(the run: 1.0, now: 0.0\)"),
        ("auto_augment", "rand", r"auto-augment \(the run: 'trivial'"),
    )
    for field, value, message in refused:
        with pytest.raises(ThawError, match=message):
            _train(tiny_split_data, tmp_path / "run", TrainConfig(**{**CONFIG.__dict__, field: value}), resume=True)


def test_off_by_default_in_the_library_and_the_cli() -> None:
    for config in (TrainConfig(), cli_config("data", "--model", "mobilenet_v2")):
        assert (config.auto_augment, config.mixup, config.cutmix) == (None, 0.0, 0.0)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"auto_augment": "auto"}, "auto augment must be one of trivial, rand, got 'auto'"),
        ({"mixup": -0.1}, "mixup must be a Beta alpha from 1e-38 to 1e+38, got -0.1"),
        ({"cutmix": float("inf")}, "cutmix must be a Beta alpha from 1e-38 to 1e+38, got inf"),
        ({"mixup": 1e-50}, "mixup must be a Beta alpha from 1e-38 to 1e+38, got 1e-50"),  # 0 in float32: a traceback in the first batch
        ({"cutmix": 1e39}, "cutmix must be a Beta alpha from 1e-38 to 1e+38, got 1e+39"),  # infinite in float32
        ({"mixup": 0.2, "augment": False}, "mixup (--mixup) augments the training images, which augment=False (--no-augment) turns off"),
        ({"auto_augment": "rand", "augment": False}, "auto_augment (--auto-augment) augments the training images"),
    ],
)
def test_impossible_values_are_refused_when_the_config_is_made(options: dict, expected: str) -> None:
    with pytest.raises(ThawError, match=re.escape(expected)):
        TrainConfig(**options)


def test_a_plan_file_sets_them_and_a_typed_flag_wins(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages: [{name: all, epochs: 3, train: [all], lr: 1.0e-4}]\ntraining: {auto_augment: rand, mixup: 0.2, cutmix: 1.0}\n")

    def config(*typed: str) -> TrainConfig:
        return cli_config("data", "--model", "mobilenet_v2", "--config", str(plan), *typed)

    assert (config().auto_augment, config().mixup, config().cutmix) == ("rand", 0.2, 1.0)
    chosen = config("--auto-augment", "trivial", "--mixup", "0")
    assert (chosen.auto_augment, chosen.mixup, chosen.cutmix) == ("trivial", 0.0, 1.0)
    assert config("--auto-augment", "none").auto_augment is None  # typed: turns the file's policy off


def test_a_plan_file_number_in_quotes_is_the_number_as_its_lrs_are(tmp_path: Path) -> None:
    """YAML reads 1e-1 (no dot) as text, and a quoted "3" is text too: the plan's lrs were read as the numbers meant,
    its epochs and training numbers were refused as 'got '3''. Now all are read alike; text that is no number is not."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        'stages: [{name: all, epochs: "3", train: [all], lr: 1e-4}]\n'
        'training: {label_smoothing: 1e-1, mixup: "0.2", cache_views: "2", progressive_resize: " 0.5 "}\n'
    )
    chosen = cli_config("data", "--model", "mobilenet_v2", "--config", str(plan))
    assert (chosen.label_smoothing, chosen.mixup, chosen.cache_views, chosen.progressive_resize) == (0.1, 0.2, 2, 0.5)
    assert type(chosen.cache_views) is int and type(chosen.mixup) is float
    read, options = read_plan_file(plan)  # the Python API's reading: TrainConfig(**options) takes them as they are
    assert read.stages[0].epochs == 3 and TrainConfig(**options) == TrainConfig(label_smoothing=0.1, mixup=0.2, cache_views=2, progressive_resize=0.5)
    plan.write_text('stages: [{name: all, epochs: "3.5", train: [all], lr: 1e-4}]\ntraining: {cache_views: "2.5", mixup: "some"}\n')
    with pytest.raises(ThawError) as refused:
        read_plan_file(plan)
    assert "stages[0].epochs: expected a whole number from 0 to 1000000, got '3.5'" in str(refused.value)
    plan.write_text('stages: [{name: all, epochs: 3, train: [all], lr: 1e-4}]\ntraining: {cache_views: "2.5", mixup: "some"}\n')
    with pytest.raises(ThawError) as refused:
        cli_config("data", "--model", "mobilenet_v2", "--config", str(plan))
    assert "cache views" in str(refused.value) and "'2.5'" in str(refused.value) and "got 'some'" in str(refused.value)
    plan.write_text('stages: [{name: all, epochs: "+3", train: [all], lr: 1e-4}]\n')
    assert read_plan_file(plan)[0].stages[0].epochs == 3
    # Digits of other scripts, and '_', which Python's int() and float() take and no YAML number holds; a count of
    # 5,000 digits, which int() refuses with a traceback: refused as the text they are.
    huge = "9" * 5000
    for epochs, training in (('"３"', '{mixup: "0_2"}'), (f'"{huge}"', f'{{cache_views: "{huge}"}}')):
        plan.write_text(f"stages: [{{name: all, epochs: {epochs}, train: [all], lr: 1e-4}}]\ntraining: {training}\n")
        with pytest.raises(ThawError, match=r"stages\[0\]\.epochs: expected a whole number from 0 to 1000000, got '"):
            read_plan_file(plan)
        plan.write_text(f"stages: [{{name: all, epochs: 3, train: [all], lr: 1e-4}}]\ntraining: {training}\n")
        with pytest.raises(ThawError, match=r"got '(0_2|9{5000})'"):
            cli_config("data", "--model", "mobilenet_v2", "--config", str(plan))


@pytest.mark.parametrize(
    "training, expected",
    [
        ("{mixup: true}", "mixup must be a Beta alpha from 1e-38 to 1e+38, got True"),
        ("{cutmix: abc}", "cutmix must be a Beta alpha from 1e-38 to 1e+38, got 'abc'"),
        ("{auto_augment: 3}", "auto augment must be one of trivial, rand, got 3"),
    ],
)
def test_bad_plan_file_values_are_refused_by_name(tmp_path: Path, training: str, expected: str) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"stages: [{{name: all, epochs: 1, train: [all], lr: 1.0e-4}}]\ntraining: {training}\n")
    with pytest.raises(ThawError, match=re.escape(expected)):
        cli_config("data", "--model", "mobilenet_v2", "--config", str(plan))


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--mixup", "-1"], "expected an alpha from 1e-38 to 1e+38"),
        (["--mixup=1e-50"], "expected an alpha from 1e-38 to 1e+38"),
        (["--cutmix", "nan"], "expected a finite number"),
        (["--auto-augment", "wide"], "expected one of trivial, rand, none, got 'wide'"),
        (["--mixup", "0.2", "--no-augment"], "mixup (--mixup) augments the training images, which augment=False (--no-augment) turns off"),
    ],
)
def test_bad_values_are_one_line(tiny_split_data: Path, tmp_path: Path, extra: list[str], expected: str) -> None:
    result = thaw("train", str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--out", str(tmp_path / "run"), *extra)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_a_text_run_refuses_them_in_one_line(tmp_path: Path, tiny_encoder: Path) -> None:
    table = write_text_table(tmp_path / "t.tsv", rows_per_class=10)
    result = thaw("train", str(table), "--task", "text", "--model", str(tiny_encoder), "--epochs", "1",
                   "--mixup", "0.2", "--auto-augment", "trivial", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "auto_augment (--auto-augment) and mixup (--mixup) augment images; leave them unset for text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ThawError, match=r"cutmix \(--cutmix\) augments images"):  # refused before the table is read: there is none
        train_text(tmp_path / "missing.tsv", model=str(tiny_encoder), config=TrainConfig(cutmix=1.0), out=tmp_path / "lib")


def test_a_text_run_that_recorded_an_image_size_still_resumes(tmp_path: Path, tiny_encoder: Path) -> None:
    # Runs started before text refused --image-size recorded it; their resume gets no option to drop it.
    from thaw.train import resume_run
    from thaw.train.checkpoint import save_checkpoint

    table = write_text_table(tmp_path / "t.tsv", rows_per_class=10)
    options = {"model": str(tiny_encoder), "plan": "feature-extract", "plan_options": {"epochs": 2}}
    with pytest.raises(Crash):
        train_text(table, config=TrainConfig(quiet=True), out=tmp_path / "run", callbacks=[crash_after(1)], **options)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    saved["settings"]["config"]["image_size"] = 160  # as such a run recorded it
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", saved)
    assert len(resume_run(tmp_path / "run").history) == 2


def test_a_text_run_refuses_image_sizes_in_one_line(tmp_path: Path, tiny_encoder: Path) -> None:
    # Accepted and ignored, --image-size would let a user believe the texts were cut or padded to it.
    table = write_text_table(tmp_path / "t.tsv", rows_per_class=10)
    result = thaw("train", str(table), "--task", "text", "--model", str(tiny_encoder), "--epochs", "1",
                   "--image-size", "160", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "image_size (--image-size) sizes images; leave it unset for text (max_length, --max-length" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ThawError, match=r"image_size \(--image-size\) sizes images"):
        train_text(tmp_path / "missing.tsv", model=str(tiny_encoder), config=TrainConfig(image_size=160), out=tmp_path / "lib")


def test_a_plan_on_cached_features_only_says_they_change_nothing(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head_only = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)),))
    config = TrainConfig(**{**CONFIG.__dict__, "quiet": False})
    fit(_adapter(), discover(tiny_split_data), head_only, config, tmp_path / "run", meta={"model": "small"})
    assert "auto_augment (--auto-augment), mixup (--mixup), cutmix (--cutmix) change nothing here: every stage trains on cached features" in capsys.readouterr().out
    # augmented cached views are drawn with the policy: it changes them, and only mixing goes unused
    views = TrainConfig(**{**CONFIG.__dict__, "quiet": False, "cache_views": 2})
    fit(_adapter(), discover(tiny_split_data), head_only, views, tmp_path / "views", meta={"model": "small"})
    assert "\nmixup (--mixup), cutmix (--cutmix) change nothing here: every stage trains on cached features, which are not mixed" in "\n" + capsys.readouterr().out
