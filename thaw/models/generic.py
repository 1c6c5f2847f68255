"""Adapters for any nn.Module, by the general structural rules or by names the user gives."""

from __future__ import annotations

from torch import nn

from thaw.errors import ThawError
from thaw.models import _structure
from thaw.models.adapter import ModelAdapter, Preprocessing, check_image_preprocessing, check_tied_within_groups


def adapt_module(
    model: nn.Module,
    *,
    num_classes: int | None = None,
    head: str | None = None,
    groups: dict[str, list[str]] | None = None,
    preprocessing: Preprocessing | None = None,
    family: str = "generic",
) -> ModelAdapter:
    """Wrap any classifier: the last Linear its forward calls is the head unless `head` names another module.

    `groups` maps group names (stem first) to module names; without it groups
    come from the model's structure (see thaw.models._structure).
    """
    # A hand-written model's __init__ may register its layers in another order than its forward calls them: the head
    # and the groups follow the forward where it runs on images. torchvision's registration order is its forward's.
    order = _structure.forward_order(model, preprocessing.crop_size if preprocessing else None) if family == "generic" else None
    head_name = head or (_structure.output_linear_name(model, order) if order else _structure.last_linear_name(model))
    _structure.check_head(model, head_name)
    if num_classes is not None:
        _structure.replace_head(model, head_name, num_classes)
    block = _structure.head_block(model, head_name)
    if groups:
        layer_groups = _structure.explicit_groups(model, groups, block)
    else:
        layer_groups = _structure.infer_groups(model, block, order)
    if family == "generic":  # a model built by hand; torchvision's ties none (all 80 classifiers, tested)
        check_tied_within_groups(model, layer_groups)
    features_fn, head_fn = _structure.hook_split(model, block)
    return ModelAdapter(
        model,
        family=family,
        head_name=head_name,
        groups=layer_groups,
        preprocessing=preprocessing or Preprocessing(),
        features_fn=features_fn,
        head_fn=head_fn,
    )


def is_timm_model(model: nn.Module) -> bool:
    return all(hasattr(model, attr) for attr in ("group_matcher", "reset_classifier", "forward_head"))


def is_torchvision_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models")


ADAPT_OPTIONS = ("num_classes", "head", "groups", "preprocessing", "family")  # adapt_module's


def adapt(model: nn.Module, **options: object) -> ModelAdapter:
    """The one entry point for a model you already built: picks the family's adapter."""
    if not isinstance(model, nn.Module):  # a name: build_model takes names, and "str has no parameters" said nothing
        raise ThawError(f"adapt takes a model you built (an nn.Module), got {model!r}; for a model by name use thaw.build_model")
    unknown = sorted(set(options) - set(ADAPT_OPTIONS))
    if unknown:  # a TypeError from the function adapt passes them to named neither
        raise ThawError(f"adapt takes {', '.join(ADAPT_OPTIONS)}; {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} none of them")
    if options.get("preprocessing") is not None:
        check_image_preprocessing(options["preprocessing"])
    if is_timm_model(model) and not options.get("head") and not options.get("groups"):
        from thaw.models.timm_models import adapt_timm

        if options.get("family") not in (None, "timm"):  # else it would be dropped without a word
            raise ThawError(f"a timm model is adapted by timm's own contract (family 'timm'), not {options['family']!r}: "
                            "drop family, or give head= and groups= to adapt it by hand")

        adapter = adapt_timm(model, num_classes=options.get("num_classes"))  # type: ignore[arg-type]
        if options.get("preprocessing") is not None:  # given by hand: it wins over timm's config, as for any family
            adapter.preprocessing = options["preprocessing"]  # type: ignore[assignment]
        return adapter
    if is_torchvision_model(model):
        from thaw.models.torchvision_models import adapt_torchvision

        return adapt_torchvision(model, **options)  # type: ignore[arg-type]
    return adapt_module(model, **options)  # type: ignore[arg-type]

