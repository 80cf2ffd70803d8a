"""Swin Transformer V1 and V2 in torchvision's layout: `features.0` (4x4 stride-4 conv +
LayerNorm), the stages `features.1/3/5/7` of shifted-window blocks (blocks alternate shift
0 and window // 2) and the patch mergings `features.2/4/6`. Flax modules are named
`features_N` (blocks `features_N_i`). The window tables, relative-position index and
shifted-window masks are numpy constants computed at trace time for each map's size."""
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers import torch_bias_init, torch_default_init
from flaxbones.layers.drop_path import drop_path
from flaxbones.registry import register_variants
from flaxbones.scan import BODY, scan_repeat
from flaxbones.weights.convert import DROP
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (embed_dim, depths, heads, window, version)
VARIANTS = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 1),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 1),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 1),
    "swin_v2_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 2),
    "swin_v2_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 8, 2),
    "swin_v2_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 8, 2),
}
# torchvision's stochastic_depth_prob for its recipes
TORCHVISION_DROP_PATH = {"swin_t": 0.2, "swin_s": 0.3, "swin_b": 0.5,
                         "swin_v2_t": 0.2, "swin_v2_s": 0.3, "swin_v2_b": 0.5}

_trunc_normal = nn.initializers.truncated_normal(0.02)


def layer_norm(module, name: str):
    """torch's LayerNorm(eps=1e-5) over channels, two-pass variance."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=module.dtype,
                        param_dtype=module.param_dtype, name=name)


def relative_position_index(window: int) -> np.ndarray:
    """(window^2 * window^2,) index into the (2 window - 1)^2 relative-offset table."""
    r = np.arange(window)
    coords = np.stack(np.meshgrid(r, r, indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).reshape(-1)


def relative_coords_table(window: int) -> np.ndarray:
    """V2's log-spaced relative coordinates, (1, 2 window - 1, 2 window - 1, 2) float32."""
    r = np.arange(-(window - 1), window, dtype=np.float32)
    table = np.stack(np.meshgrid(r, r, indexing="ij"), -1)[None] / np.float32(window - 1)
    table = table * np.float32(8)
    return (np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)).astype(
        np.float32)


def window_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
    """(windows, window^2, window^2) additive mask (0 or -100) of the shifted windows on a
    padded height x width map: tokens from different regions of the rolled map never mix."""
    regions = np.zeros((height, width), np.float32)
    h_cuts = ((0, -window), (-window, -shift[0]), (-shift[0], None))
    w_cuts = ((0, -window), (-window, -shift[1]), (-shift[1], None))
    for i, (h0, h1) in enumerate(h_cuts):
        for j, (w0, w1) in enumerate(w_cuts):
            regions[h0:h1, w0:w1] = 3 * i + j
    regions = regions.reshape(height // window, window, width // window, window)
    regions = regions.transpose(0, 2, 1, 3).reshape(-1, window * window)
    diff = regions[:, None, :] - regions[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0))


class QKV(nn.Module):
    """The joint q/k/v projection; V2 ignores the key's bias (torchvision zeroes it)."""

    features: int
    zero_key_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _trunc_normal, (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.zero_key_bias:
            third = self.features // 3
            bias = bias * np.repeat(np.float32([1, 0, 1]), third)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return x @ kernel + bias


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention as torchvision: pad to the window, roll
    by `shift` (0 in a dimension where one window covers the padded map), attend within
    windows with the relative-position bias (V1: a learned table; V2: `cpb_mlp` of log
    coordinates, cosine attention with `logit_scale`), and undo."""

    heads: int
    window: int
    shift: int
    version: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _bias(self):
        w, n = self.window, self.window ** 2
        index = relative_position_index(w)
        if self.version == 1:
            table = self.param("relative_position_bias_table", _trunc_normal,
                               ((2 * w - 1) ** 2, self.heads), self.param_dtype)
        else:
            dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=_trunc_normal)
            hidden = nn.relu(dense(512, name="cpb_mlp_0")(relative_coords_table(w)))
            table = dense(self.heads, use_bias=False, name="cpb_mlp_2")(hidden)
            table = table.reshape(-1, self.heads)
        bias = table[index].reshape(n, n, self.heads).transpose(2, 0, 1)
        return 16 * jax.nn.sigmoid(bias) if self.version == 2 else bias

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        win, hd = self.window, c // self.heads
        ph, pw = -h % win, -w % win
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        H, W = h + ph, w + pw
        shift = (0 if win >= H else self.shift, 0 if win >= W else self.shift)
        if any(shift):
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        x = x.reshape(b, H // win, win, W // win, win, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, -1, win * win, c)  # (batch, windows, tokens, channels)
        qkv = QKV(3 * c, self.version == 2, self.dtype, self.param_dtype, name="qkv")(x)
        q, k, v = qkv.reshape(*x.shape[:3], 3, self.heads, hd).transpose(3, 0, 1, 4, 2, 5)
        if self.version == 2:
            normalize = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True),
                                                  1e-12)
            scale = self.param("logit_scale",
                               lambda *_: jnp.full((self.heads, 1, 1), np.log(10.0),
                                                   self.param_dtype))
            attn = normalize(q) @ normalize(k).swapaxes(-1, -2)
            attn = attn * jnp.exp(jnp.minimum(scale, np.log(100.0))).astype(attn.dtype)
        else:
            attn = (q * hd ** -0.5) @ k.swapaxes(-1, -2)
        attn = attn + self._bias().astype(attn.dtype)
        if any(shift):
            attn = attn + window_mask(H, W, win, shift)[:, None].astype(attn.dtype)
        x = jax.nn.softmax(attn, axis=-1) @ v  # (batch, windows, heads, tokens, hd)
        x = x.transpose(0, 1, 3, 2, 4).reshape(*x.shape[:2], win * win, c)
        x = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_trunc_normal, name="proj")(x)
        x = x.reshape(b, H // win, W // win, win, win, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, H, W, c)
        if any(shift):
            x = jnp.roll(x, shift, axis=(1, 2))
        return x[:, :h, :w]


class SwinBlock(nn.Module):
    """V1: x + dp(attn(norm1(x))), x + dp(mlp(norm2(x))); V2 normalises after attention
    and MLP instead (res-post-norm). The drop-path rate is a call argument, so scanned
    blocks take their own."""

    dim: int
    heads: int
    window: int
    shift: int
    version: int = 1
    train: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_trunc_normal)
        attn = WindowAttention(self.heads, self.window, self.shift, self.version,
                               self.dtype, self.param_dtype, name="attn")
        norm1, norm2 = layer_norm(self, "norm1"), layer_norm(self, "norm2")

        def mlp(y):
            y = jax.nn.gelu(dense(4 * self.dim, name="mlp_0")(y), approximate=False)
            return dense(self.dim, name="mlp_3")(y)

        if self.version == 1:
            x = x + drop_path(self, attn(norm1(x)), drop_path_rate, self.train)
            return x + drop_path(self, mlp(norm2(x)), drop_path_rate, self.train)
        x = x + drop_path(self, norm1(attn(x)), drop_path_rate, self.train)
        return x + drop_path(self, norm2(mlp(x)), drop_path_rate, self.train)


class _Slot(nn.Module):
    """One block of a scanned pair, held as child `block` (scan.py's stacking layout)."""

    block: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, rate):
        return self.block(name=BODY)(x, rate)


class _Pair(nn.Module):
    """The repeating unit of a stage: an unshifted block (`shift0`) then a shifted one
    (`shift1`); `rates` holds their drop-path rates."""

    blocks: Sequence[Callable[..., nn.Module]]

    @nn.compact
    def __call__(self, x, rates):
        for j, block in enumerate(self.blocks):
            x = _Slot(block, name=f"shift{j}")(x, rates[j])
        return x


class PatchMerging(nn.Module):
    """Pad to even size, concatenate each 2x2 neighbourhood (torchvision's order), then
    V1: LayerNorm(4C) + Linear(4C -> 2C); V2: Linear then LayerNorm(2C)."""

    version: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], -1)
        reduction = nn.Dense(2 * c, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=_trunc_normal,
                             name="reduction")
        norm = layer_norm(self, "norm")
        return norm(reduction(x)) if self.version == 2 else reduction(norm(x))


class SwinTransformer(Backbone):
    """Swin (V1, `version=1`) / Swin V2 backbone (torchvision's): C2..C5 are the stages'
    outputs at strides 4..32 (the final LayerNorm belongs to the classifier head). Any input
    size: windows pad and crop as torchvision, patch merging pads odd maps (sizes round up
    after the stem). No dilation: output_stride 32 only. `drop_path_rate` is the last
    block's stochastic depth, linear from 0 over the blocks (torchvision's rule); 0 by
    default, torchvision's recipes use `TORCHVISION_DROP_PATH`. Every block is
    rematerialised under `remat`; `scan_blocks` runs each stage's (unshifted, shifted)
    block pairs in one `nn.scan` named `features_N_scan`."""

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window: int = 7
    version: int = 1
    drop_path_rate: float = option(0.0)
    scan_blocks: bool = option(False)

    supported_strides = (32,)
    conv_init = staticmethod(torch_default_init)

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"Swin version must be 1 or 2, got {self.version}")
        if self.scan_blocks and any(d % 2 for d in self.depths):
            raise ValueError(f"scan_blocks scans (unshifted, shifted) block pairs: every "
                             f"stage depth must be even, got {tuple(self.depths)}")
        super().__post_init__()

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        """{scanned slot: unscanned blocks}: each stage's even blocks stack into its scan's
        `shift0`, odd ones into `shift1`."""
        return {f"features_{2 * s + 1}_scan/{BODY}/shift{j}":
                [f"features_{2 * s + 1}_{i}" for i in range(j, d, 2)]
                for s, d in enumerate(self.depths) for j in (0, 1)}

    @property
    def _taps(self):
        widths = [self.embed_dim * 2 ** s for s in range(len(self.depths))]
        strides = (4, 1) + (2, 1) * (len(self.depths) - 1)
        channels = [widths[max(i - 1, 0) // 2] for i in range(len(strides))]
        plans = plan_output_stride(strides, self.output_stride, self.supported_strides)
        names = [f"features_{i}" for i in range(len(strides))]
        return sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps.values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=4)
        conv = self.conv_def(use_bias=True, bias_init=torch_bias_init(3 * 16))
        block = self.block_def(SwinBlock)
        x = conv(self.embed_dim, (4, 4), (4, 4), padding="VALID", name="features_0_conv")(x)
        x = layer_norm(self, "features_0_norm")(x)
        outputs = [x]
        total, done = sum(self.depths), 0
        for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            dim = self.embed_dim * 2 ** s
            if s:
                x = PatchMerging(self.version, self.dtype, self.param_dtype,
                                 name=f"features_{2 * s}")(x)
                outputs.append(x)
            rates = [self.drop_path_rate * (done + i) / max(total - 1, 1) for i in range(depth)]
            done += depth
            blocks = [partial(block, dim, heads, self.window, j * (self.window // 2),
                              self.version, train, self.dtype, self.param_dtype) for j in (0, 1)]
            if self.scan_blocks:
                x = scan_repeat(partial(_Pair, blocks), depth // 2, f"features_{2 * s + 1}_scan",
                                per_step=jnp.asarray(rates, jnp.float32).reshape(-1, 2))(x)
            else:
                for i, rate in enumerate(rates):
                    x = blocks[i % 2](name=f"features_{2 * s + 1}_{i}")(x, rate)
            outputs.append(x)
        return {name: outputs[i] for name, (i, _) in self._taps.items()}


_BLOCK = r"features\.([1357])\.(\d+)"
TORCH_RULES = (
    (r"features\.0\.0", "backbone/features_0_conv"),
    (r"features\.0\.2", "backbone/features_0_norm"),
    (r"features\.([246])\.(reduction|norm)", r"backbone/features_\1/\2"),
    (rf"{_BLOCK}\.(norm1|norm2|attn)", r"backbone/features_\1_\2/\3"),
    (rf"{_BLOCK}\.attn\.(qkv|proj)", r"backbone/features_\1_\2/attn/\3"),
    (rf"{_BLOCK}\.attn\.cpb_mlp\.([02])", r"backbone/features_\1_\2/attn/cpb_mlp_\3"),
    (rf"{_BLOCK}\.mlp\.([03])", r"backbone/features_\1_\2/mlp_\3"),
    (rf"{_BLOCK}\.attn\.(relative_position_index|relative_coords_table)", DROP),
)

# The eval transform of torchvision's default weights (bicubic; V2's at 256).
EVAL = {"swin_t": (224, 232), "swin_s": (224, 246), "swin_b": (224, 238),
        "swin_v2_t": (256, 260), "swin_v2_s": (256, 260), "swin_v2_b": (256, 272)}
for _name, (_dim, _depths, _heads, _window, _version) in VARIANTS.items():
    register_variants("swin", variants={_name: partial(
        SwinTransformer, embed_dim=_dim, depths=_depths, num_heads=_heads, window=_window,
        version=_version)}, weights=WeightSource(
            "torchvision", TORCH_RULES, input_size=EVAL[_name][0], resize_size=EVAL[_name][1],
            interpolation="bicubic", **TORCH_IMAGENET))
