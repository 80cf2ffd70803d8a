"""ConvNeXt in torchvision's layout: `features.0` (4x4 stride-4 conv + LayerNorm), the
stages `features.1/3/5/7` of CNBlocks (7x7 depthwise conv, LayerNorm, 4x MLP with exact
GELU, layer scale, stochastic depth) and the downsamplers `features.2/4/6` (LayerNorm +
2x2 stride-2 conv). Flax modules are named `features_N` (stages `features_N_i`).

ConvNeXt V2 (timm's `convnextv2_*`) is the same network with Global Response Normalization
after the MLP's GELU and no layer scale; its timm files load through `TIMM_RULES`."""
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers.cpu_conv import loop_conv
from flaxbones.layers.drop_path import drop_path
from flaxbones.registry import register_variants
from flaxbones.scan import scan_repeat
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource, timm_eval

# (widths, depths) per variant, and torchvision's stochastic_depth_prob for its recipe
VARIANTS = {
    "convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
}
# timm's ConvNeXt V2 (widths, depths); atto..nano are timm's own sizes
V2_VARIANTS = {
    "convnextv2_atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "convnextv2_femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "convnextv2_pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "convnextv2_nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "convnextv2_tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "convnextv2_small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "convnextv2_base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnextv2_large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "convnextv2_huge": ((352, 704, 1408, 2816), (3, 3, 27, 3)),
}
TORCHVISION_DROP_PATH = {"convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5,
                         "convnext_large": 0.5}


def layer_norm(module, name: str):
    """torch's LayerNorm(eps=1e-6) over channels (NHWC's last axis), two-pass variance."""
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=module.dtype,
                        param_dtype=module.param_dtype, name=name)


def _trunc_normal(key, shape, dtype=jnp.float32):
    """torchvision's ConvNeXt init for conv and linear weights: trunc_normal(std=0.02)."""
    return 0.02 * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN over NHWC: x + bias + scale * x * g / (mean_c(g) + eps), g the
    per-channel L2 norm over space (statistics in fp32). Zero-initialised: the identity.
    A channel that is zero everywhere gets a zero gradient, as torch's norm gives it."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = (self.param(name, nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
                       for name in ("scale", "bias"))
        squares = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True)
        nonzero = squares > 0  # an all-zero channel (a padded example) gets torch's 0 gradient
        g = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
        n = (g / (jnp.mean(g, axis=-1, keepdims=True) + self.epsilon)).astype(x.dtype)
        return x + bias.astype(x.dtype) + scale.astype(x.dtype) * (x * n)


class CNBlock(nn.Module):
    """x + drop_path(layer_scale * MLP(LN(dwconv7x7(x)))), the MLP with GRN after its GELU
    when `grn` (V2); `layer_scale` is its initial value, None for none. The drop-path rate
    is a call argument, so scanned blocks take their own."""

    dim: int
    dilation: int
    conv: Any
    train: bool = False
    grn: bool = False
    layer_scale: float | None = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, drop_path_rate=0.0):
        d = self.dilation
        y = self.conv(self.dim, (7, 7), padding=((3 * d, 3 * d), (3 * d, 3 * d)),
                      kernel_dilation=(d, d), feature_group_count=self.dim, use_bias=True,
                      name="dwconv")(x)
        y = layer_norm(self, "norm")(y)
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_trunc_normal)
        y = jax.nn.gelu(dense(4 * self.dim, name="pwconv1")(y), approximate=False)
        if self.grn:
            y = GlobalResponseNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="grn")(y)
        y = dense(self.dim, name="pwconv2")(y)
        if self.layer_scale is not None:
            scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale),
                               (self.dim,), self.param_dtype)
            y = y * scale.astype(y.dtype)
        return x + drop_path(self, y, drop_path_rate, self.train)


class ConvNeXt(Backbone):
    """ConvNeXt backbone (torchvision's): C2..C5 are the stages' outputs at strides 4..32
    (no stride-2 level). `output_stride` 8/16 turns the later downsamplers into 2x2 stride-1
    convs dilated by the stride they drop ('same' padding, as timm) and dilates the stages
    after them. `drop_path_rate` is the last block's stochastic depth, linear from 0 over
    the blocks (torchvision's rule); 0 by default, torchvision's recipes use
    `TORCHVISION_DROP_PATH`. Every block is rematerialised under `remat`; `scan_blocks`
    runs each stage's blocks in one `nn.scan` named `features_N_scan` (per-block drop-path
    rates as its input). `grn=True, layer_scale=None` is ConvNeXt V2 (timm's; the same
    linear drop-path rule)."""

    widths: Sequence[int] = VARIANTS["convnext_tiny"][0]
    depths: Sequence[int] = VARIANTS["convnext_tiny"][1]
    drop_path_rate: float = option(0.0)
    scan_blocks: bool = option(False)
    grn: bool = option(False)
    layer_scale: float | None = option(1e-6)

    conv_init = staticmethod(_trunc_normal)

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        """{scanned module: unscanned blocks}: every stage with more than one block."""
        return {f"features_{2 * s + 1}_scan": [f"features_{2 * s + 1}_{i}" for i in range(d)]
                for s, d in enumerate(self.depths) if d > 1}

    @property
    def _taps(self):
        strides = (4, 1, 2, 1, 2, 1, 2, 1)
        channels = (self.widths[0], self.widths[0], self.widths[1], self.widths[1],
                    self.widths[2], self.widths[2], self.widths[3], self.widths[3])
        plans = plan_output_stride(strides, self.output_stride)
        names = [f"features_{i}" for i in range(len(strides))]
        return plans, sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps[1].values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, taps = self._taps
        conv = self.conv_def(use_bias=True, bias_init=nn.initializers.zeros)
        block = self.block_def(CNBlock)
        x = conv(self.widths[0], (4, 4), (4, 4), padding="VALID", name="features_0_conv")(x)
        x = layer_norm(self, "features_0_norm")(x)
        outputs = [x]
        total, done = sum(self.depths), 0
        scanned = self.scan_groups() if self.scan_blocks else {}
        for s, (width, depth) in enumerate(zip(self.widths, self.depths)):
            if s:
                plan = plans[2 * s]
                x = layer_norm(self, f"features_{2 * s}_norm")(x)
                x = self._downsample(conv, width, plan, name=f"features_{2 * s}_conv")(x)
                outputs.append(x)
            rates = [self.drop_path_rate * (done + i) / max(total - 1, 1) for i in range(depth)]
            done += depth
            stage = partial(block, width, plans[2 * s + 1].dilation, train=train, grn=self.grn,
                            layer_scale=self.layer_scale, dtype=self.dtype,
                            param_dtype=self.param_dtype)
            if f"features_{2 * s + 1}_scan" in scanned:
                x = scan_repeat(partial(stage, loop_conv(conv)), depth,
                                f"features_{2 * s + 1}_scan",
                                per_step=jnp.asarray(rates, jnp.float32))(x)
            else:
                for i, rate in enumerate(rates):
                    x = stage(conv, name=f"features_{2 * s + 1}_{i}")(x, rate)
            outputs.append(x)
        return {name: outputs[i] for name, (i, _) in taps.items()}

    @staticmethod
    def _downsample(conv, width, plan, name):
        """2x2 stride-2 conv, or (dilated) stride-1 with timm's 'same' padding."""
        if plan.stride > 1:
            return conv(width, (2, 2), (2, 2), padding="VALID", name=name)
        d = plan.first_dilation
        pads = ((d // 2, d - d // 2),) * 2
        return conv(width, (2, 2), padding=pads, kernel_dilation=(d, d), name=name)


TORCH_RULES = (
    (r"features\.0\.0", "backbone/features_0_conv"),
    (r"features\.0\.1", "backbone/features_0_norm"),
    (r"features\.([246])\.0", r"backbone/features_\1_norm"),
    (r"features\.([246])\.1", r"backbone/features_\1_conv"),
    (r"features\.([1357])\.(\d+)", r"backbone/features_\1_\2"),
    (r"features\.([1357])\.(\d+)\.block\.0", r"backbone/features_\1_\2/dwconv"),
    (r"features\.([1357])\.(\d+)\.block\.2", r"backbone/features_\1_\2/norm"),
    (r"features\.([1357])\.(\d+)\.block\.3", r"backbone/features_\1_\2/pwconv1"),
    (r"features\.([1357])\.(\d+)\.block\.5", r"backbone/features_\1_\2/pwconv2"),
)

# timm's ConvNeXt keys (stem, stages.S.downsample / blocks.I, layer scale `gamma`, V2's
# `mlp.grn`) onto the same modules: timm's V2 files load, and timm's dilated models check
# `output_stride`. timm's smaller V2s (atto..nano) keep fc1/fc2 as 1x1 convs: same values.
TIMM_RULES = (
    (r"stem\.0", "backbone/features_0_conv"),
    (r"stem\.1", "backbone/features_0_norm"),
    *((rf"stages\.{s}\.downsample\.0", f"backbone/features_{2 * s}_norm") for s in (1, 2, 3)),
    *((rf"stages\.{s}\.downsample\.1", f"backbone/features_{2 * s}_conv") for s in (1, 2, 3)),
    *(rule for s in range(4) for rule in (
        (rf"stages\.{s}\.blocks\.(\d+)", rf"backbone/features_{2 * s + 1}_\1"),
        (rf"stages\.{s}\.blocks\.(\d+)\.conv_dw", rf"backbone/features_{2 * s + 1}_\1/dwconv"),
        (rf"stages\.{s}\.blocks\.(\d+)\.norm", rf"backbone/features_{2 * s + 1}_\1/norm"),
        (rf"stages\.{s}\.blocks\.(\d+)\.mlp\.fc1", rf"backbone/features_{2 * s + 1}_\1/pwconv1"),
        (rf"stages\.{s}\.blocks\.(\d+)\.mlp\.fc2", rf"backbone/features_{2 * s + 1}_\1/pwconv2"),
        (rf"stages\.{s}\.blocks\.(\d+)\.mlp\.grn", rf"backbone/features_{2 * s + 1}_\1/grn"),
    )),
    (r"head\.norm", "head/norm"),
    (r"head\.fc", "head/fc"),
)

# The eval transform of each name's default weights (torchvision's; timm's default tag).
EVAL = {"convnext_tiny": dict(resize_size=236), "convnext_small": dict(resize_size=230),
        "convnext_base": dict(resize_size=232), "convnext_large": dict(resize_size=232),
        **{name: timm_eval(224, 0.875) for name in V2_VARIANTS},
        "convnextv2_huge": timm_eval(384, 1.0, crop_mode="squash")}
_TORCH = WeightSource("torchvision", TORCH_RULES, **TORCH_IMAGENET)
_TIMM = WeightSource("timm", TIMM_RULES, **TORCH_IMAGENET)
for _name, (_widths, _depths) in VARIANTS.items():
    register_variants("convnext", weights=_TORCH.replace(**EVAL[_name]), variants={
        _name: partial(ConvNeXt, widths=_widths, depths=_depths)})
for _name, (_widths, _depths) in V2_VARIANTS.items():
    register_variants("convnextv2", weights=_TIMM.replace(**EVAL[_name]), variants={
        _name: partial(ConvNeXt, widths=_widths, depths=_depths, grn=True, layer_scale=None)})
