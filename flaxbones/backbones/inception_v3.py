"""Inception v3 as torchvision builds it: a VALID-padded stem (`Conv2d_1a_3x3` ..
`Conv2d_4a_3x3`, two 3x3 stride-2 max pools) and the Inception blocks `Mixed_5b` .. `Mixed_7c`
(A x3, B, C x4, D, E x2). Its classifier and auxiliary classifier (on `Mixed_6e`) are heads
(`flaxbones.heads.classification`)."""
from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.registry import register_variants
from flaxbones.weights.source import IMAGENET_MEAN, IMAGENET_STD, WeightSource

# tap name -> (nominal stride, channels): timm's `features_only` points.
LEVELS = {"C1": ("Conv2d_2b_3x3", 2, 64), "C2": ("Conv2d_4a_3x3", 4, 192),
          "C3": ("Mixed_5d", 8, 288), "C4": ("Mixed_6e", 16, 768), "C5": ("Mixed_7c", 32, 2048)}


def _pad(kernel):
    return tuple((k // 2, k // 2) for k in kernel)


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: bias-free conv (`kernel` (kh, kw), torch's symmetric
    padding or VALID), BatchNorm (eps 1e-3), ReLU; modules `conv` and `bn`."""

    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    valid: bool = False
    conv: Any = None
    norm: Any = None

    @nn.compact
    def __call__(self, x):
        padding = "VALID" if self.valid else _pad(self.kernel)
        x = self.conv(self.features, self.kernel, (self.stride, self.stride), padding=padding,
                      name="conv")(x)
        return nn.relu(self.norm(name="bn")(x))


def _avg3(x):
    """F.avg_pool2d(x, 3, stride=1, padding=1), zero padding counted (count_include_pad)."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=True)


class InceptionA(nn.Module):
    """35x35 block: 1x1; 1x1-5x5; 1x1-3x3-3x3; 3x3 avg pool-1x1 (`pool_features`)."""

    pool_features: int
    cbr: Any

    @nn.compact
    def __call__(self, x):
        c = self.cbr
        b5 = c(64, (5, 5), name="branch5x5_2")(c(48, name="branch5x5_1")(x))
        b3 = c(96, (3, 3), name="branch3x3dbl_3")(c(96, (3, 3), name="branch3x3dbl_2")(
            c(64, name="branch3x3dbl_1")(x)))
        return jnp.concatenate([c(64, name="branch1x1")(x), b5, b3,
                                c(self.pool_features, name="branch_pool")(_avg3(x))], -1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3 stride 2; 1x1-3x3-3x3 stride 2; 3x3 stride-2 max pool."""

    cbr: Any
    pool: Any

    @nn.compact
    def __call__(self, x):
        c = self.cbr
        b3 = c(384, (3, 3), 2, True, name="branch3x3")(x)
        bd = c(96, (3, 3), 2, True, name="branch3x3dbl_3")(c(96, (3, 3), name="branch3x3dbl_2")(
            c(64, name="branch3x3dbl_1")(x)))
        return jnp.concatenate([b3, bd, self.pool(x, 3, 2)], -1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7s: 1x1; 1x1-1x7-7x1; 1x1-(7x1-1x7)x2; avg pool-1x1."""

    channels_7x7: int
    cbr: Any

    @nn.compact
    def __call__(self, x):
        c, c7 = self.cbr, self.channels_7x7
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(192, (7, 1), name="branch7x7_3")(c(c7, (1, 7), name="branch7x7_2")(b7))
        bd = c(c7, name="branch7x7dbl_1")(x)
        for i, (k, w) in enumerate((((7, 1), c7), ((1, 7), c7), ((7, 1), c7), ((1, 7), 192)), 2):
            bd = c(w, k, name=f"branch7x7dbl_{i}")(bd)
        return jnp.concatenate([c(192, name="branch1x1")(x), b7, bd,
                                c(192, name="branch_pool")(_avg3(x))], -1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3 stride 2; 1x1-1x7-7x1-3x3 stride 2; 3x3 stride-2 max pool."""

    cbr: Any
    pool: Any

    @nn.compact
    def __call__(self, x):
        c = self.cbr
        b3 = c(320, (3, 3), 2, True, name="branch3x3_2")(c(192, name="branch3x3_1")(x))
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (7, 1), name="branch7x7x3_3")(c(192, (1, 7), name="branch7x7x3_2")(b7))
        b7 = c(192, (3, 3), 2, True, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, self.pool(x, 3, 2)], -1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs: 1x1; 1x1-(1x3, 3x1); 1x1-3x3-(1x3, 3x1);
    avg pool-1x1."""

    cbr: Any

    @nn.compact
    def __call__(self, x):
        c = self.cbr
        b3 = c(384, name="branch3x3_1")(x)
        b3 = [c(384, (1, 3), name="branch3x3_2a")(b3), c(384, (3, 1), name="branch3x3_2b")(b3)]
        bd = c(384, (3, 3), name="branch3x3dbl_2")(c(448, name="branch3x3dbl_1")(x))
        bd = [c(384, (1, 3), name="branch3x3dbl_3a")(bd),
              c(384, (3, 1), name="branch3x3dbl_3b")(bd)]
        return jnp.concatenate([c(320, name="branch1x1")(x), *b3, *bd,
                                c(192, name="branch_pool")(_avg3(x))], -1)


class InceptionV3(Backbone):
    """Inception v3 backbone: C1 `Conv2d_2b_3x3`, C2 `Conv2d_4a_3x3`, C3 `Mixed_5d`,
    C4 `Mixed_6e` (the auxiliary classifier's input), C5 `Mixed_7c` (timm's taps).

    Strides in `feature_info` are nominal: the VALID convs and pools make each level
    floor-smaller than input / stride (299 -> 147, 71, 35, 17, 8; 75 px is the minimum).
    Only output_stride 32: the VALID stem and reduction blocks cannot be dilated exactly.
    `transform_input` maps ImageNet-normalised input to the [-1, 1] normalisation the
    ported weights expect, as torchvision's flag (which its pretrained model turns on) does;
    the weight source asks for that normalisation directly instead, as GoogLeNet's.
    """

    transform_input: bool = False
    bn_epsilon: float = option(1e-3)

    supported_strides = (32,)
    conv_init = staticmethod(nn.initializers.normal(0.1))

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        infos = [FeatureInfo(k, s, c) for k, (_, s, c) in LEVELS.items()]
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=75)
        cbr = partial(BasicConv, conv=self.conv_def(), norm=self.norm_def(train))
        stem, block = self.block_def(cbr), self.block_def
        pool = self.pool_def()
        if self.transform_input:
            mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
            x = x * jnp.asarray(std / 0.5, x.dtype) + jnp.asarray((mean - 0.5) / 0.5, x.dtype)
        x = stem(32, (3, 3), 2, True, name="Conv2d_1a_3x3")(x)
        x = stem(32, (3, 3), valid=True, name="Conv2d_2a_3x3")(x)
        feats = {"C1": stem(64, (3, 3), name="Conv2d_2b_3x3")(x)}
        x = stem(80, name="Conv2d_3b_1x1")(pool(feats["C1"], 3, 2))
        feats["C2"] = x = stem(192, (3, 3), valid=True, name="Conv2d_4a_3x3")(x)
        x = pool(x, 3, 2)
        for name, width in (("5b", 32), ("5c", 64), ("5d", 64)):
            x = block(InceptionA)(width, cbr, name=f"Mixed_{name}")(x)
        feats["C3"] = x
        x = block(InceptionB)(cbr, pool, name="Mixed_6a")(x)
        for name, width in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
            x = block(InceptionC)(width, cbr, name=f"Mixed_{name}")(x)
        feats["C4"] = x
        x = block(InceptionD)(cbr, pool, name="Mixed_7a")(x)
        x = block(InceptionE)(cbr, name="Mixed_7b")(x)
        feats["C5"] = block(InceptionE)(cbr, name="Mixed_7c")(x)
        return {f.name: feats[f.name] for f in self.feature_info}


TORCHVISION_RULES = (
    (r"(Conv2d_\w+)\.(conv|bn)", r"backbone/\1/\2"),
    (r"(Mixed_\w+)\.(branch\w+)\.(conv|bn)", r"backbone/\1/\2/\3"),
)

# torchvision's pretrained model runs with transform_input=True on ImageNet-normalised
# input, which equals (x - 0.5) / 0.5: the source asks for that normalisation instead.
TORCH_INCEPTION_V3 = WeightSource("torchvision", rules=TORCHVISION_RULES, mean=(0.5,) * 3,
                                  std=(0.5,) * 3, input_size=299, resize_size=342)

register_variants("inception_v3", weights=TORCH_INCEPTION_V3,
                  variants={"inception_v3": InceptionV3})
