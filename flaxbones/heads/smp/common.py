"""smp's shared blocks (segmentation_models_pytorch.base), as Flax modules.

Flax submodule names follow smp's torch layout so key rules stay short: a child `i` of a
torch `nn.Sequential` is the Flax submodule named `"i"` (Conv2dReLU's conv `0` and norm `1`,
SegmentationHead's conv `0`, ClassificationHead's linear `3`); named torch children keep
their names, one Sequential level flattened with `_` (SCSE's `cSE.1` is `cSE_1`). Each
block's `torch_rules(src, dst)` maps its torch keys under `src` (a regex) onto `dst` (a
template, backreferences allowed).

`SmpHead` is the base of the decoders' heads (`Smp<Name>Head`). Initialisers mirror smp's
`initialize_decoder` (`decoder_init`: kaiming-uniform fan-in convs, zero biases, BN 1/0) and
`initialize_head` (`head_init`: xavier-uniform, zero biases).
"""
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.base import SegmentationHead
from flaxbones.layers import BatchNorm, Conv, ModuleDef, resize_bilinear
from flaxbones.layers.module import option

decoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
head_init = nn.initializers.xavier_uniform()


def _clamp(x, lo: float = 0.0, hi: float = 1.0):
    return jnp.clip(x, lo, hi)


# smp's `Activation` names. torch's implicit-dim Softmax/LogSoftmax reduce over dim 1 of
# (N, C, H, W) and (N, C) alike: the channel axis, last in NHWC.
ACTIVATIONS: dict[Any, Callable] = {
    None: lambda x: x,
    "identity": lambda x: x,
    "sigmoid": nn.sigmoid,
    "softmax2d": lambda x: nn.softmax(x, axis=-1),
    "softmax": lambda x: nn.softmax(x, axis=-1),
    "logsoftmax": lambda x: nn.log_softmax(x, axis=-1),
    "tanh": jnp.tanh,
    "clamp": _clamp,
}


def activation(name) -> Callable:
    """smp's `Activation(name)` as a function on NHWC (or (N, C)) arrays; a callable is
    taken as the activation itself. smp's 'argmax'/'argmax2d' (integer outputs, not
    logits) are not supported: apply `jnp.argmax(..., axis=-1)` to the outputs instead."""
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; choose one of "
                         f"{[k for k in ACTIVATIONS if k is not None]}, None or a callable")
    return ACTIVATIONS[name]


def norm_type(use_norm) -> str:
    """smp's `use_norm` (True/False, 'batchnorm'/'identity', {'type': ...}) as 'batchnorm' or
    'identity'; smp's other norms ('inplace', 'layernorm', 'instancenorm') raise."""
    if isinstance(use_norm, bool):
        return "batchnorm" if use_norm else "identity"
    kind = use_norm.get("type") if isinstance(use_norm, dict) else use_norm
    extra = sorted(set(use_norm) - {"type"}) if isinstance(use_norm, dict) else []
    if not isinstance(kind, str) or kind.lower() not in ("batchnorm", "identity") or extra:
        raise ValueError(f"use_norm={use_norm!r} is not supported; flaxbones' smp decoders take "
                         "True/'batchnorm' or False/'identity' (no extra norm arguments)")
    return kind.lower()


def _suffix_rules(src: str, dst: str, layout) -> tuple:
    return tuple((src + "".join(rf"\.{p}" for p in t.split(".")), f"{dst}/{f}")
                 for t, f in layout)


class Conv2dReLU(nn.Module):
    """smp's Conv2dReLU: conv `0` (k x k, `stride`, symmetric `padding`; a bias only without
    a norm), BatchNorm `1` (none for `use_norm` False / 'identity'), ReLU. `conv` and `norm`
    are the owner's `conv_def()` and `norm_def(train)`; the kernel starts as smp's decoders."""

    features: int
    kernel_size: int
    padding: int = 0
    stride: int = 1
    use_norm: Any = "batchnorm"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x):
        bn = norm_type(self.use_norm) == "batchnorm"
        k, s, p = self.kernel_size, self.stride, self.padding
        x = self.conv(self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                      use_bias=not bn, kernel_init=decoder_init, name="0")(x)
        if bn:
            x = self.norm(name="1")(x)
        return nn.relu(x)

    @staticmethod
    def torch_rules(src: str, dst: str) -> tuple:
        return _suffix_rules(src, dst, (("0", "0"), ("1", "1")))


class SCSEModule(nn.Module):
    """smp's SCSEModule: x * cSE(x) + x * sSE(x). cSE: global average pool, 1x1 conv `cSE_1`
    to C // `reduction`, ReLU, 1x1 conv `cSE_3` back to C, sigmoid; sSE: 1x1 conv `sSE_0` to
    one channel, sigmoid. All convs have biases."""

    reduction: int = 16
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        one = dict(kernel_size=(1, 1), padding="VALID", use_bias=True, kernel_init=decoder_init)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = nn.relu(self.conv(c // self.reduction, **one, name="cSE_1")(s))
        s = nn.sigmoid(self.conv(c, **one, name="cSE_3")(s))
        q = nn.sigmoid(self.conv(1, **one, name="sSE_0")(x))
        return x * s + x * q

    @staticmethod
    def torch_rules(src: str, dst: str) -> tuple:
        return _suffix_rules(src, dst, (("cSE.1", "cSE_1"), ("cSE.3", "cSE_3"),
                                        ("sSE.0", "sSE_0")))


class Attention(nn.Module):
    """smp's `Attention(kind)`: the identity for None, `SCSEModule` (child `attention`, as
    smp's wrapper) for 'scse'; anything else raises."""

    kind: str | None = None
    reduction: int = 16
    conv: ModuleDef = Conv

    def __post_init__(self):
        if self.kind not in (None, "scse"):
            raise ValueError(f"attention {self.kind!r} is not implemented; choose None or 'scse'")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        if self.kind is None:
            return x
        return SCSEModule(self.reduction, self.conv, name="attention")(x)

    @staticmethod
    def torch_rules(src: str, dst: str) -> tuple:
        """Rules for the wrapper at `src` (its SCSE at `src.attention`)."""
        return SCSEModule.torch_rules(src + r"\.attention", dst + "/attention")


class SmpSegmentationHead(nn.Module):
    """smp's SegmentationHead: conv `0` (k x k, padding k // 2, bias) to `num_classes`, then
    `upsampling` x bilinear with align_corners=True (when > 1), then `activation`."""

    num_classes: int
    kernel_size: int = 3
    activation: Any = None
    upsampling: int = 1
    conv: ModuleDef = Conv

    def __post_init__(self):
        activation(self.activation)  # an unknown name fails at construction
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel_size, self.kernel_size // 2
        x = self.conv(self.num_classes, (k, k), padding=((p, p), (p, p)), use_bias=True,
                      kernel_init=head_init, name="0")(x)
        if self.upsampling > 1:
            size = (x.shape[1] * self.upsampling, x.shape[2] * self.upsampling)
            x = resize_bilinear(x, size, align_corners=True)
        return activation(self.activation)(x)

    @staticmethod
    def torch_rules(src: str = "segmentation_head", dst: str = "head/segmentation_head") -> tuple:
        return ((rf"{src}\.0", f"{dst}/0"),)


class SmpClassificationHead(nn.Module):
    """smp's ClassificationHead (its `aux_params`): global 'avg' or 'max' pool of `feature`
    (smp's deepest encoder feature), dropout, linear `3` (bias) to `num_classes`,
    `activation`. Takes the backbone's feature dict (or an NHWC array); returns (N, classes)."""

    num_classes: int
    pooling: str = "avg"
    dropout: float = 0.2
    activation: Any = None
    feature: str = "C5"
    kernel_init: Callable = head_init
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling should be one of ('max', 'avg'), got {self.pooling!r}")
        activation(self.activation)
        super().__post_init__()

    @property
    def levels(self) -> tuple[str, ...]:
        return (self.feature,)

    @nn.compact
    def __call__(self, features, train: bool = False):
        x = features[self.feature] if isinstance(features, dict) else features
        pool = jnp.mean if self.pooling == "avg" else jnp.max
        x = pool(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, name="3")(x)
        return activation(self.activation)(x)

    @staticmethod
    def torch_rules(src: str = "classification_head", dst: str = "classification_head") -> tuple:
        return ((rf"{src}\.3", f"{dst}/3"),)


class SmpHead(SegmentationHead):
    """Base of the smp heads: `encoder_depth` (checked against `min_depth`), `activation`
    (keyword-only, so subclasses keep their positional order), smp's final head."""

    encoder_depth: int = 5
    activation: Any = option(None)

    align_corners = True  # smp's final upsampling; an identity on the inputs smp accepts
    conv_init = staticmethod(decoder_init)  # smp's initialize_decoder
    min_depth = 3  # smp's multi-level decoders; the single-level ones take 1

    def __post_init__(self):
        self.check_options()
        super().__post_init__()

    @nn.nowrap
    def check_options(self):
        """ValueErrors at construction: the depth here, a head's own options in overrides."""
        low, depth = self.min_depth, self.encoder_depth
        if not low <= depth <= 5:
            raise ValueError(f"{type(self).__name__} needs encoder_depth in [{low}, 5], "
                             f"got {depth}")

    @property
    def first_level(self) -> int:
        """The finest level read: C1, or C2 for encoders without one (`encoder_has_c1`)."""
        return 1 if getattr(self, "encoder_has_c1", True) else 2

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(f"C{i}" for i in range(self.first_level, self.encoder_depth + 1))

    @nn.nowrap
    def smp_segmentation_head(self, kernel_size: int, upsampling: int = 1):
        """smp's SegmentationHead (`segmentation_head`) with this head's classes and activation."""
        return SmpSegmentationHead(self.num_classes, kernel_size, self.activation, upsampling,
                                   conv=self.conv_def(), name="segmentation_head")


__all__ = ["ACTIVATIONS", "Attention", "Conv2dReLU", "SCSEModule", "SmpClassificationHead",
           "SmpHead", "SmpSegmentationHead", "activation", "decoder_init", "head_init",
           "norm_type"]
