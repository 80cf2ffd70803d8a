"""Name -> builder, with per-name metadata; the creation API lives here."""
import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

from flax import linen as nn

_BACKBONES: dict[str, "ModelSpec"] = {}
_MODELS: dict[str, "ModelSpec"] = {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a name: its builder, family, weight source and head."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    weights: Any = None  # a flaxbones.weights.WeightSource, or None
    head: Callable[..., nn.Module] | None = None  # classifier head for backbones


def register_backbone(family: str, weights=None, head=None):
    """Decorator: register `builder` (named as the function) as a backbone and a classifier.

    `head` builds the classification head for `create_model(name, num_classes=...)`;
    the default is global average pooling, dropout and a dense layer.
    """
    def wrap(builder):
        _add(_BACKBONES, ModelSpec(builder.__name__, builder, family, weights, head))
        return builder
    return wrap


def register_variants(family: str, variants: dict, weights=None, head=None):
    """Register several backbones at once: {name: builder}, e.g. `partial(ResNet, ...)`."""
    for name, builder in variants.items():
        _add(_BACKBONES, ModelSpec(name, builder, family, weights, head))


def register_model(family: str, weights=None):
    """Decorator: register a complete model builder (a segmenter preset, say)."""
    def wrap(builder):
        _add(_MODELS, ModelSpec(builder.__name__, builder, family, weights))
        return builder
    return wrap


def _add(table, spec):
    if spec.name in _BACKBONES or spec.name in _MODELS:
        raise ValueError(f"model name {spec.name!r} is registered twice")
    table[spec.name] = spec


def _filter(names, pattern):
    return sorted(n for n in names if pattern is None or fnmatch.fnmatch(n, pattern))


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered backbone names, optionally filtered by a glob such as 'resnet*'."""
    return _filter(_BACKBONES, pattern)


def list_models(pattern: str | None = None) -> list[str]:
    """Every name `create_model` accepts: each backbone as a classifier, and full models."""
    return _filter([*_BACKBONES, *_MODELS], pattern)


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec of `name`; an unknown name raises a ValueError with close matches."""
    spec = _BACKBONES.get(name) or _MODELS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} "
                         "(fb.list_models() lists them all)")
    return spec


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A backbone module: `output_stride`, `out_features`, `dtype`, `param_dtype`, ..."""
    spec = get_spec(name)
    if name not in _BACKBONES:
        raise ValueError(f"{name!r} is a full model, not a backbone; use create_model")
    return spec.builder(**kwargs)


def create_model(name: str, num_classes: int | None = None, drop_rate: float = 0.0,
                 **kwargs) -> nn.Module:
    """A backbone name gives a classifier (default 1000 classes; `num_classes=0`: pooled
    features); other registered names (segmenter presets, ...) are built by their own
    builder, with its own default `num_classes` (21 for torchvision's segmenters)."""
    spec = get_spec(name)
    if name in _MODELS:
        return spec.builder(**({} if num_classes is None else {"num_classes": num_classes}),
                            **kwargs)
    num_classes = 1000 if num_classes is None else num_classes
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    from flaxbones.heads.classification import ClassifierHead
    from flaxbones.models import Classifier

    head_builder = spec.head or ClassifierHead
    # A head may need more of the backbone than its C-levels (GoogLeNet's aux inputs).
    backbone = spec.builder(**{**getattr(head_builder, "backbone_defaults", {}), **kwargs})
    dtypes = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
    head = head_builder(num_classes=num_classes, drop_rate=drop_rate, **dtypes)
    return Classifier(backbone=backbone, head=head)
