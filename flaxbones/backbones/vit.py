"""Vision Transformer in torchvision's layout: `conv_proj` (patchify), `class_token`,
`encoder.pos_embedding`, the blocks `encoder.layers.encoder_layer_i` (ln_1, self_attention
with packed `in_proj`, ln_2, mlp.0 / mlp.3 with exact GELU) and `encoder.ln`; LayerNorm eps
1e-6. timm's ViT (patch_embed.proj, cls_token, pos_embed, blocks.i, norm) has the same
architecture and maps onto the same modules (`TIMM_RULES`)."""
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.backbones.vit_pyramid import PyramidLevel
from flaxbones.features import FeatureInfo, check_images, select_features
from flaxbones.layers.drop_path import drop_path
from flaxbones.registry import register_variants
from flaxbones.scan import scan_repeat
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource, timm_eval

# (patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
VARIANTS = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}
TIMM_VARIANTS = {
    "vit_small_patch16_224": (16, 12, 6, 384, 1536),
    "vit_base_patch16_224": (16, 12, 12, 768, 3072),
}
TOKEN = "class_token"  # the feature name of the (N, hidden) class token after the final norm


def layer_norm(module, name: str):
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=module.dtype,
                        param_dtype=module.param_dtype, name=name)


def _cubic(x, a):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def bicubic_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """(size_out, size_in) weights of torch's bicubic `F.interpolate` along one axis
    (align_corners=False). Plain: Keys' a=-0.75, taps clamped at the border. `antialias`:
    torch's `_upsample_bicubic2d_aa` (PIL's filter, a=-0.5, widened by the scale when
    downsampling, weights normalised)."""
    scale = size_in / size_out
    w = np.zeros((size_out, size_in))
    for i in range(size_out):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), size_in)
            taps = np.arange(lo, hi)
            weights = _cubic((taps - center + 0.5) / max(scale, 1.0), -0.5)
            w[i, taps] = weights / weights.sum()
        else:
            src = scale * (i + 0.5) - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                w[i, min(max(base + k, 0), size_in - 1)] += _cubic(src - (base + k), -0.75)
    return w


def resample_pos_embed(pos, old: tuple, new: tuple, antialias: bool = True):
    """timm's `resample_abs_pos_embed`: the (1, 1 + h*w, D) embedding's grid part resized
    bicubically from `old` to `new` (h, w); the class token's entry is kept."""
    if tuple(old) == tuple(new):
        return pos
    grid = pos[:, 1:].reshape(old[0], old[1], -1).astype(jnp.float32)
    wh, ww = (jnp.asarray(bicubic_matrix(o, n, antialias), jnp.float32)
              for o, n in zip(old, new))
    grid = jnp.einsum("ih,hwd,jw->ijd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, -1, grid.shape[-1]).astype(pos.dtype)], 1)


class PatchEmbed(nn.Module):
    """torch's Conv2d(3, dim, patch, stride=patch) (a `kernel` (p, p, in, dim) and `bias`, as
    nn.Conv's) computed as one matmul over non-overlapping patches: the same sums, and no
    p*p-tap convolution rewrite to compile. Rows and columns past the last whole patch are
    dropped, as the strided convolution does."""

    features: int
    patch: int
    kernel_init: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch
        n, h, w, c = x.shape[0], x.shape[1] // p, x.shape[2] // p, x.shape[3]
        kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x = x[:, :h * p, :w * p].reshape(n, h, p, w, p, c).astype(self.dtype)
        y = jnp.einsum("nhiwjc,ijcd->nhwd", x, kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with torch's packed q/k/v projection (`in_proj`)."""

    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, length, dim = x.shape
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * dim, name="in_proj")(x).reshape(n, length, 3, self.heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q / np.sqrt(q.shape[-1]).astype(q.dtype), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, dim)
        return dense(dim, name="out_proj")(y)


class EncoderBlock(nn.Module):
    """x + drop_path(attn(ln_1(x))), then + drop_path(mlp(ln_2(x))); the drop-path rate is
    a call argument, so scanned blocks take their own."""

    heads: int
    mlp_dim: int
    train: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        y = SelfAttention(self.heads, self.dtype, self.param_dtype, name="self_attention")(
            layer_norm(self, "ln_1")(x))
        x = x + drop_path(self, y, drop_path_rate, self.train)
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        y = jax.nn.gelu(dense(self.mlp_dim, name="mlp_0")(layer_norm(self, "ln_2")(x)),
                        approximate=False)
        y = dense(x.shape[-1], name="mlp_3")(y)
        return x + drop_path(self, y, drop_path_rate, self.train)


def _level(stride: float) -> str:
    """The C-level named by the nearest power of two (stride 14 -> C4)."""
    return f"C{round(math.log2(stride))}"


class VisionTransformer(Backbone):
    """ViT backbone: one stride, the patch size. By default the final-normed patch tokens as
    one map, named by the nearest level (C4 at stride 16 for /16 and at stride 14 for /14,
    C5 at stride 32 for /32; `feature_info` has the real stride), and the class token as
    the `class_token` tap (N, hidden; its FeatureInfo carries the patch stride) that
    `out_features` (the classifier) may ask for.

    `simple_pyramid` adds ViTDet's simple feature pyramid on that map: C2..C5 at strides
    4/8/16/32 with `pyramid_channels` each (power-of-two patch sizes only); `output_stride`
    16 keeps C5 at stride 16 (no max-pool), as a dilated CNN's last stage. Without it the
    only `output_stride` is the patch size: a ViT cannot dilate.

    Inputs of any size: the patch grid is floor(size / patch) and the position embedding
    (learned for `image_size`) is resampled bicubically as timm's `dynamic_img_size`
    (`pos_antialias`: torch's antialiased bicubic, timm's default). `drop_path_rate` is the
    last block's stochastic depth, linear from 0 (timm's rule; torchvision has none).
    Every block is rematerialised under `remat`; `scan_blocks` runs them in one `nn.scan`
    named `encoder_scan`."""

    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    image_size: int = option(224)
    output_stride: int | None = option(None)
    simple_pyramid: bool = option(False)
    pyramid_channels: int = option(256)
    pos_antialias: bool = option(True)
    drop_path_rate: float = option(0.0)
    scan_blocks: bool = option(False)

    conv_init = staticmethod(nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"))

    def __post_init__(self):
        if self.simple_pyramid and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"simple_pyramid needs a power-of-two patch size to reach strides "
                             f"4/8/16/32 by 2x steps; this ViT's patch size is {self.patch_size}")
        if self.output_stride is None:
            default = max(32, self.patch_size) if self.simple_pyramid else self.patch_size
            object.__setattr__(self, "output_stride", default)
        if self.output_stride not in self.supported_strides:
            raise ValueError(
                f"output_stride={self.output_stride} is not supported by this ViT: it has one "
                f"stride, its patch size {self.patch_size}, and cannot dilate"
                + (" (simple_pyramid=True adds stride 32)" if not self.simple_pyramid
                   and self.patch_size in (4, 8, 16) else "")
                + f"; choose one of {self.supported_strides}")
        super().__post_init__()

    @property
    def supported_strides(self):
        if self.simple_pyramid:
            return tuple(sorted({self.patch_size, max(32, self.patch_size)}))
        return (self.patch_size,)

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        return {"encoder_scan": [f"encoder_layer_{i}" for i in range(self.num_layers)]}

    @property
    def _levels(self) -> dict[str, int]:
        """{level: stride} of the maps."""
        if not self.simple_pyramid:
            return {_level(self.patch_size): self.patch_size}
        return {f"C{k}": min(2 ** k, self.output_stride) for k in range(2, 6)}

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        width = self.pyramid_channels if self.simple_pyramid else self.hidden_dim
        infos = [FeatureInfo(n, s, width) for n, s in self._levels.items()]
        token = FeatureInfo(TOKEN, self.patch_size, self.hidden_dim)
        if self.out_features is None:
            return tuple(infos)
        return select_features([*infos, token], self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, min_size=self.patch_size)
        p, dim = self.patch_size, self.hidden_dim
        x = PatchEmbed(dim, p, self.conv_init, self.dtype, self.param_dtype, name="conv_proj")(x)
        n, h, w, _ = x.shape
        token = self.param("class_token", nn.initializers.zeros, (1, 1, dim), self.param_dtype)
        grid = self.image_size // p
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, grid * grid + 1, dim),
                         self.param_dtype)
        pos = resample_pos_embed(pos, (grid, grid), (h, w), self.pos_antialias)
        x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (n, 1, dim)),
                             x.reshape(n, h * w, dim)], axis=1)
        x = x + pos.astype(x.dtype)
        rates = [self.drop_path_rate * i / max(self.num_layers - 1, 1)
                 for i in range(self.num_layers)]
        block = partial(self.block_def(EncoderBlock), self.num_heads, self.mlp_dim, train=train,
                        dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_blocks:
            x = scan_repeat(block, self.num_layers, "encoder_scan",
                            per_step=jnp.asarray(rates, jnp.float32))(x)
        else:
            for i, rate in enumerate(rates):
                x = block(name=f"encoder_layer_{i}")(x, rate)
        x = layer_norm(self, "encoder_ln")(x)
        fmap = x[:, 1:].reshape(n, h, w, dim)
        maps = {TOKEN: x[:, 0]}
        for f in self.feature_info:
            if f.name != TOKEN:  # only the pyramid levels asked for get parameters
                maps[f.name] = (self._pyramid_level(f.name, f.stride)(fmap)
                                if self.simple_pyramid else fmap)
        return {f.name: maps[f.name] for f in self.feature_info}

    def _pyramid_level(self, name, stride):
        return PyramidLevel(self.patch_size / stride, self.pyramid_channels,
                            self.conv_def(use_bias=False), self.pool_def(), self.cpu_kernels,
                            self.dtype, self.param_dtype, name=f"pyramid_{name}")


_ENCODER = r"encoder\.layers\.(encoder_layer_\d+)"
TORCH_RULES = (
    (r"", "backbone"),  # class_token
    (r"encoder", "backbone"),  # pos_embedding
    (r"conv_proj", "backbone/conv_proj"),
    (rf"{_ENCODER}\.(ln_[12])", r"backbone/\1/\2"),
    (rf"{_ENCODER}\.self_attention", r"backbone/\1/self_attention/in_proj"),
    (rf"{_ENCODER}\.self_attention\.out_proj", r"backbone/\1/self_attention/out_proj"),
    (rf"{_ENCODER}\.mlp\.([03])", r"backbone/\1/mlp_\2"),
    (r"encoder\.ln", "backbone/encoder_ln"),
)

# timm's keys (cls_token / pos_embed are aliases of class_token / pos_embedding).
TIMM_RULES = (
    (r"", "backbone"),
    (r"patch_embed\.proj", "backbone/conv_proj"),
    (r"blocks\.(\d+)\.norm1", r"backbone/encoder_layer_\1/ln_1"),
    (r"blocks\.(\d+)\.norm2", r"backbone/encoder_layer_\1/ln_2"),
    (r"blocks\.(\d+)\.attn\.qkv", r"backbone/encoder_layer_\1/self_attention/in_proj"),
    (r"blocks\.(\d+)\.attn\.proj", r"backbone/encoder_layer_\1/self_attention/out_proj"),
    (r"blocks\.(\d+)\.mlp\.fc1", r"backbone/encoder_layer_\1/mlp_0"),
    (r"blocks\.(\d+)\.mlp\.fc2", r"backbone/encoder_layer_\1/mlp_3"),
    (r"norm", "backbone/encoder_ln"),
)

_FIELDS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")
# The eval transform of torchvision's default weights; vit_h_14's (IMAGENET1K_SWAG_E2E_V1) are
# for 518 px images: load them with `image_size=518`.
EVAL = {"vit_l_16": dict(resize_size=242),
        "vit_h_14": dict(input_size=518, resize_size=518, interpolation="bicubic")}
_TORCH = WeightSource("torchvision", TORCH_RULES, **TORCH_IMAGENET)
for _name, _args in VARIANTS.items():
    register_variants("vit", weights=_TORCH.replace(**EVAL.get(_name, {})), variants={
        _name: partial(VisionTransformer, **dict(zip(_FIELDS, _args)))})
# timm's default (augreg, in21k fine-tuned on in1k) weights expect inputs in [-1, 1].
register_variants("vit", variants={
    name: partial(VisionTransformer, **dict(zip(_FIELDS, args)))
    for name, args in TIMM_VARIANTS.items()},
    weights=WeightSource("timm", TIMM_RULES, mean=(0.5,) * 3, std=(0.5,) * 3,
                         **timm_eval(224, 0.9)))
