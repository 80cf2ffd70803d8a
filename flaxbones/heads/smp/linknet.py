"""segmentation_models_pytorch's Linknet decoder (smp 0.6) as a head: per level a 1x1
reduction to a quarter, a 4x4 stride-2 transposed conv, a 1x1 expansion, plus the skip."""
from functools import partial
from typing import Any

from flax import linen as nn

from flaxbones.heads.smp.common import Conv2dReLU, SmpSegmentationHead, norm_type
from flaxbones.heads.smp.unet import SmpUnetFamilyHead, check_divisible
from flaxbones.layers import BatchNorm, Conv, ModuleDef, torch_bias_init, torch_default_init
from flaxbones.layers.conv_transpose import ConvTranspose2d


class TransposeX2(nn.Module):
    """smp's TransposeX2: ConvTranspose2d(k 4, stride 2, padding 1, bias) `0`, the norm `1`
    (none for 'identity'), ReLU. Starts as torch's default init (smp's leaves it)."""

    features: int
    use_norm: Any = "batchnorm"
    transpose: ModuleDef = ConvTranspose2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x):
        fan_in = 16 * self.features  # torch's fan-in of a transposed kernel: out x k x k
        x = self.transpose(self.features, 4, 2, 1, kernel_init=torch_default_init,
                           bias_init=torch_bias_init(fan_in), name="0")(x)
        if norm_type(self.use_norm) == "batchnorm":
            x = self.norm(name="1")(x)
        return nn.relu(x)


class LinknetDecoderBlock(nn.Module):
    """smp's Linknet DecoderBlock: 1x1 Conv2dReLU to in // 4 (`block_0`), TransposeX2
    (`block_1`), 1x1 Conv2dReLU to `features` (`block_2`), then + skip."""

    features: int
    use_norm: Any = "batchnorm"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    transpose: ModuleDef = ConvTranspose2d

    @nn.compact
    def __call__(self, x, skip=None):
        unit = dict(use_norm=self.use_norm, conv=self.conv, norm=self.norm)
        quarter = x.shape[-1] // 4
        x = Conv2dReLU(quarter, 1, **unit, name="block_0")(x)
        x = TransposeX2(quarter, self.use_norm, self.transpose, self.norm, name="block_1")(x)
        x = Conv2dReLU(self.features, 1, **unit, name="block_2")(x)
        return x if skip is None else x + skip


class LinknetDecoder(nn.Module):
    """smp's LinknetDecoder on `features` [C1, ..., Cn]: from Cn, block i (`blocks_i`) to
    the next finer level's width, added to it (an empty level: the width kept, nothing
    added, as smp); the last block to `prefinal_channels`."""

    prefinal_channels: int = 32
    use_norm: Any = "batchnorm"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    transpose: ModuleDef = ConvTranspose2d
    block: ModuleDef = LinknetDecoderBlock

    @nn.compact
    def __call__(self, features):
        x, skips = features[-1], features[::-1][1:]
        for i in range(len(features)):
            skip = skips[i] if i < len(skips) else None
            width = self.prefinal_channels if skip is None else skip.shape[-1] or x.shape[-1]
            skip = skip if skip is None or skip.shape[-1] else None
            x = self.block(width, self.use_norm, self.conv, self.norm, self.transpose,
                           name=f"blocks_{i}")(x, skip)
        return x


class SmpLinknetHead(SmpUnetFamilyHead):
    """smp.Linknet's decoder (`decoder`) and segmentation head (1x1 conv,
    `segmentation_head`) on C1..C`encoder_depth`; logits at twice C1's size, the image's.
    Image sides must divide by 2**encoder_depth (a ValueError otherwise, as smp raises);
    `encoder_has_c1` as `SmpUnetHead`'s."""

    encoder_has_c1: bool = True

    prefinal_channels = 32  # fixed by smp.Linknet

    @nn.compact
    def __call__(self, features: dict, train: bool = False, size=None):
        feats = self.decoder_features(features, size)
        check_divisible(self, feats, size)
        transpose = partial(ConvTranspose2d, cpu=self.cpu_kernels, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        x = LinknetDecoder(self.prefinal_channels, self.decoder_use_norm, self.conv_def(),
                           self.norm_def(train), transpose,
                           self.block_def(LinknetDecoderBlock), name="decoder")(feats)
        return self.smp_segmentation_head(1)(x)


def _block_rules(src: str, dst: str) -> tuple:
    return (*Conv2dReLU.torch_rules(src + r"\.block\.0", dst + "/block_0"),
            (src + r"\.block\.1\.([01])", dst + r"/block_1/\2"),
            *Conv2dReLU.torch_rules(src + r"\.block\.2", dst + "/block_2"))


RULES = (*_block_rules(r"decoder\.blocks\.(\d+)", r"head/decoder/blocks_\1"),
         *SmpSegmentationHead.torch_rules())
