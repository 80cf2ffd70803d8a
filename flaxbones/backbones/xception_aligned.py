"""DeepLab's aligned Xception (65, 71), laid out as timm's `xception_aligned.py`.

Feature taps (all before the ReLU that timm's `features_only` hooks, so timm's features
are relu(C_k)): C1..C4 are the outputs of the second separable conv of each strided block,
at that block's input stride (DeepLab's `.../xception_module/separable_conv2_pointwise`;
C2 is DeepLab v3+'s low-level feature); C5 is the last block's output (already a ReLU).
"""
from functools import partial
from typing import Sequence

from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.layers import BatchNorm, Conv, ConvNormAct, ModuleDef, SeparableConv, loop_conv
from flaxbones.registry import register_variants
from flaxbones.scan import scan_repeat
from flaxbones.weights.source import WeightSource, timm_eval


class XceptionModule(nn.Module):
    """Three separable convs, the third strided, plus an identity or 1x1 conv shortcut.

    Returns (output, tap), the tap being the second separable conv's output. With
    `start_with_relu=False` (the last block) the ReLUs sit inside the separable convs and
    there is no shortcut. `unit_rates` multiply `dilation` per conv (DeepLab's multi-grid).
    `projection` (the 1x1 conv) follows the block's nominal stride, so it survives dilation.
    """

    out_chs: Sequence[int]
    projection: bool
    stride: int = 1
    dilation: int = 1
    unit_rates: Sequence[int] = (1, 1, 1)
    start_with_relu: bool = True
    padding: str = "torch"
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x):
        sep = partial(SeparableConv, padding=self.padding, conv=self.conv, norm=self.norm,
                      act=None if self.start_with_relu else nn.relu)
        y, tap = x, None
        for i, (features, rate) in enumerate(zip(self.out_chs, self.unit_rates)):
            tap = y if i == 2 else tap
            y = nn.relu(y) if self.start_with_relu else y
            y = sep(features, stride=self.stride if i == 2 else 1, dilation=self.dilation * rate,
                    name=f"conv{i + 1}")(y)
        if not self.start_with_relu:
            return y, tap
        if self.projection:
            x = ConvNormAct(self.out_chs[-1], 1, self.stride, padding=self.padding, conv=self.conv,
                            norm=self.norm, act=None, name="shortcut")(x)
        return y + x, tap


class XceptionAligned(Backbone):
    """Aligned Xception backbone returning {C1..C5} (see the module docstring for the taps).

    `entry` is the entry flow as (channels, stride) blocks and `middle` the number of
    728-channel middle-flow blocks; the exit flow is fixed. `output_stride` 8/16 dilates as
    timm and DeepLab do: a strided block turned dilated runs all its convs at the previous
    dilation, the blocks after it at the multiplied one. `multi_grid` multiplies the last
    block's three dilations (DeepLab's exit-flow `unit_rate_list`). `padding='same'` (TF
    'SAME') is for checkpoints trained with native 'SAME' on strided convs; DeepLab's and
    timm's pad symmetrically ('torch'). BatchNorm epsilon 1e-3 as DeepLab and timm.
    A dilated block keeps its 1x1 conv shortcut as DeepLab does (timm drops it when the
    channels do not change: xception71 at output_stride 8, whose weights then do not fit).
    `scan_blocks` runs the identical middle-flow blocks in one `nn.scan` named
    `blocks_middle` (same numerics, far faster compiles; see `flaxbones.scan`).
    """

    entry: Sequence[tuple[int, int]]
    middle: int = 16
    padding: str = "torch"
    bn_epsilon: float = option(1e-3)
    scan_blocks: bool = option(False)
    block: ModuleDef = option(XceptionModule)

    @nn.nowrap
    def multi_grid_units(self) -> int:
        return 3  # the separable convs of the last block

    @nn.nowrap
    def _blocks(self) -> list[tuple[tuple[int, int, int], int]]:
        """(out_chs, nominal stride) per block: entry, middle and exit flow."""
        blocks = [((c, c, c), s) for c, s in self.entry]
        blocks += [((728, 728, 728), 1)] * self.middle
        return blocks + [((728, 1024, 1024), 2), ((1536, 1536, 2048), 1)]

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        """{scanned module: unscanned blocks}: the middle flow, less its first block when
        that one projects (an entry flow not ending at 728 channels)."""
        first = len(self.entry) + (self.entry[-1][0] != 728)
        names = [f"blocks_{i}" for i in range(first, len(self.entry) + self.middle)]
        return {"blocks_middle": names} if names else {}

    @nn.nowrap
    def _plans(self):  # stem conv, then one unit per block
        return plan_output_stride([2] + [s for _, s in self._blocks()], self.output_stride)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        plans = self._plans()
        stride, infos = plans[0].stride, []
        for (chs, nominal), plan in zip(self._blocks(), plans[1:]):
            if nominal > 1:
                infos.append(FeatureInfo(f"C{len(infos) + 1}", stride, chs[1]))
            stride *= plan.stride
        infos.append(FeatureInfo(f"C{len(infos) + 1}", stride, self._blocks()[-1][0][-1]))
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        info = self.feature_info
        conv = self.conv_def()
        norm = self.norm_def(train)
        layer = dict(padding=self.padding, conv=conv, norm=norm)
        stem, block = self.block_def(ConvNormAct), self.block_def(self.block)
        x = stem(32, 3, 2, name="stem_0", **layer)(x)
        x = stem(64, 3, name="stem_1", **layer)(x)
        blocks, feats = self._blocks(), {}
        scanned = self.scan_groups().get("blocks_middle", []) if self.scan_blocks else []
        for i, ((chs, nominal), plan) in enumerate(zip(blocks, self._plans()[1:])):
            if f"blocks_{i}" in scanned[1:]:
                continue
            if scanned and f"blocks_{i}" == scanned[0]:
                x = scan_repeat(partial(block, chs, False, plan.stride,
                                        plan.first_dilation, **{**layer, "conv": loop_conv(conv)}),
                                len(scanned), "blocks_middle", tapped=True)(x)
                continue
            last = i == len(blocks) - 1
            rates = tuple(self.multi_grid) if last and self.multi_grid else (1, 1, 1)
            projection = nominal != 1 or x.shape[-1] != chs[-1]
            x, tap = block(chs, projection, plan.stride, plan.first_dilation, rates,
                           start_with_relu=not last, name=f"blocks_{i}", **layer)(x)
            if nominal > 1:
                feats[f"C{len(feats) + 1}"] = tap
        feats[f"C{len(feats) + 1}"] = x
        return {f.name: feats[f.name] for f in info}


# timm's xception65/71 (.tf_in1k from DeepLab's TF checkpoints, .ra3_in1k trained in timm).
TIMM_XCEPTION_ALIGNED = WeightSource(
    "timm",
    rules=(
        (r"stem\.(\d)\.(conv|bn)", r"backbone/stem_\1/\2"),
        (r"blocks\.(\d+)\.shortcut\.(conv|bn)", r"backbone/blocks_\1/shortcut/\2"),
        (r"blocks\.(\d+)\.stack\.(conv\d)\.(conv_dw|bn_dw|conv_pw|bn_pw)",
         r"backbone/blocks_\1/\2/\3"),
    ),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **timm_eval(299, 0.94),  # xception65.ra3_in1k
)


register_variants("xception_aligned", weights=TIMM_XCEPTION_ALIGNED, variants={
    "xception65": partial(XceptionAligned, entry=((128, 2), (256, 2), (728, 2)), middle=16)})
register_variants("xception_aligned", weights=TIMM_XCEPTION_ALIGNED.replace(  # .tf_in1k
    **timm_eval(299, 0.903)), variants={
    "xception71": partial(XceptionAligned, entry=((128, 2), (256, 1), (256, 2), (728, 1), (728, 2)),
                          middle=16),
})
