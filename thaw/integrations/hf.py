"""A Hugging Face TrainerCallback that runs a thaw plan inside `transformers.Trainer`.

    driver = PlanDriver(adapter, plan, schedule="cosine")
    Trainer(model=adapter.model, args=TrainingArguments(num_train_epochs=driver.total_epochs, ...),
            optimizers=(driver.make_optimizer(), None), callbacks=[ThawCallback(driver)]).train()

The Trainer keeps its scheduler object, but thaw sets every group's lr before
each step (plan lr x thaw's schedule). `train(resume_from_checkpoint=...)`
works: the optimizer's groups are the same in every stage.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover
    raise ImportError("thaw.integrations.hf needs transformers: pip install 'thaw[text]'") from error

from thaw.integrations.driver import PlanDriver


class ThawCallback(TrainerCallback):
    def __init__(self, driver: PlanDriver) -> None:
        self.driver = driver
        self.steps_per_epoch = 1

    def _sync(self, state: object, optimizer: object) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        epoch = int(state.global_step // self.steps_per_epoch)
        stage = self.driver.stage_at(epoch)
        if stage != self.driver.stage_index:
            self.driver.enter(stage, optimizer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.steps_per_epoch = max(1, state.max_steps // max(1, self.driver.total_epochs))
        self._sync(state, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self._sync(state, optimizer)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        index = self.driver.stage_index
        first = self.driver.first_epoch(index) * self.steps_per_epoch
        self.driver.set_lrs(optimizer, state.global_step - first, self.driver.plan.stages[index].epochs * self.steps_per_epoch)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.driver.before_step(getattr(optimizer, "optimizer", optimizer))
