"""thaw plans inside Lightning and the Hugging Face Trainer: stage change mid-run, frozen stays frozen, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.conftest import SmallConvNet
from thaw.integrations import PlanDriver
from thaw.models import adapt
from thaw.plan import build_plan

EPOCHS = {"head_epochs": 1, "epochs": 1}


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 4
    images = torch.rand(32, 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1) * 0.3
    return TensorDataset(images, labels)


def _driver(seed: int = 0) -> PlanDriver:
    torch.manual_seed(seed)
    adapter = adapt(SmallConvNet())
    return PlanDriver(adapter, build_plan("two-phase", num_groups=len(adapter.groups), **EPOCHS), schedule="cosine")


def _body(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}


# ---------------------------------------------------------------- Lightning

L = pytest.importorskip("lightning.pytorch", reason="the Lightning callback is an optional extra: pip install 'thaw[lightning]'")


class LitClassifier(L.LightningModule):
    def __init__(self, driver: PlanDriver) -> None:
        super().__init__()
        self.driver, self.model = driver, driver.adapter.model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.model(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.driver.make_optimizer()

    def on_train_batch_start(self, _batch: object, _index: int) -> None:
        torch.manual_seed(self.global_step)  # Lightning checkpoints keep no RNG state: dropout must replay


class Snapshots(L.Callback):
    """The body's weights at the end of every epoch, and the audit after every step."""

    def __init__(self, driver: PlanDriver) -> None:
        self.driver, self.bodies = driver, []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.driver.audit(trainer.optimizers[0])

    def on_train_epoch_end(self, trainer, module) -> None:
        self.bodies.append(_body(module.model))


def _lightning(tmp_path: Path, driver: PlanDriver, max_epochs: int, ckpt: str | None = None) -> Snapshots:
    from thaw.integrations.lightning import ThawFinetuning

    snapshots = Snapshots(driver)
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=[ThawFinetuning(driver), snapshots], default_root_dir=str(tmp_path),
        enable_progress_bar=False, logger=False, enable_model_summary=False, accelerator="cpu", deterministic=True,
    )
    trainer.fit(LitClassifier(driver), DataLoader(_data(), batch_size=8, shuffle=False), ckpt_path=ckpt)
    return snapshots


def test_lightning_keeps_the_body_frozen_then_unfreezes_it(tmp_path: Path) -> None:
    driver = _driver()
    before = _body(driver.adapter.model)
    snapshots = _lightning(tmp_path, driver, driver.total_epochs)
    head_epoch, full_epoch = snapshots.bodies
    assert all(torch.equal(before[k], head_epoch[k]) for k in before)  # weights and BatchNorm statistics
    assert not torch.equal(head_epoch["stem.0.weight"], full_epoch["stem.0.weight"])
    assert driver.stage_index == 1


def test_lightning_resume_across_the_stage_change_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _driver()
    _lightning(tmp_path / "whole", whole, whole.total_epochs)
    first = _driver()
    _lightning(tmp_path / "cut", first, 1)  # stops after the head stage, leaves a checkpoint
    (checkpoint,) = (tmp_path / "cut").rglob("*.ckpt")
    resumed = _driver(seed=99)  # different initial weights: everything must come from the checkpoint
    _lightning(tmp_path / "cut2", resumed, resumed.total_epochs, ckpt=str(checkpoint))
    expected, got = whole.adapter.model.state_dict(), resumed.adapter.model.state_dict()
    assert all(torch.allclose(expected[k].float(), got[k].float(), atol=1e-6) for k in expected)


class WithUnusedLayer(SmallConvNet):
    """A model with a layer its forward never calls (a leftover auxiliary head, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(16, 16, 1)


def test_lightning_refuses_a_stage_whose_trainable_parameter_gets_no_gradient(tmp_path: Path) -> None:
    from thaw.errors import ThawError

    torch.manual_seed(0)
    adapter = adapt(WithUnusedLayer(), head="classifier.2")
    driver = PlanDriver(adapter, build_plan("two-phase", num_groups=len(adapter.groups), **EPOCHS))
    with pytest.raises(ThawError, match=r"first step of stage 'all'.*no gradient \(unused.weight, unused.bias\)"):
        _lightning(tmp_path, driver, driver.total_epochs)


def test_lightning_schedule_counts_the_last_partial_accumulation_step(tmp_path: Path) -> None:
    from thaw.integrations.lightning import ThawFinetuning

    driver = _driver()
    callback = ThawFinetuning(driver)
    trainer = L.Trainer(
        max_epochs=driver.total_epochs, callbacks=[callback], default_root_dir=str(tmp_path), accumulate_grad_batches=3,
        enable_progress_bar=False, logger=False, enable_model_summary=False, accelerator="cpu", enable_checkpointing=False,
    )
    trainer.fit(LitClassifier(driver), DataLoader(_data(), batch_size=8, shuffle=False))  # 4 batches an epoch: steps after 3 and 4
    assert trainer.global_step == 2 * driver.total_epochs
    assert callback.steps_per_epoch == 2


# ---------------------------------------------------------------- Hugging Face Trainer

transformers = pytest.importorskip("transformers", reason="the HF callback is an optional extra: pip install 'thaw[text]'")


class DictData(Dataset):
    def __init__(self) -> None:
        self.data = _data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        image, label = self.data[index]
        return {"images": image, "labels": label}


class WithLoss(nn.Module):
    """What the HF Trainer expects: keyword inputs in, a dict with the loss out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.model(images)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _hf(tmp_path: Path, driver: PlanDriver, resume: str | None = None, save: bool = False) -> list[dict]:
    from thaw.integrations.hf import ThawCallback

    bodies: list[dict] = []

    class Snapshots(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs) -> None:
            bodies.append(_body(driver.adapter.model))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=driver.total_epochs, per_device_train_batch_size=8, report_to=[],
        save_strategy="epoch" if save else "no", logging_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=WithLoss(driver.adapter.model), args=args, train_dataset=DictData(),
        optimizers=(driver.make_optimizer(), None), callbacks=[ThawCallback(driver), Snapshots()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return bodies


def test_hf_trainer_keeps_the_body_frozen_then_unfreezes_it(tmp_path: Path) -> None:
    driver = _driver()
    before = _body(driver.adapter.model)
    head_epoch, full_epoch = _hf(tmp_path, driver)
    assert all(torch.equal(before[k], head_epoch[k]) for k in before)
    assert not torch.equal(head_epoch["stem.0.weight"], full_epoch["stem.0.weight"])
    assert driver.stage_index == 1


def test_hf_trainer_resume_from_the_head_stage_checkpoint_matches(tmp_path: Path) -> None:
    whole = _driver()
    _hf(tmp_path / "whole", whole, save=True)
    checkpoints = sorted((tmp_path / "whole").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resumed = _driver(seed=99)
    _hf(tmp_path / "again", resumed, resume=str(checkpoints[0]))  # the head stage's checkpoint
    expected, got = whole.adapter.model.state_dict(), resumed.adapter.model.state_dict()
    assert all(torch.allclose(expected[k].float(), got[k].float(), atol=1e-6) for k in expected)
