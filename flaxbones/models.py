"""Composition: a backbone and a head make a model."""
import jax
from flax import linen as nn

from flaxbones.layers import resize_bilinear


class Classifier(nn.Module):
    """Backbone features -> classification head (+ optional auxiliary head).

    Variables live under `backbone`, `head` and `aux_head`, so a classifier's backbone
    sub-tree drops into any other model's. `create_model(<backbone name>)` builds one
    with its preset's head.

    Attributes:
        backbone: The feature extractor (`create_backbone`), returning {level: map}.
        head: The classification head, reading the levels named by its `levels`.
        aux_head: An optional head returning a dict of named auxiliary logits
            (GoogLeNet's 'aux1' and 'aux2'), or None.

    Raises:
        ValueError: At construction, when a head reads a level the backbone does not
            produce.
    """

    backbone: nn.Module
    head: nn.Module
    aux_head: nn.Module | None = None

    def __post_init__(self):
        super().__post_init__()
        for role, head in (("head", self.head), ("aux_head", self.aux_head)):
            if head is not None:
                check_levels(self.backbone, getattr(head, "levels", ()),
                             f"{role} {type(head).__name__}")

    @property
    def feature_info(self):
        """The backbone's levels, a tuple of `FeatureInfo`."""
        return self.backbone.feature_info

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Run the backbone and the head(s) on a batch of images.

        Args:
            x: Float images (N, H, W, 3), NHWC, normalised as the backbone's weights expect.
            train: Training mode: batch statistics (and their update, with
                `mutable=['batch_stats']`) and dropout (a 'dropout' rng).

        Returns:
            A dict with 'out', the logits (N, num_classes) (the pooled features (N, C)
                with `num_classes=0`), plus the named logits of the `aux_head`, the same keys
                in train and eval.

        Raises:
            ValueError: `x` is not a float NHWC batch of the channels the backbone takes.
        """
        features = self.backbone(x, train=train)
        out = {"out": self.head(features, train=train)}
        if self.aux_head is not None:
            out.update(self.aux_head(features, train=train))
        return out


class Segmenter(nn.Module):
    """Backbone features -> segmentation head (+ optional auxiliary head), logits at input size.

    Variables live under `backbone`, `head` and `aux_head`. Logits are upsampled with each
    head's `align_corners` rule (torchvision: False, TF DeepLab: True). Any input size
    works: heads resize to the exact sizes of the levels they fuse, never by a fixed
    factor, so nothing needs padding to a multiple of 32.

    Attributes:
        backbone: The feature extractor (`create_backbone`), returning {level: map}.
        head: The segmentation head: `levels` it reads, `num_classes`, `align_corners`
            and optionally `supported_strides` (of its deepest level).
        aux_head: An optional auxiliary head of the same kind (its logits are 'aux'),
            or None.

    Raises:
        ValueError: At construction, when a head reads a level the backbone does not
            produce, needs another output stride, or has no positive `num_classes`.
    """

    backbone: nn.Module
    head: nn.Module
    aux_head: nn.Module | None = None

    def __post_init__(self):
        super().__post_init__()
        for role, head in (("head", self.head), ("aux_head", self.aux_head)):
            if head is not None:
                check_composition(self.backbone, head, role)

    @property
    def feature_info(self):
        """The backbone's levels, a tuple of `FeatureInfo`."""
        return self.backbone.feature_info

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Run the backbone and the head(s) on a batch of images.

        Args:
            x: Float images (N, H, W, 3), NHWC, normalised as the backbone's weights expect.
            train: Training mode: batch statistics (and their update, with
                `mutable=['batch_stats']`) and dropout (a 'dropout' rng).

        Returns:
            A dict with 'out', float logits (N, H, W, num_classes) at the input's H and
                W, plus 'aux' (the aux head's, same size) when the model has one.

        Raises:
            ValueError: `x` is not a float NHWC batch of the channels the backbone takes.
        """
        features = self.backbone(x, train=train)
        size = x.shape[1:3]
        out = {"out": self._upsample(self.head, features, size, train)}
        if self.aux_head is not None:
            out["aux"] = self._upsample(self.aux_head, features, size, train)
        return out

    @staticmethod
    def _upsample(head, features, size, train):
        return resize_bilinear(head(features, train=train), size, head.align_corners)


def check_composition(backbone: nn.Module, head: nn.Module, role: str = "head"):
    """Raise a ValueError unless `backbone` produces every level `head` reads, at a stride
    the head supports, and the head predicts at least one class."""
    name = type(head).__name__
    num_classes = getattr(head, "num_classes", 1)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{role} {name}: num_classes must be a positive int, got {num_classes!r}")
    info = check_levels(backbone, head.levels, f"{role} {name}")
    strides = getattr(head, "supported_strides", None)
    deepest = info[head.levels[-1]].stride
    if strides is not None and deepest not in strides:
        raise ValueError(f"{role} {name} needs its input level {head.levels[-1]} at output stride "
                         f"{' or '.join(map(str, strides))}; the backbone gives stride {deepest}")


def check_levels(backbone: nn.Module, levels, who: str) -> dict:
    """{name: FeatureInfo} of `backbone`; a ValueError if any of `levels` is missing."""
    info = {f.name: f for f in backbone.feature_info}
    missing = [lvl for lvl in levels if lvl not in info]
    if missing:
        raise ValueError(
            f"{who} needs feature levels {list(levels)} but the backbone "
            f"{type(backbone).__name__} produces only {list(info)} (missing {missing})")
    return info
