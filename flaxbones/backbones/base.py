"""The Backbone protocol: the feature-contract fields, validated once at construction."""
from typing import Sequence

from flax import linen as nn

from flaxbones.features import FeatureInfo, plan_output_stride, sequence_taps
from flaxbones.layers.module import ConvNormModule, option


class Backbone(ConvNormModule):
    """Base of every backbone: `output_stride`, `out_features` and DeepLab's `multi_grid`,
    plus the BN settings, `axis_name`, dtypes, `cpu_kernels` and `conv_def()` /
    `norm_def(train)` / `pool_def()` of `ConvNormModule`.

    A family declares `supported_strides` (the output strides it can honour exactly),
    `multi_grid_units()` (how many rates `multi_grid` takes; None: unsupported), the
    `feature_info` property (levels C1..C5 and any named taps `out_features` selects) and
    `__call__(x, train) -> {name: NHWC array}` with the keys of `feature_info`. Every
    option is checked here, when the module is created, so a bad one fails before `init`.
    """

    output_stride: int = option(32)
    out_features: Sequence[str] | None = option(None)
    multi_grid: Sequence[int] | None = option(None)

    supported_strides = (8, 16, 32)  # a class attribute, not a field

    def __post_init__(self):
        super().__post_init__()
        family = type(self).__name__
        if self.output_stride not in self.supported_strides:
            raise ValueError(f"output_stride={self.output_stride} is not supported by {family}; "
                             f"choose one of {self.supported_strides}")
        if self.multi_grid is not None:
            units = self.multi_grid_units()
            if units is None:
                raise ValueError(f"{family} does not support multi_grid")
            if len(self.multi_grid) != units:
                raise ValueError(f"multi_grid {tuple(self.multi_grid)} needs one rate per unit "
                                 f"of {family}'s last block ({units})")
        if self.out_features is not None and not self.out_features:
            raise ValueError("out_features is empty; pass None for the default levels")
        self.feature_info  # noqa: B018  (an unknown name in out_features fails here)

    @nn.nowrap
    def multi_grid_units(self) -> int | None:
        return None

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        raise NotImplementedError


class UnitSequence:
    """Mixin for a backbone built as one flat sequence of units (torchvision's `features`):
    it lists `_units`, (name, nominal stride, channels) each, and gets its stride plans,
    taps (`sequence_taps`) and `feature_info` from them."""

    @property
    def _taps(self):
        names, strides, channels = zip(*self._units)
        plans = plan_output_stride(strides, self.output_stride)
        return plans, sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps[1].values())


__all__ = ["Backbone", "UnitSequence", "option"]
