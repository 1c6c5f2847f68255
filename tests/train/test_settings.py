"""What a resume says of the typed options that contradict a run: each difference as the user typed it."""

from __future__ import annotations

from thaw.train.settings import differences

HEAD = {"name": "head", "epochs": 3, "train": ["head"]}
ALL = {"name": "all", "epochs": 3, "train": ["all"]}


def test_a_plan_that_differs_in_its_epochs_says_them_per_stage() -> None:
    """`--resume RUN --epochs 5` said only 'the plan', not what differs."""
    now = {"stages": [HEAD, ALL | {"epochs": 5}]}
    assert differences({"plan": {"stages": [HEAD, ALL]}}, {"plan": now}) == [
        "the plan's epochs per stage ['head', 'all'] (the run: [3, 3], now: [3, 5])"
    ]


def test_a_plan_that_differs_otherwise_names_what_differs() -> None:
    assert differences({"plan": {"stages": [HEAD, ALL]}}, {"plan": {"stages": [HEAD]}}) == [
        "the plan's stages (the run: ['head', 'all'], now: ['head'])"
    ]
    changed = {"stages": [HEAD, ALL | {"epochs": 4, "train": ["-2:"]}]}
    assert differences({"plan": {"stages": [HEAD, ALL]}}, {"plan": changed}) == ["the plan (epochs, train of its stages)"]
    assert differences({"plan": {"odd": 1}}, {"plan": {"odd": 2}}) == ["the plan"]  # a record of another shape


def test_a_resume_names_settings_as_a_user_types_them_not_as_python_prints_them() -> None:
    assert differences({"config": {"budget": None}}, {"config": {"budget": 30.0}}) == ["budget (the run: none, now: 30s)"]
    assert differences({"config": {"budget": 90.0}}, {"config": {"budget": 150.5}}) == ["budget (the run: 90s, now: 150.5s)"]
    assert differences({"config": {"budget": 1e6}}, {"config": {"budget": 60.0}}) == ["budget (the run: 1000000s, now: 60s)"]


def test_other_classes_are_named_gone_and_new() -> None:
    """A label renamed in the data (spam to junk) reads as one class gone and one new, so a user sees which."""
    assert differences({"classes": ["ham", "spam"]}, {"classes": ["ham", "junk"]}) == ["the classes ('spam' is gone, 'junk' is new)"]
    assert differences({"classes": ["a", "b"]}, {"classes": ["b", "a"]}) == ["the classes (the same classes in another order)"]
    many = [f"c{i}" for i in range(5)]
    assert differences({"classes": ["a"]}, {"classes": ["a", *many]}) == ["the classes ('c0', 'c1', 'c2' and 2 more are new)"]
    assert differences({"classes": ["a", "b"]}, {"classes": ["a", "b"]}) == []


def test_a_run_recorded_with_a_switch_that_was_not_a_bool_resumes_as_it_trained() -> None:
    # A thaw before the switches were checked recorded augment=1 and strict=0; TrainConfig now refuses those.
    from thaw.train.settings import config_from_settings

    config = config_from_settings({"config": {"augment": 1, "strict": 0, "cache": "yes", "batch_size": 8}})
    assert (config.augment, config.strict, config.cache, config.batch_size) == (True, False, True, 8)
