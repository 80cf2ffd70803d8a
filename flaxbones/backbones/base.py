"""What every backbone shares: the feature-contract fields on top of the conv/norm base."""
from typing import Sequence

from flaxbones.layers.module import ConvNormModule, option


class Backbone(ConvNormModule):
    """Base of every backbone: `output_stride` and `out_features`, plus the BN settings,
    `axis_name`, dtypes and `conv_def()` / `norm_def(train)` of `ConvNormModule`. A family
    declares `feature_info` and `__call__(x, train)`.
    """

    output_stride: int = option(32)
    out_features: Sequence[str] | None = option(None)


__all__ = ["Backbone", "option"]
