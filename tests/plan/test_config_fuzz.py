"""Any plan file: a Plan, or one ThawError line saying what is wrong. Never another exception.

Hypothesis gives every key of a plan (PLAN_KEYS, STAGE_KEYS, LORA_KEYS) values of every type:
None, bools, ints at and past their edges, NaN and infinities, strings, lists, mappings, nested junk,
mixed with plausible values so that valid plans are drawn too. A plan that parses must also
resolve against a real model's structure (or refuse in one line), and survive its own round trip.
"""

from __future__ import annotations

import functools
import math

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from thaw import ThawError, build_model, resolve_stage
from thaw.models.adapter import ModelAdapter
from thaw.models.lora import add_lora
from thaw.plan import Plan, plan_from_dict, plan_to_dict
from thaw.plan.config import LORA_KEYS, PLAN_KEYS, STAGE_KEYS
from thaw.plan.lora_targets import lora_targets

EDGE_NUMBERS = [0, 1, -1, 2, 10**12, 2**63, 10**400, 0.0, -0.0, 1e-3, 0.5, 1.0, 1.5, -0.01, 1e308, math.nan, math.inf, -math.inf]
WORDS = ["", "head", "all", "1e-3", "nan", "inf", "-1", "train", "eval", "frozen", "features.12", "-3:", "adapters", "norm",
         "batchnorm", "features.*", "classifier", "nowhere", "0:2"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGE_NUMBERS), st.integers(), st.floats(), st.sampled_from(WORDS), st.text(max_size=6)
)
JUNK = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
SELECTORS = st.sampled_from(["head", "all", "features.12", "-3:", "adapters", "norm", "batchnorm", "features.1*", "nowhere", 11])
PLAUSIBLE = {
    "name": st.sampled_from(["head", "all", "top", 3]),
    "epochs": st.integers(0, 3),
    "train": SELECTORS | st.lists(SELECTORS, min_size=1, max_size=3),
    "lr": st.sampled_from([1e-3, "1e-3", 0.1, 3]),
    "lr_range": st.sampled_from([[1e-5, 1e-3], ["1e-5", "1e-3"], [1e-3, 1e-3]]),
    "layer_decay": st.sampled_from([0.5, 1.0, 1, 0.75]),
    "lrs": st.sampled_from([{"head": 1e-3}, {"features.12": 1e-4, "head": 1e-3}, {"classifier.3": 1e-3}, {"all": 1e-3}]),
    "weight_decay": st.sampled_from([0, 0.0, 0.01, 0.05]),
    "batchnorm": st.sampled_from(["train", "eval", "frozen"]),
    "rank": st.sampled_from([1, 4, 8]),
    "alpha": st.sampled_from([1, 16, 32.0]),
    "dropout": st.sampled_from([0, 0.0, 0.1]),
    "targets": st.sampled_from([["features.12"], [], "classifier.0", ["features.1*", "classifier"]]),
}


def mostly(plausible: st.SearchStrategy, junk: st.SearchStrategy = JUNK) -> st.SearchStrategy:
    """A plausible value four times in five, anything at all otherwise: valid plans are drawn too."""
    return st.sampled_from((plausible,) * 4 + (junk,)).flatmap(lambda chosen: chosen)


def value_for(key: str) -> st.SearchStrategy:
    return mostly(PLAUSIBLE[key]) if key in PLAUSIBLE else JUNK


LR_KEYS = ("lr", "lr_range", "layer_decay", "lrs")
# Which of the lr keys a stage names: each rule alone four times in five; now and then two that clash.
LR_RULES = st.sampled_from(
    [(), ("lr",), ("lr_range",), ("lr", "layer_decay"), ("lrs",)] * 4 + [("lr", "lrs"), ("lr_range", "layer_decay")]
)


def mapping_over(keys: tuple[str, ...]) -> st.SearchStrategy:
    """A mapping with any of `keys` (and now and then an unknown one), each with a drawn value."""
    known = st.fixed_dictionaries({}, optional={key: value_for(key) for key in keys if key not in LR_KEYS})
    named = [key for key in keys if key in LR_KEYS]
    lrs = LR_RULES.flatmap(lambda rule: st.fixed_dictionaries({key: value_for(key) for key in rule})) if named else st.just({})
    unknown = mostly(st.just({}), st.dictionaries(st.sampled_from(["epoch", "lr_ragne", ""]), JUNK, min_size=1, max_size=1))
    return st.builds(lambda *parts: {k: v for part in parts for k, v in part.items()}, known, lrs, unknown)


STAGE = mapping_over(STAGE_KEYS)
LORA = mapping_over(LORA_KEYS)
PLAN = st.fixed_dictionaries(
    {"stages": mostly(st.lists(mostly(STAGE), min_size=1, max_size=3))},
    optional={key: (mostly(LORA) if key == "lora" else value_for(key)) for key in PLAN_KEYS if key != "stages"},
)


def assert_one_line(error: ThawError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)


@functools.cache
def plain_model() -> ModelAdapter:
    """Resolving needs a model's structure only: a meta-device MobileNetV3 (no weights, no memory)."""
    return build_model("mobilenet_v3_small", weights="none", num_classes=3, device="meta")


def resolves_or_refuses(plan: Plan) -> None:
    # resolve_stage leaves the model as it is; adding LoRA layers does not, so a LoRA plan gets its own.
    adapter = plain_model() if plan.lora is None else build_model("mobilenet_v3_small", weights="none", num_classes=3, device="meta")
    try:
        if plan.lora is not None:
            add_lora(adapter, plan.lora, lora_targets(adapter, plan.lora))
        for stage in plan.stages:
            resolve_stage(adapter, stage)
    except ThawError as error:
        assert_one_line(error)


@settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mostly(PLAN))
@example(raw={"stages": [{"name": "head", "epochs": 1}], "weight_decay": -0.1})
@example(raw={"stages": [{"name": "head", "epochs": 1, "weight_decay": math.nan}]})
@example(raw={"stages": [{"name": "head", "epochs": 0}, {"name": "all", "epochs": 0}]})
@example(raw={"stages": [{"name": "head", "epochs": 1, "lr": 10**400}]})
@example(raw={"stages": [{"name": "head", "epochs": 1, "train": 5}]})
@example(raw={"stages": [{"name": "lora", "epochs": 1, "train": ["head", "adapters"]}], "lora": {"rank": 8, "alpha": math.nan}})
@example(raw={"stages": [{"name": "lora", "epochs": 1, "train": ["head", "adapters"]}], "lora": {"rank": 2.5}})
@example(raw={"stages": [{"name": "lora", "epochs": 1, "train": ["head", "adapters"]}], "lora": {"targets": 5}})
def test_any_plan_parses_or_refuses_in_one_line(raw: object) -> None:
    try:
        plan = plan_from_dict(raw)
    except ThawError as error:
        event("refused")
        assert_one_line(error)
        return
    event("a plan" + (" with LoRA" if plan.lora else ""))
    assert plan_from_dict(plan_to_dict(plan)) == plan  # what a run records is the plan it ran
    resolves_or_refuses(plan)
