"""ShuffleNet V2 in torchvision's layout: `conv1` (3x3 stride-2 conv-BN-ReLU), a 3x3
stride-2 max pool, `stage2..4` of InvertedResidual units (channel split, two branches,
concatenation, channel shuffle) and `conv5` (1x1 conv-BN-ReLU). Sequential children keep
their indices in Flax names (`conv1_0`, `stage2_0/branch2_3`)."""
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import (
    FeatureInfo,
    check_images,
    halving_levels,
    plan_output_stride,
    select_features,
)
from flaxbones.layers import torch_default_init
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# output channels of conv1, stage2..4 and conv5
VARIANTS = {
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
    "shufflenet_v2_x1_5": (24, 176, 352, 704, 1024),
    "shufflenet_v2_x2_0": (24, 244, 488, 976, 2048),
}


def channel_shuffle(x, groups: int = 2):
    """torch's view(N, g, C/g, H, W).transpose(1, 2): channel j of group g goes to j*g + g."""
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class ShuffleUnit(nn.Module):
    """torchvision's InvertedResidual. Stride 2 (or its dilated stand-in, `downsample`):
    branch1 (3x3 depthwise-BN, 1x1-BN-ReLU) and branch2 both see the whole input; otherwise
    the first half of the channels passes through and branch2 (1x1-BN-ReLU, 3x3 depthwise-BN,
    1x1-BN-ReLU) takes the second. Concatenated, then shuffled."""

    features: int
    stride: int
    dilation: int
    downsample: bool
    conv: Any
    norm: Any

    def _dw(self, x, name):
        d = self.dilation
        return self.conv(x.shape[-1], (3, 3), (self.stride, self.stride), padding=((d, d), (d, d)),
                         kernel_dilation=(d, d), feature_group_count=x.shape[-1], name=name)(x)

    @nn.compact
    def __call__(self, x):
        half = self.features // 2
        if self.downsample:
            left = self.norm(name="branch1_1")(self._dw(x, "branch1_0"))
            left = self.conv(half, (1, 1), name="branch1_2")(left)
            left = nn.relu(self.norm(name="branch1_3")(left))
            right = x
        else:
            left, right = jnp.split(x, 2, axis=-1)
        y = nn.relu(self.norm(name="branch2_1")(self.conv(half, (1, 1), name="branch2_0")(right)))
        y = self.norm(name="branch2_4")(self._dw(y, "branch2_3"))
        y = nn.relu(self.norm(name="branch2_6")(self.conv(half, (1, 1), name="branch2_5")(y)))
        return channel_shuffle(jnp.concatenate([left, y], axis=-1))


class ShuffleNetV2(Backbone):
    """ShuffleNet V2 backbone: C1 conv1 (stride 2), C2 the max pool (4), C3 stage2 (8),
    C4 stage3 (16), C5 conv5 (32, what the classifier pools).

    `output_stride` 8/16 follows torchvision's dilation semantics: a stage past the stride
    runs its first unit at stride 1 with the previous dilation in its depthwise convs, and
    its other units dilated by the stride dropped.
    """

    channels: tuple = VARIANTS["shufflenet_v2_x1_0"]
    repeats: tuple = (4, 8, 4)  # units of stage2..4

    conv_init = staticmethod(torch_default_init)

    @property
    def _plans(self):
        return plan_output_stride((2, 2, 2, 2, 2), self.output_stride)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        c = self.channels
        channels = (c[0], c[0], c[1], c[2], c[4])
        return select_features(halving_levels(self._plans, channels), self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        conv, norm = self.conv_def(), self.norm_def(train)
        x = nn.relu(norm(name="conv1_1")(conv(self.channels[0], (3, 3), (2, 2),
                                              padding=((1, 1), (1, 1)), name="conv1_0")(x)))
        feats = {"C1": x}
        feats["C2"] = x = self.pool_def()(x, 3, 2, padding=1)
        unit = partial(self.block_def(ShuffleUnit), conv=conv, norm=norm)
        for s, (repeats, width) in enumerate(zip(self.repeats, self.channels[1:4])):
            plan = self._plans[s + 2]
            x = unit(width, plan.stride, plan.first_dilation, True, name=f"stage{s + 2}_0")(x)
            for i in range(1, repeats):
                x = unit(width, 1, plan.dilation, False, name=f"stage{s + 2}_{i}")(x)
            feats[f"C{s + 3}"] = x
        x = conv(self.channels[4], (1, 1), name="conv5_0")(x)
        feats["C5"] = nn.relu(norm(name="conv5_1")(x))
        return {f.name: feats[f.name] for f in self.feature_info}


TORCH_RULES = (
    (r"(conv1|conv5)\.([01])", r"backbone/\1_\2"),
    (r"(stage\d)\.(\d+)\.(branch\d)\.(\d)", r"backbone/\1_\2/\3_\4"),
)

# torchvision's weights of the two wider ones evaluate at 232 -> 224.
for _name, _channels in VARIANTS.items():
    register_variants("shufflenet_v2", variants={
        _name: partial(ShuffleNetV2, channels=_channels)}, weights=WeightSource(
            "torchvision", TORCH_RULES, resize_size=232 if _name in (
                "shufflenet_v2_x1_5", "shufflenet_v2_x2_0") else None, **TORCH_IMAGENET))
