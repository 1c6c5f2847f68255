"""A Lightning callback that runs a thaw plan: stages by epoch, per-group lrs, BatchNorm policy, audit.

    driver = PlanDriver(adapter, plan, schedule="cosine")
    class Module(L.LightningModule):
        def configure_optimizers(self):
            return driver.make_optimizer()      # no lr scheduler: thaw sets the lrs
    L.Trainer(max_epochs=driver.total_epochs, callbacks=[ThawFinetuning(driver)]).fit(Module(), ...)

Resuming (`ckpt_path=`) works: the optimizer's groups are the same in every
stage, and the stage comes from the restored epoch.
"""

from __future__ import annotations

import math

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("thaw.integrations.lightning needs Lightning: pip install 'thaw[lightning]'") from error

from thaw.errors import ThawError
from thaw.integrations.driver import PlanDriver


class ThawFinetuning(pl.Callback):
    def __init__(self, driver: PlanDriver) -> None:
        self.driver = driver
        self.stage_start_step = 0
        self.steps_per_epoch = 1

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ThawError("ThawFinetuning sets every group's lr from the plan; return no lr scheduler from configure_optimizers (use PlanDriver(schedule=...))")
        self.driver.audit(trainer.optimizers[0])

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        stage = self.driver.stage_at(trainer.current_epoch)
        if stage != self.driver.stage_index:
            self.driver.enter(stage, trainer.optimizers[0])
        # Lightning steps on the last partial accumulation group too, so an epoch has ceil(batches / k) steps.
        self.steps_per_epoch = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
        self.stage_start_step = self.driver.first_epoch(stage) * self.steps_per_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: object, batch_idx: int) -> None:
        stage = self.driver.plan.stages[self.driver.stage_index]
        self.driver.set_lrs(trainer.optimizers[0], trainer.global_step - self.stage_start_step, stage.epochs * self.steps_per_epoch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: object) -> None:
        self.driver.before_step(trainer.optimizers[0])
