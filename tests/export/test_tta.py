"""Test-time augmentation: the softmax averaged over each image and its mirror image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_class_images
from thaw.cli import main
from thaw.export.inference import FlipAveraged


class LeftHalfReader(nn.Module):
    """A model that sees only the left half of the image: its mirror view disagrees on asymmetric input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * 8 * 4, 5)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images)
        return self.linear(images[..., :4].flatten(1))


def test_the_mirror_view_of_a_symmetric_image_is_exactly_the_image() -> None:
    model = LeftHalfReader()
    left = torch.rand(2, 3, 8, 4)
    symmetric = torch.cat([left, left.flip(-1)], dim=-1)
    averaged = FlipAveraged(model)(symmetric)
    (both,) = model.inputs
    assert torch.equal(both[:2], both[2:])  # the mirror view is bit-identical: TTA changes nothing here
    assert torch.allclose(averaged.softmax(dim=1), model(symmetric).softmax(dim=1), atol=1e-6)


def test_on_other_images_it_is_the_mean_of_the_two_views_softmax() -> None:
    model = LeftHalfReader()
    images = torch.rand(3, 3, 8, 8)
    expected = (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2
    averaged = FlipAveraged(model)(images).softmax(dim=1)
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert not torch.allclose(averaged, model(images).softmax(dim=1), atol=1e-3)  # the views disagree: it is not the plain one
    loss = nn.functional.cross_entropy(FlipAveraged(model)(images), torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(-expected[[0, 1, 2], [0, 1, 2]].log().mean().item(), rel=1e-5)  # the averaged prediction's loss


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tta")
    write_class_images(root / "data" / "train", per_class=8, size=32, seed=0)
    write_class_images(root / "data" / "val", per_class=4, size=32, seed=1)
    args = ["train", str(root / "data"), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--head-epochs", "1", "--epochs", "1", "--quiet", "--out", str(root / "run")]
    assert main(args) == 0
    return root / "run", root / "data"


def test_evaluate_and_predict_with_tta_record_it_and_use_both_views(
    image_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, data = image_run
    assert main(["evaluate", str(run), str(data), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    seen: list[int] = []
    forward = FlipAveraged.forward

    def counted(self: FlipAveraged, images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(FlipAveraged, "forward", counted)
    assert main(["evaluate", str(run), str(data), "--json", "--tta"]) == 0
    mirrored = json.loads(capsys.readouterr().out)
    assert plain["tta"] is None and mirrored["tta"] == "flip"
    assert mirrored["count"] == plain["count"] == 12 and sum(seen) == 12
    seen.clear()
    assert main(["predict", str(run), str(data / "val"), "--json", "--tta"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    predictions = predicted["predictions"]
    assert len(predictions) == 12 and sum(seen) == 12 and predicted["tta"] == "flip"  # recorded, as the README says
    assert main(["predict", str(run), str(data / "val"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"] is None
    assert all(abs(sum(p["probability"] for p in entry["predictions"]) - 1) < 1e-4 for entry in predictions)  # 3 classes, top 3


def test_tta_on_a_text_run_is_one_line(tmp_path: Path, tiny_encoder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import write_text_table

    table, run = write_text_table(tmp_path / "t.tsv", rows_per_class=20), tmp_path / "run"
    args = ["train", str(table), "--task", "text", "--model", str(tiny_encoder), "--strategy", "feature-extract", "--epochs", "1",
            "--batch-size", "8", "--out", str(run), "--quiet"]
    assert main(args) == 0
    for command in (["evaluate", str(run), str(table), "--tta"], ["predict", str(run), "free prize", "--tta"]):
        capfd.readouterr()
        assert main(command) == 2
        error = capfd.readouterr().err.strip()
        assert error == "thaw: error: --tta averages over mirrored images; a text run has no views to average: drop it (tta=False, no --tta)"
