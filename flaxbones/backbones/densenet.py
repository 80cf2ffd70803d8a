"""DenseNet-BC in torchvision's layout: `features.conv0/norm0/pool0`, dense blocks
`features.denseblockB.denselayerI` (BN-ReLU-1x1 conv, BN-ReLU-3x3 conv, concatenated onto
the block's input), transitions `features.transitionB` (BN-ReLU-1x1 conv, 2x2 average
pool) and `features.norm5`. Flax modules drop the `features.` prefix."""
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import (
    FeatureInfo,
    check_images,
    halving_levels,
    plan_output_stride,
    select_features,
)
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# growth rate, layers per dense block, stem width
VARIANTS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to bn_size * growth, BN-ReLU-3x3 conv to growth (+ dropout), on the
    concatenation of the block's features so far, which it takes as separate arrays: under
    `remat` those are what is kept, not each layer's own concatenated copy (torchvision's
    `memory_efficient`)."""

    growth_rate: int
    bn_size: int
    dilation: int
    conv: Any
    norm: Any
    drop_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, *features):
        d = self.dilation
        x = jnp.concatenate(features, axis=-1)
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), name="conv1")(
            nn.relu(self.norm(name="norm1")(x)))
        y = self.conv(self.growth_rate, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                      name="conv2")(nn.relu(self.norm(name="norm2")(y)))
        return nn.Dropout(self.drop_rate, deterministic=not self.train)(y)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pool: stride 2, or (dilated
    model) stride 1 with the window dilated by `dilation`, zero-padded after the input."""

    features: int
    stride: int
    dilation: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, (1, 1), name="conv")(nn.relu(self.norm(name="norm")(x)))
        if self.stride > 1:
            return nn.avg_pool(x, (2, 2), (2, 2))
        d = self.dilation
        total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, 2, 2, 1),
                                      (1, 1, 1, 1), ((0, 0), (0, d), (0, d), (0, 0)),
                                      window_dilation=(1, d, d, 1))
        return total / 4


class DenseNet(Backbone):
    """DenseNet backbone (torchvision's): C1 relu0 (stride 2), C2..C4 the outputs of dense
    blocks 1..3 (before their transitions: the taps of timm's `features_only`), C5 relu(norm5)
    (stride 32, what torchvision's classifier pools).

    `output_stride` 8/16 runs the later transitions' pools at stride 1 with a dilated 2x2
    window and dilates the 3x3 convs after them (the 'algorithme a trous': the dilated maps
    sampled every 2 or 4 pixels equal the undilated ones wherever no padding is read, e.g.
    on inputs that are multiples of 32; neither torchvision nor timm dilates DenseNet).
    `drop_rate` is torchvision's dropout after each dense layer (0 by default, training
    only). Under `remat` each dense layer keeps the block's features as separate arrays
    (torchvision's `memory_efficient`)."""

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = option(0.0)

    conv_init = staticmethod(nn.initializers.variance_scaling(2.0, "fan_in", "normal"))

    def _widths(self):
        widths, c = [], self.num_init_features
        for i, n in enumerate(self.block_config):
            c += n * self.growth_rate
            widths.append(c)
            c = c // 2 if i < len(self.block_config) - 1 else c
        return widths

    @property
    def _plans(self):
        return plan_output_stride((2, 2, 2, 2, 2), self.output_stride)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        channels = (self.num_init_features, *self._widths())
        return select_features(halving_levels(self._plans, channels), self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=29)
        norm = self.norm_def(train)
        conv = self.conv_def()
        plans = self._plans
        x = nn.relu(norm(name="norm0")(conv(self.num_init_features, (7, 7), (2, 2),
                                            padding=((3, 3), (3, 3)), name="conv0")(x)))
        feats = {"C1": x}
        x = self.pool_def()(x, 3, 2, padding=1)
        widths = self._widths()
        layer = partial(self.block_def(DenseLayer), self.growth_rate, self.bn_size, conv=conv,
                        norm=norm, drop_rate=self.drop_rate, train=train)
        for b, n in enumerate(self.block_config, 1):
            features = [x]
            for i in range(1, n + 1):
                features.append(layer(plans[b].dilation, name=f"denseblock{b}_denselayer{i}")(
                    *features))
            x = jnp.concatenate(features, axis=-1)
            if b < len(self.block_config):
                feats[f"C{b + 1}"] = x
                plan = plans[b + 1]
                x = self.block_def(Transition)(widths[b - 1] // 2, plan.stride,
                                               plan.first_dilation, conv, norm,
                                               name=f"transition{b}")(x)
        feats["C5"] = nn.relu(norm(name="norm5")(x))
        return {f.name: feats[f.name] for f in self.feature_info}


TORCH_RULES = (
    (r"features\.(conv0|norm0|norm5)", r"backbone/\1"),
    (r"features\.(denseblock\d)\.(denselayer\d+)\.(norm|conv)\.?([12])", r"backbone/\1_\2/\3\4"),
    (r"features\.(transition\d)\.(norm|conv)", r"backbone/\1/\2"),
)

register_variants("densenet", variants={
    name: partial(DenseNet, growth_rate=g, block_config=blocks, num_init_features=c)
    for name, (g, blocks, c) in VARIANTS.items()},
    weights=WeightSource("torchvision", TORCH_RULES, **TORCH_IMAGENET))
