"""Classification metrics from a confusion matrix: accuracy, macro-F1, per-class accuracy, top-5."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MetricTracker:
    num_classes: int
    confusion: torch.Tensor = field(init=False)
    loss_sum: float = 0.0
    top5_hits: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        predictions = logits.argmax(dim=1)
        index = labels * self.num_classes + predictions
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)
        if self.num_classes > 5:
            self.top5_hits += int((logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum())
        self.loss_sum += loss * len(labels)
        self.count += len(labels)

    def state(self) -> dict:
        """What a mid-epoch checkpoint keeps, so the epoch's metrics survive a resume."""
        return {"confusion": self.confusion.clone(), "loss_sum": self.loss_sum, "top5_hits": self.top5_hits, "count": self.count}

    def restore(self, state: dict) -> None:
        self.confusion = state["confusion"].clone()
        self.loss_sum, self.top5_hits, self.count = state["loss_sum"], state["top5_hits"], state["count"]

    def all_reduce(self) -> None:
        """Sum this pass's counts over every rank, so each rank reports the whole dataset."""
        import torch.distributed as dist

        from thaw.distributed import collective_device

        device = collective_device()
        numbers = torch.tensor([self.loss_sum, float(self.top5_hits), float(self.count)], dtype=torch.float64, device=device)
        confusion = self.confusion.to(device)
        dist.all_reduce(confusion)
        dist.all_reduce(numbers)
        self.confusion = confusion.cpu()
        self.loss_sum, self.top5_hits, self.count = float(numbers[0]), int(numbers[1]), int(numbers[2])

    def summary(self) -> dict:
        confusion = self.confusion.double()
        true_positive = confusion.diag()
        per_class_total = confusion.sum(dim=1)
        predicted_total = confusion.sum(dim=0)
        recall = true_positive / per_class_total.clamp(min=1)
        precision = true_positive / predicted_total.clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        result = {
            "loss": self.loss_sum / max(1, self.count),
            "accuracy": float(true_positive.sum() / max(1, self.count)),
            # over the classes the data holds or the model predicts, as scikit-learn's: a held-out set of some of the
            # run's classes is not marked down for the classes it does not hold
            "macro_f1": float(f1[(per_class_total + predicted_total) > 0].mean()) if self.count else 0.0,
            "per_class_accuracy": [float(r) for r in recall],
            "per_class_precision": [float(value) for value in precision],
            "per_class_f1": [float(value) for value in f1],
            "per_class_support": [int(value) for value in per_class_total],
            "count": self.count,
        }
        if self.num_classes > 5:
            result["top5"] = self.top5_hits / max(1, self.count)
        return result


def undefined_as_null(metrics: dict) -> dict:
    """Per-class scores that are 0/0 as null, as the table's "-": recall of a class the data does not hold, precision
    of one the model never predicted, F1 of one neither holds nor predicts (a 0 read as a score the model earned)."""
    held = metrics["per_class_support"]
    predicted = [sum(column) for column in zip(*metrics["confusion"])]
    keep = lambda values, defined: [value if ok else None for value, ok in zip(values, defined)]  # noqa: E731
    return metrics | {
        "per_class_accuracy": keep(metrics["per_class_accuracy"], [count > 0 for count in held]),
        "per_class_precision": keep(metrics["per_class_precision"], [count > 0 for count in predicted]),
        "per_class_f1": keep(metrics["per_class_f1"], [a > 0 or b > 0 for a, b in zip(held, predicted)]),
    }
