"""LoRA through PEFT: what trains, what is saved with the adapter, merging for export, text and vision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import write_class_images, write_text_table
from thaw.cli import main
from thaw.errors import ThawError
from thaw.export.formats import merge_adapters
from thaw.export.run_dir import ADAPTER, WEIGHTS, load_adapter, load_run
from thaw.models import ModelAdapter, build_model
from thaw.models.hf_text import build_text_model
from thaw.models.lora import LoraSpec, add_lora, adapter_param_names
from thaw.plan import Plan, plan_from_dict, plan_to_dict
from thaw.plan.lora_targets import lora_targets
from thaw.train import TrainConfig, train_images, train_text

QUICK = TrainConfig(batch_size=8, quiet=True, seed=1, image_size=32, augment=False)


@pytest.fixture
def lora_run(tmp_path: Path, torch_home: Path) -> tuple[Path, Path]:
    """A resnet18 LoRA run whose BatchNorm statistics train (the case PEFT once saved wrong)."""
    data = write_class_images(tmp_path / "data", per_class=10, size=32)
    run = tmp_path / "run"
    plan_options = {"epochs": 2, "batchnorm": "train", "lora": LoraSpec(rank=4)}
    train_images(data, model="resnet18", weights=None, out=run, plan="lora", plan_options=plan_options, config=QUICK)
    return data, run


def _base_with_adapter(run: Path, with_batchnorm: bool) -> torch.nn.Module:
    torch.manual_seed(QUICK.seed)  # the run's base weights: same seed, same initialisation
    adapter = build_model("resnet18", weights=None, num_classes=3)
    add_lora(adapter, LoraSpec(rank=4))
    if with_batchnorm:
        load_adapter(adapter, run / ADAPTER)
    else:  # what PEFT users once got: everything but the BatchNorm statistics
        saved = load_file(str(run / ADAPTER))
        adapter.model.load_state_dict({k: v for k, v in saved.items() if "running" not in k and "num_batches" not in k}, strict=False)
    return adapter.model.eval()


def test_lora_trains_adapters_and_head_only(lora_run: tuple[Path, Path]) -> None:
    _, run = lora_run
    torch.manual_seed(QUICK.seed)
    initial = build_model("resnet18", weights=None, num_classes=3).model.state_dict()
    trained = load_file(str(run / "model.safetensors"))
    conv = "layer4.1.conv2"
    assert torch.equal(initial[f"{conv}.weight"], trained[f"{conv}.base_layer.weight"])  # the pretrained weight never moves
    assert trained[f"{conv}.lora_B.default.weight"].abs().sum() > 0  # B starts at zero, so it trained
    assert not torch.equal(initial["fc.weight"], trained["fc.weight"])


def test_adapter_file_restores_the_model_including_batchnorm_statistics(lora_run: tuple[Path, Path]) -> None:
    _, run = lora_run
    saved = load_file(str(run / ADAPTER))
    assert any(k.endswith("running_mean") for k in saved) and any("lora_A" in k for k in saved) and "fc.weight" in saved
    assert not any(k.endswith("base_layer.weight") for k in saved)  # only what changed, not the base model
    adapted, _ = load_run(run)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = adapted.model(images)
        assert torch.equal(_base_with_adapter(run, with_batchnorm=True)(images), expected)
        # Without the statistics the reloaded model differs: why they are part of the adapter.
        assert not torch.allclose(_base_with_adapter(run, with_batchnorm=False)(images), expected, atol=1e-3)


def test_adapter_file_records_its_classes_and_load_adapter_returns_them(lora_run: tuple[Path, Path]) -> None:
    _, run = lora_run
    meta = json.loads((run / "thaw.json").read_text())
    assert load_adapter(_base_model(LoraSpec(rank=4)), run / ADAPTER) == meta["classes"] == ["blue", "green", "red"]
    assert load_adapter(_base_model(LoraSpec(rank=4)), run / ADAPTER, classes=tuple(meta["classes"])) == meta["classes"]


def _refused_in_one_line(match: str, *args: object, **kwargs: object) -> None:
    with pytest.raises(ThawError, match=match) as refused:
        load_adapter(*args, **kwargs)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("classes", "position"),
    [
        (["green", "blue", "red"], "class 0 is 'green' in the classes given and 'blue'"),
        (["blue", "green", "fox"], "class 2 is 'fox' in the classes given and 'red'"),  # a rename, or another run's
        (["blue", "green"], "class 2 is no name"),
    ],
    ids=["reordered", "renamed", "one fewer"],
)
def test_load_adapter_refuses_classes_the_adapter_was_not_trained_on(lora_run: tuple[Path, Path], classes: list[str], position: str) -> None:
    _, run = lora_run
    base = _base_model(LoraSpec(rank=4))
    before = {name: tensor.clone() for name, tensor in base.model.state_dict().items()}
    _refused_in_one_line(f"was trained on other classes: {position}", base, run / ADAPTER, classes=classes)
    assert all(torch.equal(before[name], tensor) for name, tensor in base.model.state_dict().items())  # nothing half-loaded


def test_load_adapter_refuses_a_model_of_another_shape_in_one_line(lora_run: tuple[Path, Path]) -> None:
    _, run = lora_run
    torch.manual_seed(QUICK.seed)
    four_classes = add_lora(build_model("resnet18", weights=None, num_classes=4), LoraSpec(rank=4))
    match = "trained on 3 classes and this model's head has 4 outputs; build the model with num_classes=3"
    _refused_in_one_line(match, four_classes, run / ADAPTER)
    _refused_in_one_line("lora_A.default.weight of shape \\(4, .*this model's is \\(8, .*same LoRA options", _base_model(LoraSpec(rank=8)), run / ADAPTER)
    _refused_in_one_line("holds tensors this model lacks .*lora_", build_model("resnet18", weights=None, num_classes=3), run / ADAPTER)
    _refused_in_one_line("takes the base model as a ModelAdapter", _base_model(LoraSpec(rank=4)).model, run / ADAPTER)
    for classes in ("bgr", {"blue", "green", "red"}, 3):  # one-letter names; no order; not names at all
        _refused_in_one_line(f"classes must be a list of class names in head order, got {type(classes).__name__} ", _base_model(LoraSpec(rank=4)), run / ADAPTER, classes=classes)


def test_an_adapter_onto_a_model_with_more_lora_targets_says_to_build_it_with_the_runs(tmp_path: Path, torch_home: Path) -> None:
    data = write_class_images(tmp_path / "data", per_class=6, size=32)
    spec = LoraSpec(rank=4, targets=("layer4",))
    train_images(data, model="resnet18", weights=None, out=tmp_path / "run", plan="lora", plan_options={"epochs": 1, "lora": spec}, config=QUICK)
    _refused_in_one_line("lacks adapter weights this model has .*build the model with the LoRA options of the run that wrote it \\(its targets\\)",
                         _base_model(LoraSpec(rank=4)), tmp_path / "run" / ADAPTER)
    assert load_adapter(_base_model(spec), tmp_path / "run" / ADAPTER) == ["blue", "green", "red"]


def test_lora_targets_inside_the_head_are_refused() -> None:
    adapter = build_model("resnet18", weights=None, num_classes=3, device="meta")
    with pytest.raises(ThawError, match="LoRA targets inside the head \\(fc\\): the new head trains in full"):
        add_lora(adapter, LoraSpec(rank=4), ["fc", "layer4.1.conv2"])


def test_load_adapter_says_what_is_wrong_with_a_missing_or_damaged_file(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = lora_run
    base = _base_model(LoraSpec(rank=4))
    _refused_in_one_line("no adapter file at .*; pass the adapter.safetensors a LoRA run wrote", base, tmp_path / "nothing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((run / ADAPTER).read_bytes()[:200])
    _refused_in_one_line("cut.safetensors is damaged", base, cut)
    tensors = load_file(str(run / ADAPTER))
    odd = tmp_path / "odd.safetensors"
    for header in ({"thaw.classes": "not json"}, {"thaw.classes": json.dumps({"red": 0})}):
        save_file(tensors, str(odd), metadata=header)
        match = "odd.safetensors is damaged \\(its header's thaw.classes is not a list of class names\\)"
        _refused_in_one_line(match, base, odd, classes=["blue", "green", "red"])
    save_file(tensors, str(odd), metadata={"thaw.classes": json.dumps(["blue", "red", "blue"])})  # two outputs, one name
    _refused_in_one_line("odd.safetensors is damaged \\(its header's thaw.classes names 'blue' more than once\\)", base, odd)
    for missing in (None, 3):
        _refused_in_one_line(f"load_adapter takes the path of an adapter.safetensors file, got {type(missing).__name__} {missing}$", base, missing)
    for names in (["a", "b"], ["a", "b", "c", "d"]):  # the header would name outputs the head lacks, or leave one unnamed
        save_file(tensors, str(odd), metadata={"thaw.classes": json.dumps(names)})
        _refused_in_one_line(f"odd.safetensors is damaged \\(its header names {len(names)} classes, its head has 3 outputs\\)", base, odd)
    record = {"thaw.classes": json.dumps(["blue", "green", "red"])}
    save_file({k: v for k, v in tensors.items() if not k.startswith("fc.")}, str(odd), metadata=record)  # loaded, the head would stay random
    _refused_in_one_line("odd.safetensors lacks the head \\(fc.bias, fc.weight\\), which an adapter file always holds; retrain", base, odd)
    save_file({k: v for k, v in tensors.items() if "lora_A" not in k}, str(odd), metadata=record)  # the adaptation half lost
    _refused_in_one_line("odd.safetensors lacks adapter weights this model has \\(.*lora_A.*in all\\); build the model with the LoRA", base, odd)
    save_file(tensors | {"fc.weight": torch.tensor(1.0)}, str(odd), metadata=record)  # a 0-d head: no outputs to count
    _refused_in_one_line("odd.safetensors holds fc.weight of shape \\(\\), this model's is \\(3, 512\\)", base, odd)
    untouched = _base_model(LoraSpec(rank=4)).model.state_dict()
    assert all(torch.equal(untouched[name], tensor) for name, tensor in base.model.state_dict().items())  # nothing half-loaded


def test_an_adapter_saved_before_classes_were_recorded_loads_as_before(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = lora_run
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(run / ADAPTER)), str(older), metadata={"format": "thaw-lora/1"})
    recorded, unrecorded = _base_model(LoraSpec(rank=4)), _base_model(LoraSpec(rank=4))
    assert load_adapter(recorded, run / ADAPTER) is not None
    assert load_adapter(unrecorded, older, classes=["any", "names", "here"]) is None  # nothing to check them against
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(recorded.model.eval()(images), unrecorded.model.eval()(images))


def test_export_merges_the_adapter_and_outputs_match(lora_run: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    _, run = lora_run
    adapter, _ = load_run(run)
    difference = merge_adapters(adapter)
    assert difference is not None and difference < 1e-4
    assert not adapter_param_names(adapter.model)  # plain layers again
    assert all("base_layer" not in name for name in adapter.model.state_dict())
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert "outputs match PyTorch" in capsys.readouterr().out


def test_lora_on_a_text_encoder_adapts_attention_query_and_value(tmp_path: Path, tiny_encoder: Path) -> None:
    table = write_text_table(tmp_path / "t.tsv")
    run = tmp_path / "run"
    train_text(table, model=str(tiny_encoder), out=run, plan="lora", plan_options={"epochs": 1}, config=TrainConfig(batch_size=8, quiet=True))
    adapter, meta = load_run(run)
    names = adapter_param_names(adapter.model)
    assert names and {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names} == {"query", "value"}
    saved = load_file(str(run / ADAPTER))
    assert set(saved) == set(names) | {"head.weight", "head.bias"}
    assert meta["plan"]["lora"]["rank"] == 8
    with safe_open(str(run / ADAPTER), framework="pt") as opened:  # the text run's classes, in head order, as for images
        assert json.loads(opened.metadata()["thaw.classes"]) == meta["classes"] == ["ham", "spam"]
    base = add_lora(build_text_model(str(tiny_encoder), num_classes=2), LoraSpec(**meta["plan"]["lora"]))
    assert load_adapter(base, run / ADAPTER, classes=["ham", "spam"]) == ["ham", "spam"]
    with pytest.raises(ThawError, match="was trained on other classes: class 0 is 'spam' in the classes given and 'ham'"):
        load_adapter(base, run / ADAPTER, classes=["spam", "ham"])


def test_plan_reports_adapter_parameters_in_their_groups(capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--model", "resnet18", "--num-classes", "3", "--strategy", "lora", "--lora-rank", "4", "--lora-targets", "layer4", "--json"]
    assert main(args) == 0
    (stage,) = json.loads(capsys.readouterr().out)["stages"]
    groups = {g["name"]: g for g in stage["groups"]}
    assert groups["layer4"]["trainable"] > 0 and groups["layer3"]["trainable"] == 0
    assert groups["head"]["trainable"] == groups["head"]["params"]
    assert stage["trainable_params"] == groups["layer4"]["trainable"] + groups["head"]["trainable"]


def test_lora_targets_that_match_no_layer_are_refused() -> None:
    adapter = build_model("resnet18", weights=None, num_classes=3, device="meta")
    with pytest.raises(ThawError, match="select no Linear or Conv2d layer outside the head"):
        lora_targets(adapter, LoraSpec(targets=("fc",)))


def test_add_lora_refuses_selectors_it_was_not_given_resolved() -> None:
    adapter = build_model("resnet18", weights=None, num_classes=3, device="meta")
    with pytest.raises(ThawError, match="resolve them first"):  # not silently the default targets instead
        add_lora(adapter, LoraSpec(targets=("layer4",)))
    add_lora(adapter, LoraSpec(targets=("layer4",)), lora_targets(adapter, LoraSpec(targets=("layer4",))))
    assert adapter.lora_targets and all(name.startswith("layer4.") for name in adapter.lora_targets)


def test_lora_plans_round_trip_through_yaml_and_reject_unknown_keys() -> None:
    plan = plan_from_dict({"stages": [{"name": "lora", "epochs": 2, "train": ["head", "adapters"]}], "lora": {"rank": 4, "targets": ["layer4"]}})
    assert plan.lora == LoraSpec(rank=4, targets=("layer4",))
    assert plan_from_dict(plan_to_dict(plan)) == plan
    with pytest.raises(ThawError, match="unknown key 'rnak' \\(did you mean 'rank'\\?\\)"):
        plan_from_dict({"stages": [{"name": "s", "epochs": 1}], "lora": {"rnak": 4}})


def test_adapters_selector_without_lora_says_what_to_do() -> None:
    adapter = build_model("resnet18", weights=None, num_classes=3, device="meta")
    from thaw.plan.selectors import resolve

    with pytest.raises(ThawError, match=r"no LoRA layers; use the lora strategy \(plan .lora., --strategy lora\)"):
        resolve(adapter, ["adapters"])


def test_lora_defaults_adapt_every_transformer_block_of_a_timm_vit() -> None:
    adapter = build_model("timm/vit_tiny_patch16_224", weights=None, num_classes=3, device="meta")
    add_lora(adapter, LoraSpec(rank=4))
    names = set(adapter_param_names(adapter.model))
    for group in adapter.groups:
        if group.name.startswith("blocks."):
            assert any(p in names for p in group.params), group.name  # qkv, proj and the MLP's Linear layers
    assert not any(p in names for p in adapter.group("head").params)  # the head trains in full instead


def _stage(name: str, train: list[str], **options: str) -> dict:
    return {"name": name, "epochs": 1, "train": train, **options}


# Every shape of LoRA plan the config accepts: what trains besides the adapters decides what the adapter file must hold.
LORA_PLANS: dict[str, dict] = {
    "lora strategy": {},
    "adapters and head, batchnorm train": {"stages": [_stage("lora", ["adapters", "head"], batchnorm="train")]},
    "adapters, head and layer4": {"stages": [_stage("lora", ["adapters", "head", "layer4"])]},
    "adapters, head and norm, batchnorm eval": {"stages": [_stage("lora", ["adapters", "head", "norm"], batchnorm="eval")]},
    "two stages, the second trains layer4": {
        "stages": [_stage("lora", ["adapters", "head"]), _stage("deeper", ["adapters", "head", "layer4"])],
        "lora": {"rank": 4, "targets": ["layer3", "layer4"]},  # layer4's base weights move under its adapters
    },
}


def _lora_plan(shape: dict) -> Plan | str:
    return plan_from_dict(shape | {"lora": shape.get("lora", {"rank": 4})}) if shape else "lora"


def _base_model(spec: LoraSpec) -> ModelAdapter:
    """What a user of the adapter file starts from: the base weights (same seed as the run) with the same LoRA layers."""
    torch.manual_seed(QUICK.seed)
    adapter = build_model("resnet18", weights=None, num_classes=3)
    return add_lora(adapter, spec, lora_targets(adapter, spec))


@pytest.mark.parametrize("shape", list(LORA_PLANS), ids=list(LORA_PLANS))
def test_base_weights_plus_adapter_file_are_the_trained_model(shape: str, tmp_path: Path, torch_home: Path) -> None:
    data = write_class_images(tmp_path / "data", per_class=6, size=32)
    plan = _lora_plan(LORA_PLANS[shape])
    options = {"epochs": 1, "lora": LoraSpec(rank=4)} if plan == "lora" else None
    train_images(data, model="resnet18", weights=None, out=tmp_path / "run", plan=plan, plan_options=options, config=QUICK)
    trained_model, meta = load_run(tmp_path / "run")
    trained = load_file(str(tmp_path / "run" / WEIGHTS))
    rebuilt = _base_model(plan_from_dict(meta["plan"]).lora)
    base = {name: tensor.clone() for name, tensor in rebuilt.model.state_dict().items()}
    load_adapter(rebuilt, tmp_path / "run" / ADAPTER)

    rebuilt_state = rebuilt.model.state_dict()
    assert rebuilt_state.keys() == trained.keys()
    assert [name for name in trained if not torch.equal(rebuilt_state[name], trained[name])] == []  # none missing from the file
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.model.eval()(images), trained_model.model(images))
    # The file holds what changed, plus adapter weights and head (always), and nothing else of the base.
    changed = {name for name in trained if not torch.equal(trained[name], base[name])}
    always = set(adapter_param_names(rebuilt.model)) | set(rebuilt.group("head").params)
    assert set(load_file(str(tmp_path / "run" / ADAPTER))) == changed | always
    if "layer4" in shape:  # the case the adapter file once lost: a layer trained in full beside the adapters
        assert any(name.startswith("layer4.") and "lora_" not in name for name in changed)
