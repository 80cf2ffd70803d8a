"""Classification heads and the torch key rules of their reference layouts.

Every head takes the backbone's feature dict and returns logits (N, num_classes), or the
pooled / pre-logit features with `num_classes=0`. An auxiliary head (GoogLeNet's) returns
a dict of named logits. `levels` names what a head reads, checked at construction.
"""
from functools import partial
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.features import LEVELS
from flaxbones.layers import (ConvNormAct, ConvNormModule, adaptive_avg_pool, global_avg_pool,
                              normal_001, torch_bias_init, torch_default_init)


def _dense(features, fan_in, dtype, param_dtype, kernel_init=torch_default_init,
           zero_bias=False, name=None):
    bias_init = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                    bias_init=bias_init, name=name)


class ClassifierHead(nn.Module):
    """Global average pool of `feature` (default: the deepest C-level; a (N, C) feature such
    as a ViT's `class_token` is taken as it is), dropout, dense `fc`.

    `num_classes=0` returns the pooled features (timm's `reset_classifier(0)`).
    """

    num_classes: int
    drop_rate: float = 0.0
    feature: str | None = None
    kernel_init: Callable = torch_default_init
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def levels(self) -> tuple[str, ...]:
        return () if self.feature is None else (self.feature,)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        levels = [name for name in features if name in LEVELS] or list(features)
        x = features[self.feature or max(levels)]
        x = global_avg_pool(x) if x.ndim == 4 else x  # a vector already: a ViT's class token
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return _dense(self.num_classes, x.shape[-1], self.dtype, self.param_dtype,
                      self.kernel_init, name="fc")(x)

    @staticmethod
    def torch_rules(fc: str) -> tuple:
        """A reference classifier's final Linear at torch module path `fc` (a regex)."""
        return ((fc, "head/fc"),)


class FCHead(nn.Module):
    """torchvision's AlexNet/VGG classifier: adaptive average pool to `pool_size`, then
    fc6 and fc7 (`hidden` units, ReLU, dropout) and fc8.

    The pooled map is flattened in NCHW order so torch's Linear weights load unchanged.
    Dropout sits after fc6/fc7 (VGG) or before them (`drop_before_fc`, AlexNet).
    `num_classes=0` returns fc7's activations (timm's pre-logits).
    """

    num_classes: int
    drop_rate: float = 0.0
    pool_size: int = 7
    hidden: int = 4096
    drop_before_fc: bool = False
    feature: str = "C5"
    kernel_init: Callable = torch_default_init
    zero_bias: bool = False  # torchvision's VGG init; else torch.nn.Linear's default
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def levels(self) -> tuple[str, ...]:
        return (self.feature,)

    def _fc(self, features, fan_in, name):
        return _dense(features, fan_in, self.dtype, self.param_dtype, self.kernel_init,
                      self.zero_bias, name=name)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = adaptive_avg_pool(features[self.feature], self.pool_size)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        drop = nn.Dropout(self.drop_rate, deterministic=not train)
        for name in ("fc6", "fc7"):
            x = drop(x) if self.drop_before_fc else x
            x = nn.relu(self._fc(self.hidden, x.shape[-1], name)(x))
            x = x if self.drop_before_fc else drop(x)
        if self.num_classes == 0:
            return x
        return self._fc(self.num_classes, x.shape[-1], "fc8")(x)

    @staticmethod
    def torch_rules(drop_before_fc: bool = False) -> tuple:
        """torchvision's `classifier` Sequential: VGG (Linear, ReLU, Dropout) x2, Linear;
        AlexNet (Dropout, Linear, ReLU) x2, Linear."""
        indices = (1, 4, 6) if drop_before_fc else (0, 3, 6)
        return tuple((rf"classifier\.{i}", f"head/{fc}") for i, fc in zip(indices, ("fc6", "fc7", "fc8")))


class MobileNetV3Head(nn.Module):
    """torchvision's MobileNetV3 classifier: pool C5 -> Linear `hidden` -> hard-swish ->
    dropout -> `fc`. `num_classes=0` returns the pooled C5 features."""

    num_classes: int
    drop_rate: float = 0.0
    hidden_channels: int = 1280
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    levels = ("C5",)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = global_avg_pool(features["C5"])
        if self.num_classes == 0:
            return x
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=normal_001)
        x = nn.hard_swish(dense(self.hidden_channels, name="hidden")(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return dense(self.num_classes, name="fc")(x)

    @staticmethod
    def torch_rules() -> tuple:
        return ((r"classifier\.0", "head/hidden"), (r"classifier\.3", "head/fc"))


class LayerNormHead(nn.Module):
    """torchvision's ConvNeXt classifier: pool C5 -> LayerNorm (eps 1e-6) -> `fc`; with
    `norm_first` (Swin's, eps 1e-5) LayerNorm over C5's map, then pool. `num_classes=0`
    returns the normalised pooled features (timm's pre-logits)."""

    num_classes: int
    drop_rate: float = 0.0
    norm_first: bool = False
    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    levels = ("C5",)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        norm = nn.LayerNorm(epsilon=self.epsilon, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="norm")
        x = features["C5"]
        x = global_avg_pool(norm(x)) if self.norm_first else norm(global_avg_pool(x))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return _dense(self.num_classes, x.shape[-1], self.dtype, self.param_dtype,
                      zero_bias=True, name="fc")(x)

    @staticmethod
    def torch_rules(norm: str = r"classifier\.0", fc: str = r"classifier\.2") -> tuple:
        return ((norm, "head/norm"), (fc, "head/fc"))


class MaxVitHead(LayerNormHead):
    """torchvision's MaxViT classifier: pool the deepest C-level -> LayerNorm (eps 1e-5) ->
    `pre_logits` Linear + tanh -> `fc` (no bias); N(0, 0.02) linears. `num_classes=0`
    returns the tanh features (timm's pre-logits). A LayerNormHead, so
    `train.remat_blocks` leaves it alone."""

    epsilon: float = 1e-5

    levels = ()

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.02))
        x = global_avg_pool(features[max(name for name in features if name in LEVELS)])
        x = nn.LayerNorm(epsilon=self.epsilon, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)
        x = jnp.tanh(dense(x.shape[-1], name="pre_logits")(x))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return dense(self.num_classes, use_bias=False, name="fc")(x)

    @staticmethod
    def torch_rules() -> tuple:
        return ((r"classifier\.2", "head/norm"), (r"classifier\.3", "head/pre_logits"),
                (r"classifier\.5", "head/fc"))


class InceptionAux(nn.Module):
    """torchvision's GoogLeNet auxiliary classifier: adaptive 4x4 average pool, 1x1
    conv-BN-ReLU (128), fc1 (1024, ReLU), dropout, fc2; flattened in NCHW order as torch."""

    num_classes: int
    drop_rate: float
    conv: Callable
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(128, 1, name="conv")(adaptive_avg_pool(x, 4))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(_dense(1024, x.shape[-1], kernel_init=normal_001, name="fc1", **dtypes)(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return _dense(self.num_classes, 1024, kernel_init=normal_001, name="fc2", **dtypes)(x)


class GoogLeNetAux(ConvNormModule):
    """GoogLeNet's two auxiliary classifiers, `aux1` on inception4a and `aux2` on
    inception4d: {'aux1': logits, 'aux2': logits}, in train and eval mode alike.

    BatchNorm settings (epsilon 1e-3 as torchvision, momentum, `axis_name`) follow the
    backbone's. `drop_rate` None is torchvision's 0.7.
    """

    num_classes: int
    drop_rate: float | None = None
    inputs: Sequence[str] = ("inception4a", "inception4d")

    conv_init = staticmethod(normal_001)

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        if self.num_classes < 1:
            raise ValueError("GoogLeNet's auxiliary classifiers need num_classes >= 1; "
                             "build with aux_logits=False for pooled features")
        rate = 0.7 if self.drop_rate is None else self.drop_rate
        conv = partial(ConvNormAct, conv=self.conv_def(), norm=self.norm_def(train))
        aux = partial(self.block_def(InceptionAux), self.num_classes, rate, conv, self.dtype,
                      self.param_dtype)
        return {f"aux{i}": aux(name=f"aux{i}")(features[level], train)
                for i, level in enumerate(self.inputs, 1)}

    @staticmethod
    def torch_rules() -> tuple:
        return ((r"(aux\d)\.conv\.(conv|bn)", r"aux_head/\1/conv/\2"),
                (r"(aux\d)\.(fc\d)", r"aux_head/\1/\2"))


class InceptionV3Aux(ConvNormModule):
    """torchvision's Inception v3 auxiliary classifier on `feature` (Mixed_6e):
    {'aux': logits} in train and eval mode alike. 5x5 stride-3 average pool, 1x1
    conv-BN-ReLU (128), 5x5 VALID conv-BN-ReLU (768), global pool, `fc`. It needs a
    17x17 input map (images of about 299 px); smaller raise, build with aux_logits=False.
    BatchNorm settings (epsilon 1e-3 as torchvision) follow the backbone's; `drop_rate` is
    unused (torchvision's aux head has no dropout)."""

    num_classes: int
    drop_rate: float | None = None
    feature: str = "C4"

    conv_init = staticmethod(nn.initializers.normal(0.1))

    @property
    def levels(self) -> tuple[str, ...]:
        return (self.feature,)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        if self.num_classes < 1:
            raise ValueError("Inception v3's auxiliary classifier needs num_classes >= 1; "
                             "build with aux_logits=False for pooled features")
        x = features[self.feature]
        if min(x.shape[1:3]) < 17:
            raise ValueError(f"Inception v3's auxiliary classifier needs a 17x17 {self.feature} "
                             f"map (about 299 px images), got {x.shape[1]}x{x.shape[2]}; "
                             "build with aux_logits=False for smaller images")
        norm = self.norm_def(train)
        x = nn.avg_pool(x, (5, 5), (3, 3))
        x = nn.relu(norm(name="conv0_bn")(self.conv_def()(128, (1, 1), name="conv0_conv")(x)))
        x = self.conv_def(kernel_init=normal_001)(768, (5, 5), padding="VALID",
                                                  name="conv1_conv")(x)
        x = global_avg_pool(nn.relu(norm(name="conv1_bn")(x)))
        return {"aux": _dense(self.num_classes, 768, self.dtype, self.param_dtype,
                              nn.initializers.normal(0.001), name="fc")(x)}

    @staticmethod
    def torch_rules() -> tuple:
        return ((r"AuxLogits\.(conv\d)\.(conv|bn)", r"aux_head/\1_\2"),
                (r"AuxLogits\.fc", "aux_head/fc"))


class SqueezeNetHead(ConvNormModule):
    """torchvision's SqueezeNet classifier: dropout, 1x1 conv `final_conv` (with bias) to
    the classes, ReLU, global average pool, on `feature` (the deepest level, C4).
    `num_classes=0` returns the pooled features. A ConvNormModule (its conv built by
    `conv_def`) so `train.remat_blocks` accepts it."""

    num_classes: int
    drop_rate: float = 0.0
    feature: str = "C4"

    conv_init = staticmethod(normal_001)

    @property
    def levels(self) -> tuple[str, ...]:
        return (self.feature,)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = features[self.feature]
        if self.num_classes == 0:
            return global_avg_pool(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = self.conv_def(use_bias=True)(self.num_classes, (1, 1), name="final_conv")(x)
        return global_avg_pool(nn.relu(x))

    @staticmethod
    def torch_rules() -> tuple:
        return ((r"classifier\.1", "head/final_conv"),)
