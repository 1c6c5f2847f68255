"""A model the user built (any nn.Module, or a ModelAdapter) trained by thaw's own loop, read back and resumed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli.test_cli import thaw
from tests.conftest import SmallConvNet
from thaw import ThawError, adapt
from thaw.export.inference import evaluate_run
from thaw.export.run_dir import load_run
from thaw.train import TrainConfig, resume_run, train_images, train_text

CONFIG = TrainConfig(quiet=True, image_size=32, batch_size=8)
PLAN = {"plan": "two-phase", "plan_options": {"head_epochs": 1, "epochs": 1}}


@pytest.fixture
def object_run(tiny_split_data: Path, tmp_path: Path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    result = train_images(tiny_split_data, model=SmallConvNet(num_classes=10), out=tmp_path / "run", config=CONFIG, **PLAN)
    return tmp_path / "run", result.best


def test_a_model_object_trains_and_reads_back_into_the_same_architecture(object_run: tuple[Path, dict], tiny_split_data: Path) -> None:
    run, best = object_run
    adapter, meta = load_run(run, model=SmallConvNet())  # a fresh instance: the run's weights and new 3-class head
    assert meta["model"] == "tests.conftest.SmallConvNet" and meta["model_source"] == "object"
    assert adapter.num_classes == 3 and meta["classes"] == ["blue", "green", "red"]
    # the model read back is the one delivered: it scores the val split as the run recorded
    assert evaluate_run(adapter, meta, tiny_split_data, "val")["accuracy"] == best["val"]["accuracy"]


def test_without_the_model_a_run_on_an_object_is_one_line_that_says_how_to_load_it(object_run: tuple[Path, dict], tiny_split_data: Path) -> None:
    run, _ = object_run
    with pytest.raises(ThawError, match=r"trained on a model object \(tests.conftest.SmallConvNet\).*load_run\("):
        load_run(run)
    result = thaw("evaluate", str(run), str(tiny_split_data))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "load_run(" in result.stderr


def test_load_run_refuses_another_class(object_run: tuple[Path, dict]) -> None:
    class LooksTheSame(SmallConvNet):  # the same parameter names: it would load without a word
        pass

    with pytest.raises(ThawError, match="was trained on tests.conftest.SmallConvNet, not .*LooksTheSame; pass the same architecture"):
        load_run(object_run[0], model=LooksTheSame())


def test_a_resume_with_other_groups_is_refused(object_run: tuple[Path, dict]) -> None:
    # The plan's selectors (two-phase's "all" here, "-2:" elsewhere) would apply to other layers without a word.
    regrouped = adapt(SmallConvNet(), num_classes=3, groups={"stem": ["stem", "block1"], "top": ["block2"]})
    with pytest.raises(ThawError, match="different now: model-groups"):
        resume_run(object_run[0], model=regrouped)


def test_a_resume_needs_the_same_architecture(object_run: tuple[Path, dict]) -> None:
    run, best = object_run
    with pytest.raises(ThawError, match=r"resume_run\("):
        resume_run(run)
    with pytest.raises(ThawError, match="not torch.nn.modules.container.Sequential; pass the same architecture"):
        resume_run(run, model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)))
    again = resume_run(run, model=SmallConvNet())  # a finished run: nothing left to train, the same model delivered
    assert again.best["epoch"] == best["epoch"] and again.best["val"]["accuracy"] == best["val"]["accuracy"]


def test_an_adapter_must_have_a_head_per_class_and_objects_take_no_weights_name(tiny_split_data: Path, tmp_path: Path) -> None:
    adapter = adapt(SmallConvNet(), num_classes=5)
    with pytest.raises(ThawError, match="the adapter's head has 5 outputs and the data 3 classes"):
        train_images(tiny_split_data, model=adapter, out=tmp_path / "a", config=CONFIG, **PLAN)
    with pytest.raises(ThawError, match="goes with a model name; a model object brings its own weights"):
        train_images(tiny_split_data, model=SmallConvNet(), weights="IMAGENET1K_V1", out=tmp_path / "b", config=CONFIG, **PLAN)
    with pytest.raises(ThawError, match="model must be a name like 'mobilenet_v2'"):
        train_images(tiny_split_data, model=Path("mobilenet_v2"), out=tmp_path / "c", config=CONFIG, **PLAN)  # type: ignore[arg-type]
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_adapter_with_a_head_per_class_trains_as_given(tiny_split_data: Path, tmp_path: Path) -> None:
    adapter = adapt(SmallConvNet(), num_classes=3)
    head = adapter.model.get_submodule(adapter.head_name)
    train_images(tiny_split_data, model=adapter, out=tmp_path / "run", config=CONFIG, **PLAN)
    assert adapter.model.get_submodule(adapter.head_name) is head  # the user's own head, not a new one
    assert load_run(tmp_path / "run", model=adapt(SmallConvNet(), num_classes=3))[0].num_classes == 3


class EpochLogger:
    """A callback class whose instances are the callbacks: passed itself, it was called with the state and refused it."""

    def __call__(self, state: object) -> None:
        pass


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"plan": "two-phase", "plan_options": {"epoch": 1}}, "unknown plan option 'epoch' (did you mean 'epochs'?)"),
        ({"config": {"batch_size": 8}}, "config must be a TrainConfig"),
        ({"plan": 3}, "plan must be a strategy name like 'two-phase' or a Plan"),
        ({"val_split": "0.2"}, "val_split must be a number like 0.2, got '0.2'"),
        ({"val_split": True}, "val_split must be a number like 0.2, got True"),
        ({"val_split": 1.5}, "val_split must be a share above 0 and below 1, like 0.2, got 1.5"),  # unread beside val/: ran unsaid
        ({"val_split": 0}, "val_split must be a share above 0 and below 1, like 0.2, got 0.0"),
        # The data has a val folder, which is the val split: a share given beside it was unread, unsaid, from Python.
        ({"val_split": 0.3}, "val_split (--val-split) 0.3 would do nothing: "),
        ({"val_split": 0.3, "resume": True}, "val_split (--val-split) 0.3 would do nothing: "),  # nothing to resume: a new run
        ({"callbacks": print}, "callbacks must be a list of functions, got <built-in function print>"),
        ({"step_hooks": ["not a function"]}, "step_hooks must be a list of functions, got ['not a function']"),
        # A hook that cannot take its arguments failed as a TypeError after the first epoch, the run folder left unfinished.
        ({"callbacks": [lambda: None]}, "callbacks[0] (<lambda>) cannot be called as callback(state): too many positional arguments"),
        ({"callbacks": [EpochLogger]}, "callbacks[0] (EpochLogger) cannot be called as callback(state): too many positional arguments; pass an instance, not the class"),
        ({"step_hooks": [lambda: None]}, "step_hooks[0] (<lambda>) cannot be called as hook(optimizer, step, lr_multiplier): too many positional arguments"),
        ({"out": None}, "out must be a path (a str or pathlib.Path) that is not empty, got None"),
        ({"out": ""}, "out must be a path (a str or pathlib.Path) that is not empty, got ''"),
        ({"resume": "false"}, "resume must be True or False, got 'false'"),
        ({"weights": 1}, "weights must be a weights name like 'IMAGENET1K_V1', a file's path, or None, got 1"),  # pathlib's TypeError
        # a string was read letter by letter (unknown plan options 'e', 'p', ...); a dict for lora an AttributeError
        ({"plan": "two-phase", "plan_options": ""}, "plan_options must be a dict of build_plan's options, like {'epochs': 3}, got ''"),
        ({"plan": "two-phase", "plan_options": "epochs=1"}, "plan_options must be a dict of build_plan's options, like {'epochs': 3}, got 'epochs=1'"),
        ({"plan": "lora", "plan_options": {"lora": {"rank": 4}}}, "lora must be a LoraSpec (thaw.models.lora.LoraSpec(rank=4)), got {'rank': 4}"),
    ],
)
def test_the_python_entry_says_what_is_wrong_in_one_line(tiny_split_data: Path, tmp_path: Path, options: dict, expected: str) -> None:
    # Python's own errors here were a TypeError or AttributeError from deep inside, after the data was read.
    with pytest.raises(ThawError, match=re.escape(expected)):
        train_images(tiny_split_data, model=SmallConvNet(), **({"config": CONFIG, "out": tmp_path / "run"} | options))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "network, why",
    [
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)),
         "Invalid channel dimensions); thaw feeds it 3-channel images: change its first layer to take 3 channels"),
        (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10)),
         "a and b must have same reduction dim, but got [2, 3072] X [12288, 3].); a layer is sized for another image size"),
    ],
)
def test_a_model_that_takes_no_rgb_image_at_the_runs_size_is_one_line_before_any_work(
    tiny_split_data: Path, tmp_path: Path, network, why: str
) -> None:
    # torch's own error came once the features were being cached, and left an empty run folder
    with pytest.raises(ThawError, match=r"^torch.nn.modules.container.Sequential cannot take a batch of RGB images of 32 px \(.*" + re.escape(why)):
        train_images(tiny_split_data, model=network(), out=tmp_path / "run", config=CONFIG, **PLAN)
    assert not (tmp_path / "run").exists()


class CountsItsActivations(torch.nn.Module):
    """Trains on real images; its forward uses nonzero, which the meta device cannot run: the check must let it train."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        return self.head(features) + 0.0 * features.nonzero().shape[0]


def test_a_model_whose_forward_the_meta_device_cannot_run_still_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    train_images(tiny_split_data, model=CountsItsActivations(), out=tmp_path / "run", config=CONFIG, **PLAN)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_torch_device_is_refused_before_any_training() -> None:
    # it trained the whole run, then thaw.json could not record it: the run was left unfinished
    with pytest.raises(ThawError, match=re.escape("device must be a name like 'cpu' or 'cuda:0' (str(device) gives one), got device(type='cpu')")):
        TrainConfig(device=torch.device("cpu"))  # type: ignore[arg-type]


def test_overwrite_as_a_string_is_refused_and_the_finished_run_is_kept(tiny_split_data: Path, tmp_path: Path) -> None:
    train_images(tiny_split_data, model=SmallConvNet(), out=tmp_path / "run", config=CONFIG, **PLAN)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    # "no" is true in Python: it replaced the finished run
    with pytest.raises(ThawError, match=re.escape("overwrite must be True or False, got 'no'")):
        train_images(tiny_split_data, model=SmallConvNet(), out=tmp_path / "run", config=CONFIG, overwrite="no", **PLAN)  # type: ignore[arg-type]
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    # numpy's bools and 0/1 (a sweep read from a table) are switches as before
    train_images(tiny_split_data, model=SmallConvNet(), out=tmp_path / "run", config=CONFIG, overwrite=np.bool_(True), **PLAN)
    train_images(tiny_split_data, model=SmallConvNet(), out=tmp_path / "other", config=CONFIG, overwrite=0, resume=False, **PLAN)


def test_the_text_and_resume_entries_check_their_arguments_too(tmp_path: Path) -> None:
    with pytest.raises(ThawError, match=re.escape("test_split must be a number like 0.2, got None")):
        train_text(tmp_path / "t.csv", model="unused", out=tmp_path / "run", test_split=None)  # type: ignore[arg-type]
    with pytest.raises(ThawError, match=re.escape("data_path must be a path (a str or pathlib.Path) that is not empty, got 3")):
        train_text(3, model="unused", out=tmp_path / "run")  # type: ignore[arg-type]
    with pytest.raises(ThawError, match=re.escape("callbacks must be a list of functions, got 'print'")):
        resume_run(tmp_path, callbacks="print")  # type: ignore[arg-type]
    with pytest.raises(ThawError, match=re.escape("overwrite must be True or False, got 'yes'")):
        train_text(tmp_path / "t.csv", model="unused", out=tmp_path / "run", overwrite="yes")  # type: ignore[arg-type]
    for model in (None, "", 3):  # None was looked up on the hub as a model named 'None'
        with pytest.raises(ThawError, match=re.escape(f"model must be a text encoder's folder or hub ID, like hf/sentence-transformers/all-MiniLM-L6-v2, got {model!r}")):
            train_text(tmp_path / "t.csv", model=model, out=tmp_path / "run")  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("count", [1, 0, 2.0, "3"])
def test_a_head_needs_a_whole_number_of_two_classes_or_more(count: object) -> None:
    with pytest.raises(ThawError, match="num_classes must be a whole number of at least 2"):
        adapt(SmallConvNet(), num_classes=count)  # type: ignore[arg-type]


def test_thaws_loop_stops_at_a_stage_whose_trainable_parameter_gets_no_gradient(tiny_split_data: Path, tmp_path: Path) -> None:
    # The plan says the unused layer trains and it never would: the run stops at the stage's first step, naming it.
    class WithUnusedLayer(SmallConvNet):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Conv2d(16, 16, 1)  # a leftover auxiliary head, say: the forward never calls it

    torch.manual_seed(0)
    adapter = adapt(WithUnusedLayer(), head="classifier.2", num_classes=3)
    with pytest.raises(ThawError, match=r"first step of stage 'all'.*no gradient \(unused.weight, unused.bias\)"):
        train_images(tiny_split_data, model=adapter, out=tmp_path / "run", config=CONFIG, **PLAN)


def test_thaw_train_resume_on_an_object_run_says_to_use_python(object_run: tuple[Path, dict]) -> None:
    for extra in ([], ["--epochs", "2"]):  # typed plan options would rebuild the model by its name first
        result = thaw("train", "--resume", str(object_run[0]), *extra)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "trained on a model object (tests.conftest.SmallConvNet)" in result.stderr and "resume_run(" in result.stderr


class DictOutputNet(SmallConvNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": super().forward(x)}


class TupleOutputNet(SmallConvNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(x), x.mean(dim=(2, 3))


@pytest.mark.parametrize("network, said", [(DictOutputNet, "returns a dict"), (TupleOutputNet, "returns a tuple")])
def test_a_model_whose_forward_returns_no_logits_tensor_is_refused_before_any_training(
    network: type[SmallConvNet], said: str, tiny_split_data: Path, tmp_path: Path
) -> None:
    # Before: the head stage trained on cached features (the head's own output is a tensor), and the first stage that
    # ran the whole network died on `dict.float()`, a traceback after the head's epochs.
    with pytest.raises(ThawError, match=f"{network.__name__}'s forward {said}; .* wrap the model"):
        train_images(tiny_split_data, model=network(), out=tmp_path / "run", config=CONFIG, **PLAN)
    with pytest.raises(ThawError, match=said):
        train_images(tiny_split_data, model=adapt(network(), num_classes=3), out=tmp_path / "run", config=CONFIG, **PLAN)
    assert not (tmp_path / "run").exists()


def test_an_unfinished_model_object_run_says_to_finish_it_from_python(tiny_split_data: Path, tmp_path: Path) -> None:
    # The command line cannot rebuild such a model, so `thaw train --resume RUN` would be the wrong advice.
    from tests.conftest import Crash, crash_after
    from thaw.export.run_dir import read_metadata

    with pytest.raises(Crash):
        train_images(tiny_split_data, model=SmallConvNet(), out=tmp_path / "run", config=CONFIG, callbacks=[crash_after(1)], **PLAN)
    with pytest.raises(ThawError, match=re.escape(f"is an unfinished run (a checkpoint, no thaw.json yet): finish it with resume_run('{tmp_path / 'run'}', model=...)")):
        read_metadata(tmp_path / "run")


def test_a_numpy_share_and_a_tuple_of_callbacks_are_taken_and_the_run_is_written(tiny_split_data: Path, tmp_path: Path) -> None:
    # numpy's float32 passed the type check, trained, then failed to be written into thaw.json: the run lost its end.
    seen: list[int] = []
    train_images(tiny_split_data / "train", model=SmallConvNet(), out=tmp_path / "run", config=CONFIG, val_split=np.float32(0.3),
                 callbacks=(lambda state: seen.append(len(state.history)),), **PLAN)
    meta = json.loads((tmp_path / "run" / "thaw.json").read_text())
    assert seen == [1, 2] and meta["val_split"] == pytest.approx(0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_of_another_float_type_is_one_line_before_any_folder(
    object_run: tuple[Path, dict], tiny_split_data: Path, tmp_path: Path, dtype: torch.dtype,
) -> None:
    """model.double() met float32 images in torch's own words, deep in the first caching pass, and left an empty folder."""
    said = f"the model's weights are {str(dtype).removeprefix('torch.')} (stem.0.weight, first of them); thaw trains"
    adapter = adapt(SmallConvNet(), num_classes=3)
    adapter.model.to(dtype)
    for model in (SmallConvNet().to(dtype), adapter):  # a module, and an adapter made before the model was cast
        with pytest.raises(ThawError, match=re.escape(said) + r".*pass model.float\(\)"):
            train_images(tiny_split_data, model=model, config=CONFIG, out=tmp_path / "new", **PLAN)
        assert not (tmp_path / "new").exists()
    with pytest.raises(ThawError, match=re.escape(said)):
        load_run(object_run[0], model=SmallConvNet().to(dtype))
    adapter, _ = load_run(object_run[0], model=SmallConvNet().double().float())  # back to float32: loads
    assert next(adapter.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("plan", [{"plan": "feature-extract", "plan_options": {"head_epochs": 1}}, {"plan": "lora", "plan_options": {"epochs": 1}}])
def test_a_model_object_comes_back_as_plain_pytorch_after_its_run(tiny_split_data: Path, tmp_path: Path, plan: dict) -> None:
    """After a feature-extract run the object kept thaw's eval locks (BatchNorm stayed in eval mode in the user's own
    loop, its statistics fixed) and every layer but the head frozen; after a lora run, every weight but the adapters'
    (PEFT froze them as it added the adapters)."""
    torch.manual_seed(0)
    model = SmallConvNet(num_classes=10)
    model.stem[0].bias.requires_grad_(False)  # frozen by hand before the run: so it comes back
    train_images(tiny_split_data, model=model, out=tmp_path / "run", config=CONFIG, **plan)
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    assert [name.replace(".base_layer", "") for name in frozen] == ["stem.0.bias"]  # lora wraps layers as base_layer
    model.train()
    before = model.stem[1].running_mean.clone()
    model(torch.randn(4, 3, 32, 32) + 3)
    assert model.stem[1].training and not torch.equal(model.stem[1].running_mean, before)  # the user's loop updates it


def test_a_model_object_holds_the_last_step_trained_after_its_run(tiny_split_data: Path, tmp_path: Path) -> None:
    """As the README says: the weights of the last step (the last checkpoint's), not the delivered model's."""
    from thaw.train.checkpoint import load_checkpoint

    torch.manual_seed(0)
    model = SmallConvNet(num_classes=10)
    train_images(tiny_split_data, model=model, out=tmp_path / "run", config=CONFIG, **PLAN)
    last = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(tensor, last[name]) for name, tensor in model.state_dict().items())


def test_a_checkpoint_for_other_layer_groups_is_one_line_on_resume(tiny_split_data: Path, tmp_path: Path) -> None:
    """A run checkpointed while a torchvision ViT had 3 groups met 14 on resume: torch's ValueError, a traceback."""
    from tests.conftest import Crash, crash_after
    from thaw.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_images(tiny_split_data, model=SmallConvNet(num_classes=10), out=tmp_path / "run", config=CONFIG,
                     callbacks=[crash_after(2)], plan="fine-tune", plan_options={"epochs": 3})
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    saved["optimizer"]["param_groups"] = saved["optimizer"]["param_groups"][:-1]  # as if the model had one group less
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", saved)
    with pytest.raises(ThawError, match=r"holds an optimizer for other layer groups than this model has now .*start it again \(--overwrite\)$"):
        resume_run(tmp_path / "run", model=SmallConvNet())
