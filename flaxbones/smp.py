"""segmentation_models_pytorch (smp 0.6.0) models on flaxbones: smp's encoders mapped onto
flaxbones backbones, its decoders (`flaxbones.heads.smp`) and auxiliary classification head,
the registered builders `smp_<decoder>`, and the loader of smp state dicts.

    model = fb.create_model("smp_unet", encoder_name="resnet34", num_classes=3)
    variables = fb.smp.load_pretrained("Unet", "unet.pth", encoder_name="resnet34", classes=3)

Builders take smp's keyword arguments (`encoder_name`, `encoder_depth`, `decoder_*`,
`activation`, `aux_params`, ...) with flaxbones' `num_classes` for smp's `classes`;
`load_pretrained` / `create_model` here take smp's own names (`classes`, `encoder_weights`).
"""
import dataclasses
import importlib
import inspect
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.regnet import TIMM_RULES as REGNET_TIMM_RULES
from flaxbones.heads.smp.common import SmpClassificationHead
from flaxbones.layers import resize_bilinear
from flaxbones.models import Segmenter, check_levels
from flaxbones.registry import (create_backbone, create_model as _create_model, get_spec,
                                list_backbones, register_model)
from flaxbones.weights.convert import LoadReport, convert_state_dict
from flaxbones.weights.io import read_state_dict
from flaxbones.weights.source import WeightSource

COMMON = ("dtype", "param_dtype", "axis_name", "cpu_kernels")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """An smp encoder on a flaxbones backbone.

    torchvision-based (`timm=False`): keys `encoder.<torchvision key>`, every stage held
    whatever `encoder_depth` (smp only stops the forward pass), output stride 8/16 by smp's
    `make_dilated` (`whole_stage_dilation`), or none (`dilates=False`: VGG).
    `tu-*` (`timm=True`, smp's TimmUniversalEncoder): keys `encoder.model.<timm key>` with
    `features_only`'s naming (a top-level Sequential flattened: `stages_0`), timm's own
    dilation; timm drops the stages past the deepest tap, so only `encoder_depth=5`.
    `rules`: the backbone's torch rules when not its registered source's.
    `smp=False`: any other flaxbones backbone (Swin, EfficientNet, ...), which smp has no
    encoder for: flaxbones' own `output_stride`, and no smp file holds its keys.
    """

    backbone: str
    timm: bool = False
    dilates: bool = True
    rules: tuple | None = None
    smp: bool = True

    def backbone_rules(self) -> tuple:
        rules = self.rules if self.rules is not None else get_spec(self.backbone).weights.rules
        prefix = r"encoder\.model\." if self.timm else r"encoder\."
        return tuple((prefix + (p.replace(r"\.", "[._]", 1) if self.timm else p), t)
                     for p, t in rules if t.startswith("backbone/"))


_TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "mobilenet_v2"]
_VGG = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
# tu-<timm name>: flaxbones backbone whose keys are timm's.
_TIMM = {**{n: n for n in _TORCHVISION[:-1] + ["wide_resnet50_2", "wide_resnet101_2",
                                                 "resnet50d", "resnet101d"]},
         **{n: n for n in ("convnextv2_atto", "convnextv2_femto", "convnextv2_pico",
                           "convnextv2_nano", "convnextv2_tiny", "convnextv2_base",
                           "convnextv2_large", "convnextv2_huge")},
         "mobilenetv1_100": "mobilenet_v1"}
# timm's torchvision-compatible RegNets (`*_tv`) on flaxbones' (torchvision-named) RegNets.
_REGNET_TV = {"regnetx_004_tv": "regnet_x_400mf", "regnety_008_tv": "regnet_y_800mf",
              "regnety_080_tv": "regnet_y_8gf"}

ENCODERS: dict[str, Encoder] = {
    **{n: Encoder(n) for n in _TORCHVISION},
    **{n: Encoder(n, dilates=False) for n in _VGG},
    **{f"tu-{t}": Encoder(f, timm=True) for t, f in _TIMM.items()},
    **{f"tu-{t}": Encoder(f, timm=True, rules=REGNET_TIMM_RULES) for t, f in _REGNET_TV.items()},
}


def encoder(name: str) -> Encoder:
    """The Encoder of smp encoder `name`, else of flaxbones backbone `name`; a ValueError
    listing the supported ones."""
    if name in ENCODERS:
        return ENCODERS[name]
    if name in list_backbones():
        return Encoder(name, smp=False)
    raise ValueError(f"smp encoder {name!r} has no flaxbones backbone; supported: "
                     f"{sorted(ENCODERS)}, or any flaxbones backbone (fb.list_backbones())")


# smp class -> (module of flaxbones.heads.smp, head class, smp's requires_divisible_input_shape)
DECODERS = {
    "Unet": ("unet", "SmpUnetHead", False),
    "UnetPlusPlus": ("unetplusplus", "SmpUnetPlusPlusHead", True),
    "FPN": ("fpn", "SmpFPNHead", True),
    "PSPNet": ("pspnet", "SmpPSPNetHead", True),
    "DeepLabV3": ("deeplab", "SmpDeepLabV3Head", True),
    "DeepLabV3Plus": ("deeplab", "SmpDeepLabV3PlusHead", True),
    "Linknet": ("linknet", "SmpLinknetHead", True),
    "MAnet": ("manet", "SmpMAnetHead", True),
    "PAN": ("pan", "SmpPANHead", True),
    "UPerNet": ("upernet", "SmpUPerNetHead", True),
    "Segformer": ("segformer", "SmpSegformerHead", True),
}


def registry_name(arch: str) -> str:
    """'Unet' -> 'smp_unet' (a registry name passes through)."""
    if arch in DECODERS:
        return f"smp_{arch.lower()}"
    by_lower = {a.lower(): a for a in DECODERS}
    key = arch.removeprefix("smp_").lower()
    if key not in by_lower:
        raise ValueError(f"unknown smp architecture {arch!r}; choose one of {sorted(DECODERS)}")
    return f"smp_{key}"


def _arch(name: str) -> str:
    return {a.lower(): a for a in DECODERS}[registry_name(name).removeprefix("smp_")]


def _decoder(arch: str):
    module, cls, _ = DECODERS[arch]
    return importlib.import_module(f"flaxbones.heads.smp.{module}"), cls


def head_class(arch: str):
    module, cls = _decoder(_arch(arch))
    return getattr(module, cls)


def decoder_rules(arch: str) -> tuple:
    """The decoder file's RULES for `arch` (`decoder.*`, `segmentation_head.*`)."""
    arch = _arch(arch)
    rules = _decoder(arch)[0].RULES
    return tuple(rules[arch] if isinstance(rules, dict) else rules)


class SmpModel(Segmenter):
    """smp's SegmentationModel: the encoder (`backbone`), decoder and segmentation head
    (`head`, an `Smp*Head`, given the image size when it takes one, as smp's U-Nets read
    features[0]), and with smp's `aux_params` a `classification_head` on the deepest encoder
    feature. Returns {'out': NHWC masks at the input size} plus 'labels'
    ((N, classes), the classification head's) when it has one, in train and eval alike.

    `empty_levels` are levels smp feeds as empty (0-channel) maps: the stride-2 feature of
    transformer-style encoders. Inputs whose sides are not multiples of `divisor` (smp's
    encoder output stride; 1 for U-Net, which smp lets take any size) raise a ValueError,
    as smp's `check_input_shape`.
    """

    classification_head: nn.Module | None = None
    empty_levels: tuple[str, ...] = ()
    divisor: int = 1

    def __post_init__(self):
        super(Segmenter, self).__post_init__()
        head = self.head
        info = check_levels(self.backbone, [lvl for lvl in head.levels
                                            if lvl not in self.empty_levels],
                            f"head {type(head).__name__}")
        strides = getattr(head, "supported_strides", None)
        deepest = info[head.levels[-1]].stride
        if strides is not None and deepest not in strides:
            raise ValueError(f"head {type(head).__name__} needs its deepest level at output "
                             f"stride {' or '.join(map(str, strides))}; the encoder gives "
                             f"{deepest}")
        if self.classification_head is not None:
            check_levels(self.backbone, self.classification_head.levels, "classification_head")

    def __call__(self, x, train: bool = False):
        h, w = x.shape[1:3]
        d = self.divisor
        if h % d or w % d:
            raise ValueError(f"smp's model needs image sides divisible by {d}, got {h}x{w}; "
                             f"pad the images to {-(-h // d) * d}x{-(-w // d) * d}")
        features = dict(self.backbone(x, train=train))
        for level in self.empty_levels:
            k = 2 ** int(level[1:])
            features[level] = jnp.zeros((x.shape[0], h // k, w // k, 0), x.dtype)
        size = {"size": (h, w)} if "size" in inspect.signature(self.head.__call__).parameters \
            else {}
        out = self.head(features, train=train, **size)
        out = {"out": resize_bilinear(out, (h, w), self.head.align_corners)}
        if self.classification_head is not None:
            out["labels"] = self.classification_head(features, train=train)
        return out


def build(arch: str, encoder_name: str = "resnet34", num_classes: int = 1,
          encoder_depth: int | None = None, encoder_output_stride: int | None = None,
          aux_params: dict | None = None, in_channels: int = 3, encoder_weights: None = None,
          encoder_kwargs: dict | None = None, **decoder_kwargs: Any) -> SmpModel:
    """smp.`arch`(encoder_name, ...) as an SmpModel.

    Weights come from files (`load_pretrained`), never from `encoder_weights`.

    Args:
        arch: smp's class name ('Unet', 'FPN', 'DeepLabV3Plus', ...) or the registry
            name ('smp_unet'), case-insensitive.
        encoder_name: An smp encoder ('resnet34', 'tu-convnextv2_tiny', ...) or any
            flaxbones backbone name.
        num_classes: Output channels of the segmentation head (smp's `classes`).
        encoder_depth: Encoder levels used (1..5; 5 only for `tu-*`); None: smp's
            default for `arch`.
        encoder_output_stride: 32, or 16 / 8 (dilated) where `arch` takes it; None:
            smp's default.
        aux_params: smp's auxiliary classification head options (`classes` required,
            `pooling`, `dropout`, `activation`), or None for no head.
        in_channels: Must be 3.
        encoder_weights: Must be None.
        encoder_kwargs: Extra backbone options (e.g. `scan_blocks`, `remat`).
        **decoder_kwargs: The head's options (smp's decoder options, `activation`,
            `upsampling`, ...) and the shared settings (dtype, param_dtype, axis_name,
            cpu_kernels).

    Returns:
        The unbound model; it returns a dict with 'out', the (N, H, W, num_classes)
            masks, plus 'labels' (N, classes) with `aux_params`.

    Raises:
        ValueError: An unknown `arch` or encoder, `encoder_weights` or `in_channels`
            other than None / 3, an unsupported `encoder_depth` or
            `encoder_output_stride`, or `aux_params` without 'classes'.
    """
    arch = _arch(arch)
    if encoder_weights is not None:
        raise ValueError("flaxbones never downloads: pass encoder_weights=None and load an smp "
                         "state dict with flaxbones.smp.load_pretrained")
    if in_channels != 3:
        raise ValueError(f"in_channels={in_channels}: flaxbones' smp models take 3-channel "
                         "images only (smp's patched first conv is not supported)")
    enc, head_cls = encoder(encoder_name), head_class(arch)
    fields = {f.name: f.default for f in dataclasses.fields(head_cls)}
    depth = encoder_depth if encoder_depth is not None else fields.get("encoder_depth", 5)
    stride = encoder_output_stride or fields.get("encoder_output_stride", 32)
    if encoder_output_stride is not None and "encoder_output_stride" not in fields:
        raise ValueError(f"smp's {arch} takes no encoder_output_stride")
    if not 1 <= depth <= 5 or (enc.timm and depth != 5):
        raise ValueError(f"encoder_depth={depth} is not supported for {encoder_name!r} "
                         f"({'5 only: timm drops deeper stages' if enc.timm else '1..5'})")
    if stride != 32 and not enc.dilates:
        raise ValueError(f"{encoder_name!r} does not support dilated mode "
                         f"(encoder_output_stride={stride}), as in smp")
    common = {k: decoder_kwargs[k] for k in COMMON if k in decoder_kwargs}
    options = dict(encoder_kwargs or {})
    if enc.smp and not enc.timm and stride != 32:
        options["whole_stage_dilation"] = True
    bb = create_backbone(enc.backbone, output_stride=stride, **options, **common)
    have = {f.name for f in bb.feature_info}
    levels = [f"C{k}" for k in range(1, depth + 1)]
    empty = tuple(lvl for lvl in levels if lvl not in have)
    bb = bb.clone(out_features=tuple(lvl for lvl in levels if lvl in have))
    # what smp's model classes derive from the encoder (U-Net's center block on VGG)
    given = dict(encoder_depth=depth, encoder_output_stride=stride, encoder_has_c1=not empty,
                 center=encoder_name.startswith("vgg"))
    given = {k: v for k, v in given.items() if k not in decoder_kwargs}
    head = head_cls(num_classes, **{k: v for k, v in given.items() if k in fields},
                    **decoder_kwargs)
    aux = None
    if aux_params is not None:
        aux = dict(aux_params)
        if "classes" not in aux:
            raise ValueError("aux_params needs 'classes', as smp's")
        aux = SmpClassificationHead(aux.pop("classes"), feature=levels[-1], **aux,
                                    **{k: v for k, v in common.items() if k.endswith("dtype")})
    divisor = min(stride, 2 ** depth) if DECODERS[arch][2] else 1
    return SmpModel(bb, head, classification_head=aux, empty_levels=empty, divisor=divisor)


def weight_source(arch: str, encoder_name: str = "resnet34") -> WeightSource:
    """How an smp model's state dict maps onto `build(arch, encoder_name, ...)`: the
    encoder's rules (prefixed), the decoder file's RULES, the classification head's."""
    enc = encoder(encoder_name)
    source = get_spec(enc.backbone).weights
    norm = dict(mean=source.mean, std=source.std) if source is not None else {}
    rules = enc.backbone_rules() + decoder_rules(arch) + SmpClassificationHead.torch_rules()
    return WeightSource("smp", rules, num_classes=1,
                        head_prefix=("head/segmentation_head/", "classification_head/"), **norm)


def _smp_kwargs(kwargs: dict) -> dict:
    """smp's keyword names as the builders': `classes` -> `num_classes`, `encoder_weights`
    dropped (the file holds the weights)."""
    kwargs = dict(kwargs)
    kwargs.pop("encoder_weights", None)
    if "classes" in kwargs:
        kwargs["num_classes"] = kwargs.pop("classes")
    return kwargs


def create_model(arch: str, encoder_name: str = "resnet34", **smp_kwargs: Any) -> SmpModel:
    """The flaxbones twin of `smp.<arch>(encoder_name, **smp_kwargs)`, with smp's names.

    Args:
        arch: smp's class name ('Unet', ...) or the registry name ('smp_unet').
        encoder_name: An smp encoder name, or any flaxbones backbone.
        **smp_kwargs: smp's keyword arguments (`classes`, `encoder_depth`,
            `aux_params`, `decoder_*`, ...; `encoder_weights` is ignored), and the
            shared settings (`dtype`, ...).

    Returns:
        The unbound `SmpModel` (see `build`).

    Raises:
        ValueError: As `build`.
    """
    return _create_model(registry_name(arch), encoder_name=encoder_name,
                         **_smp_kwargs(smp_kwargs))


def load_pretrained(arch: str, path: str | os.PathLike, encoder_name: str = "resnet34", *,
                    skip_head: bool = False, rng: jax.Array | None = None,
                    return_report: bool = False,
                    **smp_kwargs: Any) -> dict | tuple[dict, LoadReport]:
    """Variables of `create_model(arch, encoder_name, **smp_kwargs)` from an smp state dict.

    The file is an smp model's `torch.save(model.state_dict())` or safetensors
    (`encoder.`, `decoder.`, `segmentation_head.`, `classification_head.` keys), loaded
    with the arguments the model was made with, e.g.
    `load_pretrained("Unet", path, "resnet34", classes=3)`. All or nothing.

    Args:
        arch: smp's class name ('Unet', ...) or the registry name ('smp_unet').
        path: The state dict file (`.pth`, `.pt`, `.bin` or `.safetensors`).
        encoder_name: The smp encoder the file was trained with.
        skip_head: Let the segmentation and classification heads differ (another
            `classes`): those start fresh.
        rng: The PRNG key that initialises skipped leaves (default `PRNGKey(0)`).
        return_report: Also return the `LoadReport`.
        **smp_kwargs: smp's keyword arguments, as for `create_model`.

    Returns:
        The variable dict; with `return_report`, `(variables, LoadReport)`.

    Raises:
        ValueError: A file of another architecture, encoder or size (listing the first
            missing, unexpected and mis-shaped keys), or the errors of `build`.
        FileNotFoundError: `path` does not exist.
    """
    model = create_model(arch, encoder_name, **smp_kwargs)
    source = weight_source(arch, encoder_name)
    images = jnp.zeros((1, 256, 256, 3), smp_kwargs.get("dtype", jnp.float32))
    rngs = {"params": jax.random.PRNGKey(0) if rng is None else rng}
    target = jax.eval_shape(lambda r: model.init(r, images, train=False), rngs)
    skip = source.head_prefixes() if skip_head else ()
    variables, report = convert_state_dict(read_state_dict(path), target, source.rules, skip)
    if report.skipped:
        from flax import traverse_util
        fresh = traverse_util.flatten_dict(
            jax.jit(lambda r: model.init(r, images, train=False))(rngs), sep="/")
        flat = traverse_util.flatten_dict(variables, sep="/")
        flat.update({k: fresh[k] for k in report.skipped})
        variables = traverse_util.unflatten_dict(flat, sep="/")
    return (variables, report) if return_report else variables


def _register(arch: str):
    def builder(encoder_name: str = "resnet34", num_classes: int = 1, **kwargs):
        return build(arch, encoder_name, num_classes, **kwargs)
    builder.__name__ = registry_name(arch)
    builder.__doc__ = (f"smp's {arch} (segmentation_models_pytorch 0.6.0) on a flaxbones "
                       f"encoder: see flaxbones.smp.build; smp files load with "
                       f"flaxbones.smp.load_pretrained({arch!r}, path, encoder_name, ...).")
    register_model("segmenter")(builder)


for _arch_name in DECODERS:
    _register(_arch_name)
