"""GoogLeNet (Inception v1) as torchvision builds it, auxiliary classifiers included."""
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.heads.classification import torch_bias_init
from flaxbones.layers import (BatchNorm, Conv, ConvNormAct, ModuleDef, adaptive_avg_pool,
                              global_avg_pool, max_pool)
from flaxbones.registry import register_variants
from flaxbones.weights.source import IMAGENET_MEAN, IMAGENET_STD, WeightSource

# torchvision's init for conv and linear weights: N(0, 0.01) (truncated at +-2, i.e. +-200 std).
normal_001 = nn.initializers.normal(0.01)

# ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj of each Inception block, in order.
INCEPTIONS = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}

TAPS = {"3b": "C3", "4a": "aux1", "4d": "aux2", "4e": "C4", "5b": "C5"}


def _width(name):
    c1, _, c3, _, c5, pool = INCEPTIONS[name]
    return c1 + c3 + c5 + pool


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1-3x3; 1x1-3x3 (torchvision's stand-in for the
    paper's 5x5, vision#906, kept for its weights); 3x3 max-pool-1x1."""

    widths: Sequence[int]
    conv: ModuleDef = ConvNormAct

    @nn.compact
    def __call__(self, x):
        c1, c3r, c3, c5r, c5, pool = self.widths
        b1 = self.conv(c1, 1, name="branch1")(x)
        b2 = self.conv(c3, 3, name="branch2_1")(self.conv(c3r, 1, name="branch2_0")(x))
        b3 = self.conv(c5, 3, name="branch3_1")(self.conv(c5r, 1, name="branch3_0")(x))
        b4 = self.conv(pool, 1, name="branch4_1")(max_pool(x, 3, 1, padding=1, ceil_mode=True))
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


def _basic_conv(train, bn_epsilon, bn_momentum, axis_name, dtype, param_dtype):
    """torchvision's BasicConv2d: bias-free conv, BatchNorm (eps 1e-3), ReLU."""
    conv = partial(Conv, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=normal_001)
    norm = partial(BatchNorm, use_running_average=not train, momentum=bn_momentum,
                   epsilon=bn_epsilon, axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)
    return partial(ConvNormAct, conv=conv, norm=norm)


class GoogLeNet(Backbone):
    """GoogLeNet backbone: C1 conv1, C2 conv3, C3 inception3b, C4 inception4e,
    C5 inception5b (each the deepest activation at strides 2..32, before the next pool).

    Only output_stride 32. `transform_input` maps ImageNet-normalised input to the
    [-1, 1] normalisation the ported weights expect, as torchvision's flag does.
    `aux_logits` also returns the inputs of torchvision's auxiliary classifiers,
    'aux1' (inception4a) and 'aux2' (inception4d), for `GoogLeNetHead`.
    """

    transform_input: bool = False
    aux_logits: bool = False
    bn_epsilon: float = option(1e-3)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        plan_output_stride((2,) * 5, self.output_stride, supported=(32,))
        widths = (64, 192, _width("3b"), _width("4e"), _width("5b"))
        infos = select_features(
            [FeatureInfo(f"C{k + 1}", 2 ** (k + 1), c) for k, c in enumerate(widths)],
            self.out_features)
        if self.aux_logits:
            infos += (FeatureInfo("aux1", 16, _width("4a")), FeatureInfo("aux2", 16, _width("4d")))
        return infos

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=15)
        info = self.feature_info
        conv = _basic_conv(train, self.bn_epsilon, self.bn_momentum, self.axis_name,
                           self.dtype, self.param_dtype)
        if self.transform_input:
            mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
            x = x * jnp.asarray(std / 0.5, x.dtype) + jnp.asarray((mean - 0.5) / 0.5, x.dtype)
        feats = {"C1": conv(64, 7, stride=2, name="conv1")(x)}
        x = max_pool(feats["C1"], 3, 2, ceil_mode=True)
        x = conv(64, 1, name="conv2")(x)
        feats["C2"] = x = conv(192, 3, name="conv3")(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        for name in INCEPTIONS:
            if name in ("4a", "5a"):
                x = max_pool(x, 3 if name == "4a" else 2, 2, ceil_mode=True)
            x = Inception(INCEPTIONS[name], conv=conv, name=f"inception{name}")(x)
            if name in TAPS:
                feats[TAPS[name]] = x
        return {f.name: feats[f.name] for f in info}


class InceptionAux(nn.Module):
    """torchvision's auxiliary classifier: adaptive 4x4 average pool, 1x1 conv (128),
    fc1 (1024, ReLU), dropout, fc2; flattened in NCHW order like torch."""

    num_classes: int
    drop_rate: float
    conv: ModuleDef
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(128, 1, name="conv")(adaptive_avg_pool(x, 4))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=normal_001)
        x = nn.relu(dense(1024, bias_init=torch_bias_init(x.shape[-1]), name="fc1")(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return dense(self.num_classes, bias_init=torch_bias_init(1024), name="fc2")(x)


class GoogLeNetHead(nn.Module):
    """Global average pool, dropout, `fc`; plus torchvision's two auxiliary classifiers
    when the backbone returns their inputs ('aux1', 'aux2'; on by default in
    `create_model`, off with `aux_logits=False`).

    Train mode with aux classifiers returns {'out', 'aux1', 'aux2'} logits; eval mode (or
    no aux) returns the logits, as torchvision. `aux_drop_rate` None means torchvision's
    0.7 when `drop_rate` > 0 and none when `drop_rate` is 0. `num_classes=0`: pooled features.
    """

    num_classes: int
    drop_rate: float = 0.0
    aux_drop_rate: float | None = None
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    backbone_defaults = {"aux_logits": True}  # create_model's defaults for the backbone

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = global_avg_pool(features["C5"])
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=normal_001, bias_init=torch_bias_init(x.shape[-1]),
                          name="fc")(x)
        if "aux1" not in features or not (train or self.is_initializing()):
            return logits
        aux_rate = self.aux_drop_rate
        if aux_rate is None:
            aux_rate = 0.7 if self.drop_rate > 0 else 0.0
        conv = _basic_conv(train, self.bn_epsilon, self.bn_momentum, self.axis_name,
                           self.dtype, self.param_dtype)
        aux = {k: InceptionAux(self.num_classes, aux_rate, conv, self.dtype, self.param_dtype,
                               name=k)(features[k], train) for k in ("aux1", "aux2")}
        return {"out": logits, **aux} if train else logits  # aux params exist from init on


_CBN = r"\.(conv|bn)"  # a BasicConv2d's two children
TORCHVISION_RULES = (
    (rf"(conv\d){_CBN}", r"backbone/\1/\2"),
    (rf"(inception\d\w)\.branch1{_CBN}", r"backbone/\1/branch1/\2"),
    (rf"(inception\d\w)\.branch(\d)\.(\d){_CBN}", r"backbone/\1/branch\2_\3/\4"),
    (rf"(aux\d)\.conv{_CBN}", r"head/\1/conv/\2"),
    (r"(aux\d)\.(fc\d)", r"head/\1/\2"),
    (r"fc", r"head/fc"),
)

# torchvision's pretrained GoogLeNet runs with transform_input=True on ImageNet-normalised
# input, which equals (x - 0.5) / 0.5: so the source asks for that normalisation instead.
TORCH_GOOGLENET = WeightSource("torchvision", rules=TORCHVISION_RULES,
                               mean=(0.5,) * 3, std=(0.5,) * 3)

register_variants("googlenet", weights=TORCH_GOOGLENET, head=GoogLeNetHead,
                  variants={"googlenet": GoogLeNet})
