"""GoogLeNet (Inception v1) as torchvision builds it; its classifier and auxiliary
classifiers are heads (`flaxbones.heads.classification`), fed by this backbone's taps."""
from functools import partial
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.layers import ConvNormAct, ModuleDef, max_pool, normal_001
from flaxbones.registry import register_variants
from flaxbones.weights.source import IMAGENET_MEAN, IMAGENET_STD, WeightSource

# ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj of each Inception block, in order.
INCEPTIONS = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
LEVEL_OF = {"3b": "C3", "4e": "C4", "5b": "C5"}  # the deepest block at strides 8, 16, 32


def _width(name):
    c1, _, c3, _, c5, pool = INCEPTIONS[name]
    return c1 + c3 + c5 + pool


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1-3x3; 1x1-3x3 (torchvision's stand-in for the
    paper's 5x5, vision#906, kept for its weights); 3x3 max-pool-1x1."""

    widths: Sequence[int]
    conv: ModuleDef = ConvNormAct
    pool: ModuleDef = max_pool

    @nn.compact
    def __call__(self, x):
        c1, c3r, c3, c5r, c5, pool = self.widths
        b1 = self.conv(c1, 1, name="branch1")(x)
        b2 = self.conv(c3, 3, name="branch2_1")(self.conv(c3r, 1, name="branch2_0")(x))
        b3 = self.conv(c5, 3, name="branch3_1")(self.conv(c5r, 1, name="branch3_0")(x))
        b4 = self.conv(pool, 1, name="branch4_1")(self.pool(x, 3, 1, padding=1, ceil_mode=True))
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(Backbone):
    """GoogLeNet backbone: C1 conv1, C2 conv3, C3 inception3b, C4 inception4e,
    C5 inception5b (each the deepest activation at strides 2..32, before the next pool).
    `out_features` may also name any Inception block ('inception4a', the input of
    torchvision's first auxiliary classifier).

    Only output_stride 32. BasicConv2d is a bias-free conv, BatchNorm (eps 1e-3) and ReLU.
    `transform_input` maps ImageNet-normalised input to the [-1, 1] normalisation the
    ported weights expect, as torchvision's flag does.
    """

    transform_input: bool = False
    bn_epsilon: float = option(1e-3)

    supported_strides = (32,)
    conv_init = staticmethod(normal_001)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        levels = [FeatureInfo("C1", 2, 64), FeatureInfo("C2", 4, 192)]
        levels += [FeatureInfo(LEVEL_OF[n], 2 ** int(n[0]), _width(n)) for n in LEVEL_OF]
        if self.out_features is None:
            return tuple(levels)
        units = [FeatureInfo(f"inception{n}", 2 ** int(n[0]), _width(n)) for n in INCEPTIONS]
        return select_features(levels + units, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=15)
        info = self.feature_info
        conv = partial(ConvNormAct, conv=self.conv_def(), norm=self.norm_def(train))
        stem, pool = self.block_def(conv), self.pool_def()
        if self.transform_input:
            mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
            x = x * jnp.asarray(std / 0.5, x.dtype) + jnp.asarray((mean - 0.5) / 0.5, x.dtype)
        feats = {"C1": stem(64, 7, stride=2, name="conv1")(x)}
        x = pool(feats["C1"], 3, 2, ceil_mode=True)
        x = stem(64, 1, name="conv2")(x)
        feats["C2"] = x = stem(192, 3, name="conv3")(x)
        x = pool(x, 3, 2, ceil_mode=True)
        for name in INCEPTIONS:
            if name in ("4a", "5a"):
                x = pool(x, 3 if name == "4a" else 2, 2, ceil_mode=True)
            x = self.block_def(Inception)(INCEPTIONS[name], conv=conv, pool=pool,
                                          name=f"inception{name}")(x)
            feats[f"inception{name}"] = x
            if name in LEVEL_OF:
                feats[LEVEL_OF[name]] = x
        return {f.name: feats[f.name] for f in info}


_CBN = r"\.(conv|bn)"  # a BasicConv2d's two children
TORCHVISION_RULES = (
    (rf"(conv\d){_CBN}", r"backbone/\1/\2"),
    (rf"(inception\d\w)\.branch1{_CBN}", r"backbone/\1/branch1/\2"),
    (rf"(inception\d\w)\.branch(\d)\.(\d){_CBN}", r"backbone/\1/branch\2_\3/\4"),
)

# torchvision's pretrained GoogLeNet runs with transform_input=True on ImageNet-normalised
# input, which equals (x - 0.5) / 0.5: so the source asks for that normalisation instead.
TORCH_GOOGLENET = WeightSource("torchvision", rules=TORCHVISION_RULES,
                               mean=(0.5,) * 3, std=(0.5,) * 3)

register_variants("googlenet", weights=TORCH_GOOGLENET, variants={"googlenet": GoogLeNet})
