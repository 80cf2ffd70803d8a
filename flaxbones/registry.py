"""Name -> builder, with per-name metadata; the creation API lives here."""
import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Sequence

from flax import linen as nn

_BACKBONES: dict[str, "ModelSpec"] = {}
_MODELS: dict[str, "ModelSpec"] = {}
_CLASSIFIERS: list[tuple[str, Any]] = []


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a name: its builder, family and weight source (for a
    backbone, the source of its backbone keys and the normalisation its weights expect)."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    weights: Any = None  # a flaxbones.weights.WeightSource, or None


def register_backbone(family: str, weights=None):
    """Decorator: register `builder` (named as the function) as a backbone; `create_model`
    makes it a classifier with the head `flaxbones.classifiers` assigns to its name."""
    def wrap(builder):
        _add(_BACKBONES, ModelSpec(builder.__name__, builder, family, weights))
        return builder
    return wrap


def register_variants(family: str, variants: dict, weights=None):
    """Register several backbones at once: {name: builder}, e.g. `partial(ResNet, ...)`."""
    for name, builder in variants.items():
        _add(_BACKBONES, ModelSpec(name, builder, family, weights))


def register_model(family: str, weights=None):
    """Decorator: register a complete model builder (a segmenter preset, say)."""
    def wrap(builder):
        _add(_MODELS, ModelSpec(builder.__name__, builder, family, weights))
        return builder
    return wrap


def register_classifier(patterns: Sequence[str], preset):
    """Give the backbones matching `patterns` (globs) a classifier preset (see
    `flaxbones.classifiers`); the first registration matching a name wins."""
    _CLASSIFIERS.extend((pattern, preset) for pattern in patterns)


def classifier_preset(name: str):
    """The classifier preset of backbone `name` (a plain pooled-dense head by default)."""
    from flaxbones.classifiers import ClassifierPreset
    return next((p for pattern, p in _CLASSIFIERS if fnmatch.fnmatch(name, pattern)),
                ClassifierPreset())


def _origin(builder) -> tuple:
    """Where a builder is defined (a partial: its function and arguments): the same origin
    registered again is a notebook cell run twice or a module reloaded, not a clash."""
    func = getattr(builder, "func", builder)
    return (getattr(func, "__module__", None), getattr(func, "__qualname__", repr(func)),
            getattr(builder, "args", ()), getattr(builder, "keywords", {}))


def _add(table, spec):
    existing = _BACKBONES.get(spec.name) or _MODELS.get(spec.name)
    if existing is not None:
        if existing.family != spec.family or _origin(existing.builder) != _origin(spec.builder):
            where = ".".join(_origin(existing.builder)[:2])
            raise ValueError(f"model name {spec.name!r} is already registered (family "
                             f"{existing.family!r}, {where}); pick another name")
        (_BACKBONES if spec.name in _BACKBONES else _MODELS).pop(spec.name)
    table[spec.name] = spec


def _filter(names, pattern):
    return sorted(n for n in names if pattern is None or fnmatch.fnmatch(n, pattern))


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered backbone names, sorted.

    Args:
        pattern: A glob such as `'resnet*'` to filter the names by; None lists them all.

    Returns:
        The matching names, each one `create_backbone` (and, as a classifier,
            `create_model`) accepts.
    """
    return _filter(_BACKBONES, pattern)


def list_models(pattern: str | None = None) -> list[str]:
    """Every name `create_model` accepts: each backbone as a classifier, and full models.

    Args:
        pattern: A glob such as `'*deeplab*'` to filter the names by; None lists them all.

    Returns:
        The matching names, sorted.
    """
    return _filter([*_BACKBONES, *_MODELS], pattern)


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec of `name`: its builder, family and weight source.

    Its `weights` describe the files of `create_model(name)`: for a backbone name, the
    reference classifier's (backbone keys plus the head keys its classifier preset adds).

    Args:
        name: A registered backbone or model name (`list_models()`).

    Returns:
        The `ModelSpec` (`name`, `builder`, `family`, `weights`: a
            `flaxbones.weights.WeightSource` or None).

    Raises:
        ValueError: `name` is not registered; the message suggests close matches.
    """
    spec = _BACKBONES.get(name) or _MODELS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} "
                         "(fb.list_models() lists them all)")
    if name in _BACKBONES and spec.weights is not None:
        spec = dataclasses.replace(spec, weights=spec.weights.with_rules(
            classifier_preset(name).rules))
    return spec


def create_backbone(name: str, /, **kwargs: Any) -> nn.Module:
    """A backbone module: it maps NHWC float images to a dict of feature maps by level.

    Flax's `name=` and `parent=` reach the module, so it can be built inside a user's
    own Module (in `setup` or a compact method) like any Flax layer.

    Args:
        name: A registered backbone name (`list_backbones()`).
        **kwargs: The backbone's options: `output_stride`, `out_features`, `dtype`,
            `param_dtype`, `scan_blocks`, `remat`, ..., and Flax's `name` / `parent`.

    Returns:
        The backbone, an unbound `flax.linen.Module`; its `feature_info` lists the
            `FeatureInfo` of each level it returns.

    Raises:
        ValueError: `name` is unknown, or names a full model rather than a backbone;
            the builder's own ValueErrors for unsupported options (e.g. `output_stride`).
    """
    spec = get_spec(name)
    if name not in _BACKBONES:
        raise ValueError(f"{name!r} is a full model, not a backbone; use create_model")
    return _build(spec.builder, kwargs)


def create_model(name: str, /, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A complete model by name: a classifier for a backbone name, else the registered model.

    A backbone name gives a classifier (default 1000 classes; `num_classes=0`: pooled
    features; `drop_rate`, and the head options of its preset, e.g. GoogLeNet's
    `aux_logits`); other registered names (segmenter presets, detectors, `smp_*`) are
    built by their own builder, with its own default `num_classes` (21 for
    torchvision's segmenters). Flax's `name=` and `parent=` reach the returned module.

    Args:
        name: A registered name (`list_models()`).
        num_classes: Output classes; None keeps the builder's default.
        **kwargs: The builder's options (backbone options such as `dtype`,
            `output_stride`, head options), and Flax's `name` / `parent`.

    Returns:
        The model, an unbound `flax.linen.Module` (a `Classifier` for a backbone name).

    Raises:
        ValueError: `name` is unknown, or `num_classes` is negative for a classifier;
            the builder's own errors for unsupported options.
    """
    spec = get_spec(name)
    if name in _MODELS:
        given = {} if num_classes is None else {"num_classes": num_classes}
        return _build(spec.builder, {**given, **kwargs})
    num_classes = 1000 if num_classes is None else num_classes
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    preset = classifier_preset(name)
    return _build(lambda **kw: preset.build(spec.builder, num_classes, **kw), kwargs)


def _build(builder, kwargs) -> nn.Module:
    """`builder(**kwargs)` with every module made outside any parent's context (else Flax
    would adopt the parts, backbone and heads, as the caller's own children and flatten
    their variables into the caller's), then the result attached where the caller is,
    with the caller's `name`/`parent`."""
    placement = {k: kwargs.pop(k) for k in ("name", "parent") if k in kwargs}
    stack = nn.module._context.module_stack
    stack.append(None)
    try:
        model = builder(**kwargs)
    finally:
        stack.pop()
    return model.copy(**placement)
