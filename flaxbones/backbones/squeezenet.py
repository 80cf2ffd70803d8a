"""SqueezeNet 1.0 / 1.1 in torchvision's layout: `features` is a conv, ReLU, ceil-mode 3x3
stride-2 max pools and Fire modules (1x1 squeeze, then 1x1 and 3x3 expands concatenated,
all with bias and ReLU); Flax names keep the indices (`features_3/squeeze`). Its conv
classifier is a head (`flaxbones.heads.classification.SqueezeNetHead`)."""
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (stem width, stem kernel, layout of `features` after the stem's conv-ReLU-pool: "M" a
# max pool, (squeeze, expand) a Fire module whose expands have `expand` channels each)
VARIANTS = {
    "squeezenet1_0": (96, 7, ((16, 64), (16, 64), (32, 128), "M", (32, 128), (48, 192),
                              (48, 192), (64, 256), "M", (64, 256))),
    "squeezenet1_1": (64, 3, ((16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192),
                              (48, 192), (64, 256), (64, 256))),
}


class Fire(nn.Module):
    """relu(squeeze 1x1) -> [relu(expand1x1), relu(expand3x3)] concatenated."""

    squeeze: int
    expand: int
    conv: Any

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(self.squeeze, (1, 1), name="squeeze")(x))
        return jnp.concatenate([
            nn.relu(self.conv(self.expand, (1, 1), name="expand1x1")(x)),
            nn.relu(self.conv(self.expand, (3, 3), padding=((1, 1), (1, 1)), name="expand3x3")(x)),
        ], axis=-1)


class SqueezeNet(Backbone):
    """SqueezeNet backbone: C1 the stem conv's ReLU (stride 2), C2..C4 the last Fire module
    before each ceil-mode max pool, and the last one (strides 4, 8, 16). The network stops
    at stride 16 (no C5), so output_stride 16 and 32 both give it as built; 8 would need a
    ceil-mode pool dilated, which has no exact equivalent, and raises."""

    stem_width: int = 96
    stem_kernel: int = 7
    layout: tuple = VARIANTS["squeezenet1_0"][2]

    supported_strides = (16, 32)
    conv_init = staticmethod(nn.initializers.variance_scaling(2.0, "fan_in", "uniform"))

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        stride, channels = 2, self.stem_width
        levels = {"C1": FeatureInfo("C1", stride, channels)}
        for unit in ("M", *self.layout):  # the stem's pool, then `layout`
            stride, channels = (stride * 2, channels) if unit == "M" else (stride, 2 * unit[1])
            level = f"C{stride.bit_length() - 1}"
            levels[level] = FeatureInfo(level, stride, channels)
        return select_features(list(levels.values()), self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=self.stem_kernel + 14)
        conv = self.conv_def(use_bias=True, bias_init=nn.initializers.zeros)
        pool = partial(self.pool_def(), window=3, stride=2, ceil_mode=True)
        k = self.stem_kernel
        feats = {"C1": nn.relu(conv(self.stem_width, (k, k), (2, 2), padding="VALID",
                                    name="features_0")(x))}
        x, stride = pool(feats["C1"]), 4
        for i, unit in enumerate(self.layout, 3):
            if unit == "M":
                x, stride = pool(x), stride * 2
            else:
                x = self.block_def(Fire)(*unit, conv, name=f"features_{i}")(x)
            feats[f"C{stride.bit_length() - 1}"] = x
        return {f.name: feats[f.name] for f in self.feature_info}


TORCH_RULES = (
    (r"features\.0", "backbone/features_0"),
    (r"features\.(\d+)\.(squeeze|expand1x1|expand3x3)", r"backbone/features_\1/\2"),
)

register_variants("squeezenet", variants={
    name: partial(SqueezeNet, stem_width=width, stem_kernel=kernel, layout=layout)
    for name, (width, kernel, layout) in VARIANTS.items()},
    weights=WeightSource("torchvision", TORCH_RULES, **TORCH_IMAGENET))
