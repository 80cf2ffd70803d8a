"""DeepLabv3 and DeepLabv3+ heads, each in torchvision's or TF DeepLab's flavour."""
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.aspp import ASPP
from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import ConvNormAct, SeparableConv, resize_bilinear

# The two faithful flavours. torchvision: pooling branch last, dropout 0.5, a 3x3 conv
# after ASPP, half-pixel upsampling. TF DeepLab (model.py): pooling first, dropout 0.1,
# separable atrous convs, no extra conv, align_corners=True, BN eps 1e-5 / decay 0.9997.
STYLES = {
    "torchvision": dict(dropout=0.5, pool_first=False, separable=False, head_conv=True,
                        align_corners=False, bn_epsilon=1e-5, bn_momentum=0.9),
    "tf": dict(dropout=0.1, pool_first=True, separable=True, head_conv=False,
               align_corners=True, bn_epsilon=1e-5, bn_momentum=0.9997),
}


def _aspp(head, conv, norm, x, train):
    """`head`'s ASPP (named `aspp`) on `x`, its branches built by the head's `block_def`."""
    return ASPP(head.atrous_rates, head.aspp_channels, head.dropout, head.pool_first,
                head.separable, head.align_corners, conv, norm, head.block_def(ConvNormAct),
                head.block_def(SeparableConv), name="aspp")(x, train=train)


def deeplab_style(style: str, plus: bool = False) -> dict:
    """The head keyword arguments of a DeepLab flavour ('torchvision' or 'tf'), for the
    v3 head or (`plus`) the v3+ head, whose decoder replaces the extra conv."""
    if style not in STYLES:
        raise ValueError(f"unknown DeepLab style {style!r}; choose one of {sorted(STYLES)}")
    kwargs = dict(STYLES[style])
    if plus:
        del kwargs["head_conv"]
    return kwargs


class DeepLabV3Head(SegmentationHead):
    """ASPP on `feature` (C5), [3x3 conv-BN-ReLU `conv`], 1x1 `classifier`.

    torchvision's DeepLabHead with the defaults (its rates 12/24/36 at output stride 8);
    `deeplab_style('tf')` gives TF DeepLab's v3 head.
    """

    feature: str = "C5"
    atrous_rates: Sequence[int] = (12, 24, 36)
    aspp_channels: int = 256
    dropout: float = 0.5
    pool_first: bool = False
    separable: bool = False
    head_conv: bool = True
    align_corners: bool = False

    supported_strides = (8, 16)

    @property
    def levels(self):
        return (self.feature,)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        conv, norm = self.conv_def(), self.norm_def(train)
        x = _aspp(self, conv, norm, features[self.feature], train)
        if self.head_conv:
            x = self.block_def(ConvNormAct)(self.aspp_channels, 3, conv=conv, norm=norm,
                                            name="conv")(x)
        return self.classifier_def()(name="classifier")(x)

    @staticmethod
    def torch_rules() -> tuple:
        """torchvision's DeepLabHead (ASPP, Conv, BN, ReLU, Conv) at `classifier`; ASPP's
        `convs.4` is its pooling branch."""
        return ((r"classifier\.0\.convs\.4\.1", "head/aspp/pool/conv"),
                (r"classifier\.0\.convs\.4\.2", "head/aspp/pool/bn"),
                (r"classifier\.0\.convs\.(\d)\.0", r"head/aspp/convs_\1/conv"),
                (r"classifier\.0\.convs\.(\d)\.1", r"head/aspp/convs_\1/bn"),
                (r"classifier\.0\.project\.0", "head/aspp/project/conv"),
                (r"classifier\.0\.project\.1", "head/aspp/project/bn"),
                (r"classifier\.1", "head/conv/conv"), (r"classifier\.2", "head/conv/bn"),
                (r"classifier\.4", "head/classifier"))


class DeepLabV3PlusHead(SegmentationHead):
    """DeepLabv3+: ASPP on `feature` upsampled to the `low_level` feature (C2) projected to
    48 channels, concatenated (ASPP first, as TF DeepLab), two 3x3 convs of 256
    (`decoder_0/1`, separable in TF style), 1x1 `classifier`; logits at C2's stride."""

    feature: str = "C5"
    low_level: str = "C2"
    atrous_rates: Sequence[int] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    dropout: float = 0.5
    pool_first: bool = False
    separable: bool = False
    align_corners: bool = False

    supported_strides = (8, 16)

    @property
    def levels(self):
        return (self.low_level, self.feature)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        conv, norm = self.conv_def(), self.norm_def(train)
        unit = self.block_def(ConvNormAct)
        x = _aspp(self, conv, norm, features[self.feature], train)
        low = unit(self.low_level_channels, 1, conv=conv, norm=norm,
                   name="project_low")(features[self.low_level])
        x = resize_bilinear(x, low.shape[1:3], self.align_corners)
        x = jnp.concatenate([x, low], axis=-1)
        for i in range(2):
            if self.separable:
                x = self.block_def(SeparableConv)(self.decoder_channels, 3, act=nn.relu,
                                                  conv=conv, norm=norm, name=f"decoder_{i}")(x)
            else:
                x = unit(self.decoder_channels, 3, conv=conv, norm=norm, name=f"decoder_{i}")(x)
        return self.classifier_def()(name="classifier")(x)
