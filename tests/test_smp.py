"""smp models on flaxbones: whole segmentation_models_pytorch 0.6.0 models (encoder, decoder,
segmentation and classification heads) loaded from their state-dict files and run with the
same numbers; parameter counts; encoder depth, dilation and timm-universal encoders; errors.

The decoders are tested standalone in their own files; here each gets the whole-model
treatment by one line of DECODERS: its state dict on two encoders loads key for key with
smp's parameter count, and eval logits match on the encoders listed. ResNet-18 runs one
block per stage (smp's encoder table patched alike) to keep compiles short."""
import contextlib
import functools

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import flaxbones as fb
from flaxbones import smp as fsmp
from flaxbones.weights.convert import convert_state_dict
from smp_ref import param_count
from torch_ref import assert_close, randomize, run, save_state

smp = pytest.importorskip("segmentation_models_pytorch")

H, W = 64, 96
IMAGES = np.random.RandomState(0).randn(2, H, W, 3).astype(np.float32)
NARROW = {"resnet18": dict(layers=(1, 1, 1, 1))}
AUX = dict(classes=4, dropout=0.0, pooling="max", activation="softmax")
# smp class: (narrow decoder options for both sides, encoders with eval-logit parity)
DECODERS = {
    "Unet": (dict(decoder_channels=(32, 16, 16, 8, 8)), ("resnet18", "mobilenet_v2")),
    "UnetPlusPlus": (dict(decoder_channels=(16, 16, 8, 8, 8)), ()),
    "FPN": (dict(decoder_pyramid_channels=32, decoder_segmentation_channels=32), ()),
    "PSPNet": (dict(psp_out_channels=32), ()),
    "DeepLabV3": (dict(decoder_channels=32), ("mobilenet_v2",)),
    "DeepLabV3Plus": (dict(decoder_channels=32, encoder_output_stride=16), ("resnet18",)),
    "Linknet": ({}, ()),
    "MAnet": (dict(decoder_channels=(32, 16, 16, 8, 8), decoder_pab_channels=16), ()),
    "PAN": (dict(decoder_channels=16), ()),
    "UPerNet": (dict(decoder_channels=32), ()),
    "Segformer": (dict(decoder_segmentation_channels=32), ()),
}

@contextlib.contextmanager
def _narrow_smp(encoder_name):
    """smp's encoder table with `NARROW`'s options while a model is built."""
    params = smp.encoders.encoders.get(encoder_name, {}).get("params", {})
    saved = dict(params)
    params.update({k: list(v) for k, v in NARROW.get(encoder_name, {}).items()})
    try:
        yield
    finally:
        params.clear()
        params.update(saved)


def reference(arch, encoder_name, seed=0, meta=False, **kwargs):
    """smp.`arch` on `encoder_name` (random weights, BN statistics randomised), eval mode."""
    torch.manual_seed(seed)
    with _narrow_smp(encoder_name), torch.device("meta" if meta else "cpu"):
        model = getattr(smp, arch)(encoder_name, encoder_weights=None, **kwargs)
    return model if meta else randomize(model, seed).eval()


def flax_kwargs(encoder_name, **kwargs):
    narrow = NARROW.get(encoder_name)
    return {**kwargs, **({"encoder_kwargs": narrow} if narrow else {})}


def _key(options: dict):
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                        for k, v in options.items()))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("smp")


@functools.cache
def _case(arch, encoder_name, key, tmp):
    options = {k: dict(v) if k == "aux_params" else v for k, v in key}
    ref = reference(arch, encoder_name, seed=len(arch), **options)
    path = save_state(ref, tmp / f"{arch}_{encoder_name}_{abs(hash(key))}.safetensors")
    kwargs = flax_kwargs(encoder_name, **options)
    variables = fsmp.load_pretrained(arch, path, encoder_name, **kwargs)
    return ref, fsmp.create_model(arch, encoder_name, **kwargs), variables, path


def case(arch, encoder_name, tmp, **options):
    """(smp reference, flaxbones model, its variables read from the reference's file, the
    file), built once per arguments."""
    return _case(arch, encoder_name, _key(options), tmp)


def _apply(model, variables, x, train=False):
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x)
    return jax.jit(lambda v, x: model.apply(v, x))(variables, x)


def _check(out, want, what):
    masks, labels = want if isinstance(want, tuple) else (want, None)
    assert_close(out["out"], masks, what=f"{what} masks")
    assert set(out) == ({"out"} if labels is None else {"out", "labels"})
    if labels is not None:
        assert_close(out["labels"], labels, what=f"{what} labels")


@pytest.mark.parametrize("arch, encoder_name", [
    (arch, enc) for arch, (_, encoders) in DECODERS.items() for enc in encoders])
def test_whole_model_parity(arch, encoder_name, tmp):
    """Eval logits of smp.`arch` read from its file equal smp's (U-Net: with the aux head's
    labels; DeepLab: smp's dilated encoders, ResNet at output stride 16, MobileNetV2 at 8)."""
    aux = {"aux_params": AUX} if arch == "Unet" else {}
    ref, model, variables, _ = case(arch, encoder_name, tmp, **DECODERS[arch][0], classes=3,
                                    **aux)
    _check(_apply(model, variables, IMAGES), run(ref, IMAGES), f"{arch}/{encoder_name}")


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_train_mode_parity(arch, tmp):
    """Train mode: outputs and every BatchNorm statistic smp updates (dropout off)."""
    options = dict(DECODERS[arch][0], classes=3)
    options.update({"decoder_aspp_dropout": 0.0} if arch == "DeepLabV3Plus" else {})
    ref, model, variables, path = case(arch, "resnet18", tmp, **options)
    out, updates = _apply(model, variables, IMAGES, train=True)
    ref = reference(arch, "resnet18", seed=len(arch), **options)  # the same weights, fresh
    _check(out, run(ref, IMAGES, train=True), f"{arch} train")
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    want = convert_state_dict(state, variables, fsmp.weight_source(arch, "resnet18").rules)[0]
    got = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    want = traverse_util.flatten_dict(want["batch_stats"], sep="/")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert_close(got[key], value, what=f"{arch} train {key}")


def _load_shapes(arch, encoder_name, ref, **kwargs):
    """Zeros shaped as `ref`'s state dict through the smp rules (all or nothing) onto the
    flaxbones model's traced variables."""
    model = fsmp.create_model(arch, encoder_name, **kwargs)
    x = np.zeros((1, 256, 256, 3), np.float32)
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    state = {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}
    return convert_state_dict(state, target, fsmp.weight_source(arch, encoder_name).rules)[0]


LOAD_CASES = [(arch, enc, {}) for arch in DECODERS for enc in ("resnet34", "mobilenet_v2")] + [
    ("Unet", "mobilenet_v2", dict(encoder_depth=4, decoder_channels=(64, 32, 16, 8))),
    ("Unet", "resnet34", dict(encoder_depth=3, decoder_channels=(64, 32, 16))),
    ("PSPNet", "resnet34", dict(encoder_depth=4)),
    ("Unet", "vgg11_bn", {}),
    ("UnetPlusPlus", "vgg13", dict(encoder_depth=4, decoder_channels=(64, 32, 16, 8))),
    ("DeepLabV3", "resnext50_32x4d", dict(encoder_output_stride=16)),
    ("FPN", "tu-resnet50d", {}),
    ("Linknet", "tu-regnetx_004_tv", {}),
    ("Unet", "tu-mobilenetv1_100", {}),
    ("Segformer", "tu-convnextv2_atto", {}),
    ("DeepLabV3Plus", "tu-convnextv2_atto", {}),
]


@pytest.mark.parametrize("arch, encoder_name, options", LOAD_CASES)
def test_state_dicts_load_with_equal_parameter_counts(arch, encoder_name, options):
    """smp's full-size model (every decoder on a ResNet and a MobileNet, other depths,
    strides and encoders, with an aux head): its state dict loads key for key and shape for
    shape, and the parameter counts are equal (traced, not compiled)."""
    kwargs = dict(options, classes=5, aux_params=dict(classes=2))
    ref = reference(arch, encoder_name, meta=True, **kwargs)
    variables = _load_shapes(arch, encoder_name, ref, **kwargs)
    assert param_count(variables) == sum(p.numel() for p in ref.parameters())


def test_encoder_depth_3_and_timm_universal_encoder(tmp):
    """U-Net on a depth-3 ResNet (smp keeps layer3/4's weights, unread) and on timm's
    ConvNeXt-V2 (`tu-`, a transformer-style encoder whose stride-2 feature smp leaves empty),
    eval logits equal."""
    for encoder_name, options in (("resnet18", dict(encoder_depth=3, decoder_channels=(16, 8, 8))),
                                  ("tu-convnextv2_atto", dict(decoder_channels=(16, 16, 8, 8, 8)))):
        ref, model, variables, _ = case("Unet", encoder_name, tmp, **options)
        _check(_apply(model, variables, IMAGES[:1]), run(ref, IMAGES[:1]), encoder_name)


def test_wrong_state_dicts_load_nothing(tmp):
    """A U-Net/ResNet-18 file read as an FPN or as a U-Net on MobileNetV2: a ValueError
    listing the mismatched keys."""
    *_, path = case("Unet", "resnet18", tmp, **DECODERS["Unet"][0], classes=3,
                    aux_params=AUX)
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*decoder\.blocks"):
        fsmp.load_pretrained("FPN", path, "resnet18", classes=3, aux_params=AUX,
                             **flax_kwargs("resnet18"))
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*encoder\.layer1"):
        fsmp.load_pretrained("Unet", path, "mobilenet_v2", classes=3, aux_params=AUX,
                             **DECODERS["Unet"][0])


def test_registry_and_bad_options():
    assert fb.list_models("smp_*") == sorted(fsmp.registry_name(a) for a in DECODERS)
    model = fb.create_model("smp_deeplabv3plus", num_classes=2)
    assert model.backbone.output_stride == 16 and model.backbone.whole_stage_dilation
    for kwargs, match in ((dict(in_channels=1), "in_channels"),
                          (dict(encoder_name="tu-resnet50d", encoder_depth=4), "encoder_depth"),
                          (dict(encoder_name="vgg16", encoder_output_stride=16), "dilated"),
                          (dict(encoder_name="efficientnet-b0"), "supported"),
                          (dict(encoder_weights="imagenet"), "never downloads")):
        with pytest.raises(ValueError, match=match):
            fb.create_model("smp_deeplabv3plus", **kwargs)
    with pytest.raises(ValueError, match="encoder_output_stride"):
        fb.create_model("smp_unet", encoder_output_stride=16)
    fpn = fb.create_model("smp_fpn")
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(fpn.init, jax.random.PRNGKey(0), np.zeros((1, 65, 64, 3), np.float32))


def test_flaxbones_unet_head_computes_smps_unet(tmp):
    """flaxbones' own `unet` segmenter (no smp options) with smp.Unet/ResNet-18's weights,
    its decoder blocks renamed: smp's logits at a size both take (even sides)."""
    options = dict(DECODERS["Unet"][0], classes=3)
    ref, *_, path = case("Unet", "resnet18", tmp, **options)
    model = fb.create_model("unet", backbone="resnet18", num_classes=3,
                            decoder_channels=options["decoder_channels"], **NARROW["resnet18"])
    rules = fsmp.encoder("resnet18").backbone_rules() + (
        (r"decoder\.blocks\.(\d)\.conv1\.0", r"head/block\1_0/conv"),
        (r"decoder\.blocks\.(\d)\.conv1\.1", r"head/block\1_0/bn"),
        (r"decoder\.blocks\.(\d)\.conv2\.0", r"head/block\1_1/conv"),
        (r"decoder\.blocks\.(\d)\.conv2\.1", r"head/block\1_1/bn"),
        (r"segmentation_head\.0", "head/classifier"))
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), IMAGES[:1])
    variables = convert_state_dict(
        {k: v.numpy() for k, v in ref.state_dict().items()}, target, rules)[0]
    _check(_apply(model, variables, IMAGES), run(ref, IMAGES), "unet head")


def test_decoders_on_flaxbones_backbones_smp_has_no_encoder_for():
    """Any flaxbones backbone under an smp decoder: Swin (no stride-2 level: smp's empty
    C1) under UPerNet and U-Net, EfficientNet at its own output stride 16 under
    DeepLabV3+; MobileNetV3 under FPN runs under jit, logits at the input size."""
    x = IMAGES[:1, :64, :64]
    for arch, encoder_name, kwargs in (("smp_upernet", "swin_t", {}),
                                       ("smp_unet", "swin_t", {}),
                                       ("smp_deeplabv3plus", "efficientnet_b0", {})):
        model = fb.create_model(arch, encoder_name=encoder_name, num_classes=2, **kwargs)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        out = jax.eval_shape(model.apply, variables, x)
        assert out["out"].shape == (1, 64, 64, 2), (arch, encoder_name)
    assert model.backbone.output_stride == 16
    model = fb.create_model("smp_fpn", encoder_name="mobilenet_v3_small", num_classes=2,
                            decoder_pyramid_channels=32, decoder_segmentation_channels=32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    out = _apply(model, variables, x)["out"]
    assert out.shape == (1, 64, 64, 2) and np.isfinite(out).all()
