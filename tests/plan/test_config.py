from __future__ import annotations

from pathlib import Path

import pytest

from thaw import ThawError, build_model, load_plan, resolve_stage
from thaw.plan import DecayLr, ExplicitLr, RangeLr, plan_from_dict
from thaw.train import train_images

GOOD = """
weight_decay: 0.02
stages:
  - name: head
    epochs: 2
    train: head
    lr: 1e-3
  - name: top
    epochs: 1
    train: ["-3:"]
    lr_range: [1.0e-5, 5.0e-4]
  - name: everything
    epochs: 1
    train: [all]
    lr: 5e-4
    layer_decay: 0.7
    batchnorm: train
  - name: named
    epochs: 1
    train: [all]
    lrs: {conv1: 1e-6, layer1: 1e-5, layer2: 1e-5, layer3: 1e-4, layer4: 1e-4, fc: 1e-3}
"""


def test_yaml_plan_describes_any_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    plan = load_plan(path)
    assert [s.name for s in plan.stages] == ["head", "top", "everything", "named"]
    assert plan.stages[0].lr.lr == 1e-3 and plan.stages[0].weight_decay == 0.02
    assert plan.stages[1].lr == RangeLr(1e-5, 5e-4)
    assert plan.stages[2].lr == DecayLr(5e-4, 0.7) and plan.stages[2].batchnorm == "train"
    assert isinstance(plan.stages[3].lr, ExplicitLr)
    adapter = build_model("resnet50", num_classes=5, device="meta")
    assert resolve_stage(adapter, plan.stages[1]).trainable_params == 14_964_736 + 7_098_368 + 10_245
    # No batchnorm key: frozen (the README says so), which lets the trained groups' layers use batch statistics
    assert plan.stages[1].batchnorm == "frozen"
    policies = {group.name: group.batchnorm for group in resolve_stage(adapter, plan.stages[1]).groups}
    assert policies["layer4"] == "train" and policies["layer1"] == "frozen"


def test_a_stage_of_0_epochs_is_said_to_be_skipped(tmp_path: Path) -> None:
    """A YAML stage with epochs: 0 runs nothing; the plan said '0 epochs' and showed what it would train."""
    from thaw.plan import plan_report, render_plan

    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {name: head, epochs: 2, train: [head]}\n  - {name: all, epochs: 0, train: [all], lr: 1e-4}\n")
    said = render_plan(plan_report(build_model("resnet18", num_classes=3, device="meta"), load_plan(path), "resnet18"))
    assert "Stage 2/2 'all': 0 epochs (skipped: nothing trains in a stage of 0 epochs)" in said
    assert "Stage 1/2 'head': 2 epochs\n" in said


def _refusal(path: Path, text: str) -> str:
    """What load_plan says of a plan file holding `text`."""
    path.write_text(text)
    with pytest.raises(ThawError) as error:
        load_plan(path)
    return str(error.value)


def test_every_unknown_key_is_reported_at_once_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    message = _refusal(path, "stage_defaults: 1\nstages:\n  - name: a\n    epoch: 2\n    learning_rate: 1e-3\n    batchnrom: train\n")
    for wrong, right in [("epoch", "epochs"), ("batchnrom", "batchnorm")]:
        assert f"unknown key {wrong!r} (did you mean {right!r}?)" in message
    assert "'learning_rate'" in message and "'stage_defaults'" in message
    assert message.startswith(f"{path}: 4 problems")


def test_a_plan_file_names_itself_once_and_reports_its_stages_and_training_problems_together(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    message = _refusal(path, "stagse: [{name: a, epochs: 1, train: [all], lr: 1.0e-3}]\ntrainig: {budget: 3m}\n")
    assert message.count(str(path)) == 1
    assert "unknown key 'stagse' (did you mean 'stages'?)" in message and "unknown key 'trainig' (did you mean 'training'?)" in message
    path.write_text("stages: [{name: a, epochs: 1, train: [all], lr: 1.0e-3, epoch: 2}]\ntraining: {emma: true}\n")
    with pytest.raises(ThawError) as error:
        load_plan(path)
    message = str(error.value)
    assert "unknown key 'epoch' (did you mean 'epochs'?)" in message and "training: unknown key 'emma' (did you mean 'ema'?)" in message


def test_bad_values_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {epochs: -1, lr: fast, batchnorm: sometimes}\n")
    with pytest.raises(ThawError) as error:
        load_plan(path)
    assert "epochs" in str(error.value) and "lr: expected a number" in str(error.value)
    assert "batchnorm" in str(error.value)


def test_a_mapping_of_lrs_under_lr_points_to_lrs(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {name: top, epochs: 1, train: [all], lr: {features.18: 1.0e-4, head: 1.0e-3}}\n")
    with pytest.raises(ThawError, match=r"stages\[0\]\.lr: one lr for the stage; give each group its own under lrs, like lrs: "):
        load_plan(path)


def test_a_python_tag_in_a_plan_is_named_as_a_tag_and_never_run(tmp_path: Path) -> None:
    """Valid YAML that the safe loader will not construct: said as a tag to remove, not as broken indentation."""
    path, proof = tmp_path / "plan.yaml", tmp_path / "ran"
    path.write_text(f'stages: !!python/object/apply:os.system ["touch {proof}"]\n')
    with pytest.raises(ThawError) as refused:
        load_plan(path)
    assert str(refused.value) == f"{path} at line 1 holds a YAML tag thaw does not read; a plan holds plain values: remove it"
    assert not proof.exists()


@pytest.mark.parametrize(
    "text, said",
    [
        ("stages: !!float abc\n", "holds a value its YAML tag cannot make (could not convert string to float: 'abc'); remove the tag or fix the value"),
        ("? [a, b]\n: 1\n", "at line 1 holds what no plan holds (found unhashable key); a plan holds plain values: remove it"),
    ],
)
def test_a_plan_value_yaml_cannot_build_is_one_line(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ThawError) as refused:
        load_plan(path)
    assert str(refused.value) == f"{path} {said}"


@pytest.mark.parametrize("word, read_as", [("off", "False"), ("no", "False"), ("on", "True")])
@pytest.mark.parametrize("level", ["plan", "stage"])
def test_batchnorm_written_as_a_yaml_boolean_word_says_how_yaml_read_it(tmp_path: Path, word: str, read_as: str, level: str) -> None:
    path = tmp_path / "plan.yaml"
    stage = "{name: head, epochs: 1, train: [head], lr: 0.001" + (f", batchnorm: {word}" if level == "stage" else "") + "}"
    path.write_text((f"batchnorm: {word}\n" if level == "plan" else "") + f"stages:\n  - {stage}\n")
    with pytest.raises(ThawError) as refused:
        load_plan(path)
    where = "batchnorm" if level == "plan" else "stages[0].batchnorm"
    assert str(refused.value).endswith(
        f"{where}: expected one of frozen, train, eval, adapt, got {read_as} (YAML reads an unquoted off, no or false as "
        "false, and on, yes or true as true)"
    )


def test_a_stage_without_epochs_runs_one_and_without_an_lr_runs_at_1e_3() -> None:
    """The two defaults the README states for a plan file's stage."""
    stage = plan_from_dict({"stages": [{"name": "head", "train": ["head"]}]}).stages[0]
    assert stage.epochs == 1 and stage.lr.lr == 1e-3


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("stages: [\n  - a: b\n")
    with pytest.raises(ThawError, match="not valid YAML"):
        load_plan(path)
    with pytest.raises(ThawError, match="cannot read plan file"):
        load_plan(tmp_path / "missing.yaml")
    path.write_text("stages: " + "[" * 2000 + "]" * 2000 + "\n")  # PyYAML's recursion ran out: a RecursionError traceback
    with pytest.raises(ThawError, match=r"plan.yaml nests lists or mappings hundreds deep, which is no plan; see the README's plan file example$"):
        load_plan(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("weight_decay: -0.1\nstages: [{name: head, epochs: 1}]", "weight_decay: expected a weight decay >= 0 like 0.01, got -0.1"),
        ("batchnorm: Frozen\nstages: [{name: head, epochs: 1}]", "yaml: batchnorm: expected one of"),
        ("stages: [{name: head, epochs: 1, weight_decay: -1}]", "stages[0].weight_decay: expected a weight decay >= 0"),
        ("stages: [{name: head, epochs: 1, weight_decay: .nan}]", "stages[0].weight_decay: expected a finite number, got nan"),
        ("stages: [{name: head, epochs: 1, lr: 1e400}]", "stages[0].lr: expected a finite number, got '1e400'"),
        ("stages: [{name: head, epochs: 1, lr: 1.0e+300}]", "stages[0].lr: expected a positive lr up to 1000"),
        ("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-3, layer_decay: 1.5}]", "layer_decay: expected a decay in (0, 1]"),
        ("stages: [{name: top, epochs: 1, lr_range: [1.0e-3, 1.0e-5]}]", "lr_range: expected [low, high] from stem to head with low <="),
        ("stages: [{name: head, epochs: 1, lr: 1.0e-3, lrs: {head: 1.0e-3}}]", "lr and lrs both set the lrs; keep one"),
        ("stages: [{name: head, epochs: 0}, {name: all, epochs: 0}]", "every stage of the plan (head, all) has 0 epochs"),
        ("stages: [{name: lora, epochs: 1}]\nlora: {rank: 2.5}", "lora.rank: expected a whole number from 1 to 4096, got 2.5"),
        ("stages: [{name: head, epochs: 1" + "0" * 400 + "}]", "stages[0].epochs: expected a whole number from 0 to 1000000, got 100000000000... (401 characters)"),
        ("stages: [{name: lora, epochs: 1}]\nlora: {alpha: .nan, targets: {a: 1}}", "2 problems: lora.alpha: expected a finite number"),
    ],
)
def test_yaml_values_are_checked_as_flags_are(tmp_path: Path, text: str, expected: str) -> None:
    """A plan file cannot hold what `thaw train` refuses as a flag (a negative weight decay, an lr past float range, ...)."""
    path = tmp_path / "plan.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ThawError) as error:
        load_plan(path)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{path}: ") and str(error.value).count(str(path)) == 1  # named once, first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a second stages: would replace the first plan, unseen
        ("stages:\n  - {name: a, epochs: 1, train: [head]}\nstages:\n  - {name: b, epochs: 5, train: [all]}\n",
         "'stages' is written twice (lines 1 and 3); YAML would keep only the last: keep one"),
        ("stages:\n  - {name: a, epochs: 1, train: [head], lr: 1.0e-3, lr: 2.0e-3}\n", "'lr' is written twice (line 2)"),
    ],
)
def test_a_key_written_twice_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "plan.yaml").write_text(text)
    with pytest.raises(ThawError) as error:
        load_plan(tmp_path / "plan.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'plan.yaml'}: {expected}")


def test_a_merge_key_may_override_what_it_merges(tmp_path: Path) -> None:
    """`<<: *base` then a key of its own is YAML's way to override: not a key written twice."""
    (tmp_path / "plan.yaml").write_text("stages:\n  - &head {name: a, epochs: 1, train: [head]}\n  - {<<: *head, name: b, epochs: 2}\n")
    assert [(stage.name, stage.epochs) for stage in load_plan(tmp_path / "plan.yaml").stages] == [("a", 1), ("b", 2)]
    # an anchor that merges and overrides, merged in again later: PyYAML rewrites it in place, merged keys beside its own
    nested = "lrs:\n      <<: &lrs\n        <<: {head: 1.0e-3, layer4: 1.0e-4}\n        layer4: 2.0e-4\n      head: 5.0e-3\n"
    (tmp_path / "plan.yaml").write_text(f"stages:\n  - name: a\n    epochs: 1\n    {nested}  - {{name: b, epochs: 1, lrs: *lrs}}\n")
    first, second = load_plan(tmp_path / "plan.yaml").stages
    assert first.lr.by_name == {"head": 5.0e-3, "layer4": 2.0e-4} and second.lr.by_name == {"head": 1.0e-3, "layer4": 2.0e-4}


def test_two_stages_with_one_name_are_refused_with_the_files_name(tmp_path: Path) -> None:
    """The summary's delivered epoch, the budget's split and the progress name a stage by its name."""
    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {name: head, epochs: 1, train: [head]}\n  - {name: head, epochs: 1, train: [all], lr: 1.0e-4}\n")
    with pytest.raises(ThawError, match=rf"^{path}: stage names must differ: 'head' names more than one stage; rename them$"):
        load_plan(path)
    path.write_text("stages:\n  - {name: head, epochs: 1, train: [head]}\n  - {name: all, epochs: 1, train: [all], lr: 1.0e-4}\n")
    assert [stage.name for stage in load_plan(path).stages] == ["head", "all"]
    # A run made before the check still loads its saved plan; a new run of such a Plan is refused before any work.
    saved = plan_from_dict({"stages": [{"name": "head", "epochs": 1}, {"name": "head", "epochs": 1, "train": ["all"]}]})
    with pytest.raises(ThawError, match="stage names must differ"):
        train_images(tmp_path / "no-data", model="mobilenet_v3_small", weights=None, plan=saved, out=tmp_path / "run")


def test_a_run_made_before_names_had_to_differ_still_resumes(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tests.conftest import Crash, crash_after
    from thaw.train import TrainConfig, resume_run

    plan = plan_from_dict({"stages": [{"name": "head", "epochs": 1}, {"name": "head", "epochs": 1, "train": ["all"], "lr": 1.0e-4}]})
    monkeypatch.setattr(sys.modules["thaw.train"], "check_stage_names", lambda plan: None)  # as thaw did before the check
    with pytest.raises(Crash):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, out=tmp_path / "old",
                     config=TrainConfig(image_size=32, batch_size=8, quiet=True), callbacks=[crash_after(1)])
    monkeypatch.undo()
    assert len(resume_run(tmp_path / "old").history) == 2


@pytest.mark.parametrize("trained, refused", [
    ("[head]", True), ("[head, adapters]", False), ("[all]", False),
    ("[adapters], epochs: 0}\n  - {name: b, train: [head]", True),  # a stage of 0 epochs trains nothing
])
def test_a_lora_block_that_no_stage_trains_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: str, refused: bool) -> None:
    # The adapters were added and saved untrained (B = 0: they change nothing), the head alone trained, without a word.
    from thaw.cli import main

    path = tmp_path / "plan.yaml"
    path.write_text(f"stages:\n  - {{name: a, train: {trained}, epochs: 1}}\nlora: {{rank: 4}}\n")
    assert main(["plan", "--model", "mobilenet_v3_small", "--num-classes", "2", "--config", str(path)]) == (2 if refused else 0)
    said = capsys.readouterr().err.strip()
    expected = "thaw: error: the plan's lora: adds adapters that no stage trains; add 'adapters' to a stage's train list (as the lora strategy's [head, adapters]), or drop lora:"
    assert said == (expected if refused else "")
