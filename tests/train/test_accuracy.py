"""End-to-end accuracy on real data with real weights: the targets users compare us on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HYMENOPTERA
from thaw.train import TrainConfig, train_images

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data/hymenoptera_data beside the checkout")


@pytest.mark.parametrize(
    "strategy, options, target",
    [
        ("feature-extract", {"epochs": 3}, 0.92),
        ("two-phase", {"head_epochs": 3, "epochs": 2}, 0.93),
    ],
)
def test_mobilenet_v2_on_ants_and_bees(torch_home: Path, tmp_path: Path, strategy: str, options: dict, target: float) -> None:
    result = train_images(
        HYMENOPTERA, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=strategy, plan_options=options,
        config=TrainConfig(quiet=True), out=tmp_path / strategy,
    )
    assert result.best["val"]["accuracy"] >= target
    assert result.best["val"]["count"] == 153 and not result.skipped
