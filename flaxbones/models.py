"""Composition: a backbone and a head make a model."""
from flax import linen as nn

from flaxbones.layers import resize_bilinear


class Classifier(nn.Module):
    """Backbone features -> classification head: {'out': logits} (the pooled features with
    `num_classes=0`), plus the named logits of an optional `aux_head` (GoogLeNet's 'aux1'
    and 'aux2'), the same keys in train and eval.

    Variables live under `backbone`, `head` and `aux_head`, so a classifier's backbone
    sub-tree drops into any other model's. The heads' `levels` are checked against the
    backbone's `feature_info` at construction.
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
        return self.backbone.feature_info

    def __call__(self, x, train: bool = False):
        features = self.backbone(x, train=train)
        out = {"out": self.head(features, train=train)}
        if self.aux_head is not None:
            out.update(self.aux_head(features, train=train))
        return out


class Segmenter(nn.Module):
    """Backbone features -> segmentation head (+ optional auxiliary head), logits resized
    to the input's height and width: {'out': NHWC logits, 'aux': ... when configured}.

    Variables live under `backbone`, `head` and `aux_head`. The heads' `levels` are
    checked against the backbone's `feature_info` at construction; logits are upsampled
    with each head's `align_corners` rule (torchvision: False, TF DeepLab: True). Any
    input size works: heads resize to the exact sizes of the levels they fuse, never by
    a fixed factor, so nothing needs padding to a multiple of 32.
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
        return self.backbone.feature_info

    def __call__(self, x, train: bool = False):
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
