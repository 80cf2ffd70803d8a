"""MaxViT in torchvision's layout: `stem` (3x3 stride-2 conv-BN-GELU, 3x3 conv with bias)
and the stages `blocks.S`, each of MaxViT layers `blocks.S.layers.I` = MBConv (pre-norm BN,
1x1, 3x3 depthwise (stride 2 in a stage's first layer), SE, 1x1; avg-pool + 1x1 shortcut
when strided) -> block (window) attention -> grid attention. Flax modules are named
`stem_N` and `blocks_S_I`. The relative-position index and the padding masks are numpy
constants computed at trace time for each map's size."""
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.backbones.swin import layer_norm, relative_position_index
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers import ConvNormAct, SqueezeExcite
from flaxbones.layers.drop_path import drop_path
from flaxbones.registry import register_variants
from flaxbones.weights.convert import DROP
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (stem_channels, block_channels, block_layers, head_dim, partition_size)
VARIANTS = {"maxvit_t": (64, (64, 128, 256, 512), (2, 2, 5, 2), 32, 7)}
# torchvision's stochastic_depth_prob for its recipe
TORCHVISION_DROP_PATH = {"maxvit_t": 0.2}

_normal = nn.initializers.normal(0.02)  # torchvision's MaxViT init of convs and linears
_gelu = partial(jax.nn.gelu, approximate=False)


def partition(x, p: int, grid: bool):
    """(B, H, W, C) -> (B, groups, p * p, C). Window: the p x p blocks; grid: the p x p
    tokens H / p and W / p apart (row-major within a group, as torchvision's)."""
    b, h, w, c = x.shape
    if grid:
        x = x.reshape(b, p, h // p, p, w // p, c).transpose(0, 2, 4, 1, 3, 5)
    else:
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, p * p, c)


def departition(x, p: int, grid: bool, h: int, w: int):
    """The inverse of `partition` onto an h x w map."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // p, w // p, p, p, c)
    x = x.transpose(0, 3, 1, 4, 2, 5) if grid else x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class MBConv(nn.Module):
    """proj(x) + dp(conv_c(SE(conv_b(conv_a(pre_norm(x)))))): `proj` is identity, or a 3x3
    stride-2 average pool (zeros counted, as torch) and a 1x1 conv with bias."""

    out_channels: int
    stride: int
    conv: Any
    norm: Any
    expansion_ratio: float = 4
    squeeze_ratio: float = 0.25
    train: bool = False

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        res = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            if self.stride == 2:
                res = nn.avg_pool(res, (3, 3), (2, 2), ((1, 1), (1, 1)), count_include_pad=True)
            res = self.conv(self.out_channels, (1, 1), use_bias=True, name="proj")(res)
        mid = int(self.out_channels * self.expansion_ratio)
        unit = partial(ConvNormAct, conv=self.conv, norm=self.norm, act=_gelu)
        y = self.norm(name="pre_norm")(x)
        y = unit(mid, 1, name="conv_a")(y)
        y = unit(mid, 3, self.stride, groups=mid, name="conv_b")(y)
        y = SqueezeExcite(int(self.out_channels * self.squeeze_ratio), act=nn.silu,
                          conv=self.conv, name="squeeze_excitation")(y)
        y = self.conv(self.out_channels, (1, 1), use_bias=True, name="conv_c")(y)
        return res + drop_path(self, y, drop_path_rate, self.train)


class RelativeAttention(nn.Module):
    """torchvision's RelativePositionalMultiHeadAttention on (B, groups, p * p, C): heads
    of `head_dim`, keys scaled by C ** -0.5 (the channel width, as torchvision), a learned
    relative-position bias; `mask` (groups, p * p) leaves padding keys out."""

    head_dim: int
    partition_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        c, p = x.shape[-1], self.partition_size
        heads = c // self.head_dim
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_normal)
        qkv = dense(3 * c, name="to_qkv")(x).reshape(*x.shape[:3], 3, heads, self.head_dim)
        q, k, v = qkv.transpose(3, 0, 1, 4, 2, 5)  # each (B, groups, heads, tokens, hd)
        attn = q @ (k * c ** -0.5).swapaxes(-1, -2)
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * p - 1) ** 2, heads), self.param_dtype)
        bias = table[relative_position_index(p)].reshape(p * p, p * p, heads).transpose(2, 0, 1)
        attn = attn + bias.astype(attn.dtype)
        if mask is not None:
            attn = jnp.where(mask[:, None, None, :], attn, jnp.finfo(attn.dtype).min)
        x = jax.nn.softmax(attn, axis=-1) @ v
        return dense(c, name="merge")(x.transpose(0, 1, 3, 2, 4).reshape(*x.shape[:2], -1, c))


class PartitionAttention(nn.Module):
    """x + dp(attn(LN(x))), x + dp(MLP(LN(x))) with attention inside windows (`grid=False`)
    or grids of `partition_size`. A map that is not a multiple of it is zero-padded after
    the norm and cropped after the attention, padding keys masked out (torchvision cannot
    run such maps)."""

    head_dim: int
    partition_size: int
    grid: bool
    mlp_ratio: int = 4
    train: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        _, h, w, c = x.shape
        p = self.partition_size
        pads = ((0, 0), (0, -h % p), (0, -w % p), (0, 0))
        y = jnp.pad(layer_norm(self, "attn_layer_0")(x), pads)
        H, W = y.shape[1:3]
        mask = None
        if (H, W) != (h, w):
            valid = np.pad(np.ones((1, h, w, 1), bool), pads)
            mask = partition(valid, p, self.grid).reshape(-1, p * p)
        y = partition(y, p, self.grid)
        y = RelativeAttention(self.head_dim, p, self.dtype, self.param_dtype,
                              name="attn_layer_1")(y, mask)
        y = departition(y, p, self.grid, H, W)[:, :h, :w]
        x = x + drop_path(self, y, drop_path_rate, self.train)
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_normal)
        y = layer_norm(self, "mlp_layer_0")(x)
        y = dense(c, name="mlp_layer_3")(_gelu(dense(self.mlp_ratio * c, name="mlp_layer_1")(y)))
        return x + drop_path(self, y, drop_path_rate, self.train)


class MaxVitLayer(nn.Module):
    """MBConv, window attention, grid attention; one drop-path rate for all three."""

    out_channels: int
    stride: int
    head_dim: int
    partition_size: int
    conv: Any
    norm: Any
    train: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        x = MBConv(self.out_channels, self.stride, self.conv, self.norm, train=self.train,
                   name="MBconv")(x, drop_path_rate)
        attention = partial(PartitionAttention, self.head_dim, self.partition_size,
                            train=self.train, dtype=self.dtype, param_dtype=self.param_dtype)
        x = attention(False, name="window_attention")(x, drop_path_rate)
        return attention(True, name="grid_attention")(x, drop_path_rate)


class MaxVit(Backbone):
    """MaxViT backbone (torchvision's): C1 is the stem (stride 2), C2.. the stages' outputs
    at strides 4..32 (the final LayerNorm belongs to the classifier head). Any input size:
    each attention pads its map to a multiple of `partition_size` and crops after (padding
    keys masked), where torchvision accepts only square inputs whose every stage map is a
    multiple of it; there the two agree. No dilation: output_stride 32 only. BatchNorm
    eps 1e-3, torch momentum 0.01. `drop_path_rate` is the last layer's stochastic depth,
    linear from 0 over the layers (torchvision's rule); 0 by default, torchvision's recipe
    uses `TORCHVISION_DROP_PATH`. Every layer is rematerialised under `remat`."""

    stem_channels: int = 64
    block_channels: Sequence[int] = (64, 128, 256, 512)
    block_layers: Sequence[int] = (2, 2, 5, 2)
    head_dim: int = 32
    partition_size: int = 7
    drop_path_rate: float = option(0.0)
    bn_epsilon: float = option(1e-3)
    bn_momentum: float = option(0.99)

    supported_strides = (32,)
    conv_init = staticmethod(_normal)

    def __post_init__(self):
        bad = [c for c in self.block_channels if c % self.head_dim]
        if bad:
            raise ValueError(f"MaxVit's block_channels {tuple(self.block_channels)} must be "
                             f"multiples of head_dim={self.head_dim}")
        if len(self.block_channels) != len(self.block_layers):
            raise ValueError("MaxVit needs one entry of block_layers per block_channels")
        super().__post_init__()

    @property
    def _taps(self):
        strides = (2,) * (len(self.block_channels) + 1)
        channels = (self.stem_channels, *self.block_channels)
        plans = plan_output_stride(strides, self.output_stride, self.supported_strides)
        names = ["stem"] + [f"blocks_{s}" for s in range(len(self.block_channels))]
        return sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps.values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        conv, norm = self.conv_def(), self.norm_def(train)
        x = ConvNormAct(self.stem_channels, 3, 2, conv=conv, norm=norm, act=_gelu,
                        name="stem_0")(x)
        x = conv(self.stem_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                 name="stem_1")(x)
        outputs = [x]
        layer = self.block_def(MaxVitLayer)
        total, done = sum(self.block_layers), 0
        for s, (width, depth) in enumerate(zip(self.block_channels, self.block_layers)):
            for i in range(depth):
                rate = self.drop_path_rate * (done + i) / max(total - 1, 1)
                x = layer(width, 2 if i == 0 else 1, self.head_dim, self.partition_size, conv,
                          norm, train, self.dtype, self.param_dtype,
                          name=f"blocks_{s}_{i}")(x, rate)
            done += depth
            outputs.append(x)
        return {name: outputs[i] for name, (i, _) in self._taps.items()}


_LAYER = r"blocks\.(\d+)\.layers\.(\d+)\.layers"
_TO = r"backbone/blocks_\1_\2"
TORCH_RULES = (
    (r"stem\.0\.0", "backbone/stem_0/conv"),
    (r"stem\.0\.1", "backbone/stem_0/bn"),
    (r"stem\.1\.0", "backbone/stem_1"),
    (rf"{_LAYER}\.MBconv\.proj\.[01]", rf"{_TO}/MBconv/proj"),
    (rf"{_LAYER}\.MBconv\.layers\.(pre_norm|conv_c)", rf"{_TO}/MBconv/\3"),
    (rf"{_LAYER}\.MBconv\.layers\.(conv_[ab])\.0", rf"{_TO}/MBconv/\3/conv"),
    (rf"{_LAYER}\.MBconv\.layers\.(conv_[ab])\.1", rf"{_TO}/MBconv/\3/bn"),
    (rf"{_LAYER}\.MBconv\.layers\.squeeze_excitation\.(fc[12])",
     rf"{_TO}/MBconv/squeeze_excitation/\3"),
    (rf"{_LAYER}\.(window|grid)_attention\.(attn_layer|mlp_layer)\.(\d)",
     rf"{_TO}/\3_attention/\4_\5"),
    (rf"{_LAYER}\.(window|grid)_attention\.attn_layer\.1\.(to_qkv|merge)",
     rf"{_TO}/\3_attention/attn_layer_1/\4"),
    (rf"{_LAYER}\.(window|grid)_attention\.attn_layer\.1\.relative_position_index", DROP),
)

register_variants("maxvit", variants={
    name: partial(MaxVit, stem_channels=stem, block_channels=channels, block_layers=layers,
                  head_dim=head_dim, partition_size=p)
    for name, (stem, channels, layers, head_dim, p) in VARIANTS.items()},
    weights=WeightSource("torchvision", TORCH_RULES, resize_size=224, interpolation="bicubic",
                         **TORCH_IMAGENET))
