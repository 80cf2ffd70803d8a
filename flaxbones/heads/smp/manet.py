"""segmentation_models_pytorch's MAnet decoder (smp 0.6) as a head: a position-wise
attention block (PAB) on the deepest level, multi-scale fusion attention blocks (MFAB:
squeeze-excitation gates of both inputs) up the levels; upsampling by a fixed 2."""
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.heads.smp.common import Conv2dReLU, SmpSegmentationHead, decoder_init
from flaxbones.heads.smp.unet import SmpUnetFamilyHead, check_divisible, interpolate
from flaxbones.layers import BatchNorm, Conv, ModuleDef


def _conv(conv, features: int, k: int, name: str):
    return conv(features, (k, k), padding=((k // 2, k // 2),) * 2, use_bias=True,
                kernel_init=decoder_init, name=name)


class PABBlock(nn.Module):
    """smp's PABBlock: 1x1 `top_conv`, `center_conv` (to `pab_channels`), 3x3 `bottom_conv`;
    one softmax over all (HW)^2 centre-top products of an image, times the bottom values;
    the (HW, C) result read as (C, H, W) in memory order (as smp's reshape), added to the
    input, 3x3 `out_conv`."""

    pab_channels: int = 64
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        top = _conv(self.conv, self.pab_channels, 1, "top_conv")(x).reshape(n, h * w, -1)
        center = _conv(self.conv, self.pab_channels, 1, "center_conv")(x).reshape(n, h * w, -1)
        bottom = _conv(self.conv, c, 3, "bottom_conv")(x).reshape(n, h * w, c)
        attn = jnp.einsum("nip,njp->nij", center, top)
        attn = nn.softmax(attn.reshape(n, -1), axis=-1).reshape(n, h * w, h * w)
        y = jnp.einsum("nij,njc->nic", attn, bottom)
        x = x + y.reshape(n, c, h, w).transpose(0, 2, 3, 1)
        return _conv(self.conv, c, 3, "out_conv")(x)


def _gate(conv, x, channels: int, reduced: int, name: str):
    """smp's SE_ll / SE_hl: global average pool, 1x1 conv `<name>_1`, ReLU, 1x1 conv
    `<name>_3`, sigmoid (the gate, not yet applied)."""
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    s = nn.relu(_conv(conv, reduced, 1, f"{name}_1")(s))
    return nn.sigmoid(_conv(conv, channels, 1, f"{name}_3")(s))


class MFABBlock(nn.Module):
    """smp's MFABBlock: 3x3 then 1x1 Conv2dReLU to the skip's width (`hl_conv_0/1`), resize
    by 2; times the sum of the SE gates of itself (`SE_hl`) and of the skip (`SE_ll`);
    concatenated with the skip, two 3x3 Conv2dReLU (`conv1`, `conv2`)."""

    features: int
    use_norm: Any = "batchnorm"
    interpolation: str = "nearest"
    reduction: int = 16
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x, skip):
        unit = dict(use_norm=self.use_norm, conv=self.conv, norm=self.norm)
        c = skip.shape[-1]
        x = Conv2dReLU(x.shape[-1], 3, padding=1, **unit, name="hl_conv_0")(x)
        x = Conv2dReLU(c, 1, **unit, name="hl_conv_1")(x)
        x = interpolate(x, (2 * x.shape[1], 2 * x.shape[2]), self.interpolation)
        reduced = max(1, c // self.reduction)
        gate = (_gate(self.conv, x, c, reduced, "SE_hl")
                + _gate(self.conv, skip, c, reduced, "SE_ll"))
        x = jnp.concatenate([x * gate, skip], axis=-1)
        x = Conv2dReLU(self.features, 3, padding=1, **unit, name="conv1")(x)
        return Conv2dReLU(self.features, 3, padding=1, **unit, name="conv2")(x)


class MAnetDecoderBlock(nn.Module):
    """smp's MAnet DecoderBlock (for the last level and empty skips): resize by 2,
    concatenate the skip (if any), two 3x3 Conv2dReLU (`conv1`, `conv2`)."""

    features: int
    use_norm: Any = "batchnorm"
    interpolation: str = "nearest"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x, skip=None):
        unit = dict(padding=1, use_norm=self.use_norm, conv=self.conv, norm=self.norm)
        x = interpolate(x, (2 * x.shape[1], 2 * x.shape[2]), self.interpolation)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        x = Conv2dReLU(self.features, 3, **unit, name="conv1")(x)
        return Conv2dReLU(self.features, 3, **unit, name="conv2")(x)


class MAnetDecoder(nn.Module):
    """smp's MAnetDecoder on `features` [C1, ..., Cn]: PAB (`center`) on Cn, then block i
    (`blocks_i`) an MFAB with the next finer level, a plain block for the last (and an empty
    level)."""

    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    pab_channels: int = 64
    use_norm: Any = "batchnorm"
    interpolation: str = "nearest"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    mfab: ModuleDef = MFABBlock
    block: ModuleDef = MAnetDecoderBlock

    @nn.compact
    def __call__(self, features: Sequence):
        x, skips = features[-1], features[::-1][1:]
        x = PABBlock(self.pab_channels, self.conv, name="center")(x)
        unit = dict(use_norm=self.use_norm, interpolation=self.interpolation, conv=self.conv,
                    norm=self.norm)
        for i, width in enumerate(self.decoder_channels):
            if i < len(skips) and skips[i].shape[-1]:
                x = self.mfab(width, **unit, name=f"blocks_{i}")(x, skips[i])
            else:
                skip = skips[i] if i < len(skips) else None
                x = self.block(width, **unit, name=f"blocks_{i}")(x, skip)
        return x


class SmpMAnetHead(SmpUnetFamilyHead):
    """smp.MAnet's decoder (`decoder`) and segmentation head (3x3 conv,
    `segmentation_head`) on C1..C`encoder_depth`; logits at twice C1's size, the image's.
    Image sides must divide by 2**encoder_depth (a ValueError otherwise, as smp raises);
    `encoder_has_c1` as `SmpUnetHead`'s."""

    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    decoder_pab_channels: int = 64
    decoder_interpolation: str = "nearest"
    encoder_has_c1: bool = True

    @nn.compact
    def __call__(self, features: dict, train: bool = False, size=None):
        feats = self.decoder_features(features, size)
        check_divisible(self, feats, size)
        x = MAnetDecoder(self.decoder_channels, self.decoder_pab_channels,
                         self.decoder_use_norm, self.decoder_interpolation, self.conv_def(),
                         self.norm_def(train), self.block_def(MFABBlock),
                         self.block_def(MAnetDecoderBlock), name="decoder")(feats)
        return self.smp_segmentation_head(3)(x)


def _rules(src: str, dst: str) -> tuple:
    pab = tuple((rf"{src}\.center\.{n}", f"{dst}/center/{n}")
                for n in ("top_conv", "center_conv", "bottom_conv", "out_conv"))
    block, to = src + r"\.blocks\.(\d+)", dst + r"/blocks_\1"
    return (*pab, *Conv2dReLU.torch_rules(block + r"\.hl_conv\.(\d)", to + r"/hl_conv_\2"),
            *((rf"{block}\.(SE_ll|SE_hl)\.([13])", to + r"/\2_\3"),),
            *Conv2dReLU.torch_rules(block + r"\.(conv[12])", to + r"/\2"))


RULES = (*_rules(r"decoder", "head/decoder"), *SmpSegmentationHead.torch_rules())
