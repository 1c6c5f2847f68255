"""thaw plans inside other trainers: Lightning and the Hugging Face Trainer (optional extras)."""

from thaw.integrations.driver import PlanDriver

__all__ = ["PlanDriver"]
