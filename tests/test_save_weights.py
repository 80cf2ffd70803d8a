"""save_weights: torch-layout round trips for one model per family, every segmentation preset
and a detector; flax-layout round trips; corrupt files; atomic writes."""
import collections
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision
from flax.traverse_util import flatten_dict
from safetensors import safe_open
from safetensors.torch import load_file

import flaxbones as fb
from flaxbones.weights.load import abstract_variables
from flaxbones.weights.reference import _parameters_on_meta
from torch_ref import assert_close, random_variables, run, save_state

timm = pytest.importorskip("timm")
tvd = torchvision.models.detection


def _tv(name, **kwargs):
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _frozen_detector():
    """torchvision's Faster R-CNN MobileNetV3-Large FPN as its COCO weights build it:
    FrozenBatchNorm2d in the backbone body (no num_batches_tracked keys)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    def freeze(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, FrozenBatchNorm2d(child.num_features))
            else:
                freeze(child)
    model = tvd.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    freeze(model.backbone.body)
    return model


def _segmenter(name, aux):
    return _tv(name, weights_backbone=None, aux_loss=aux), {"aux_loss": True} if aux else {}


# flaxbones name -> (the torch reference as torchvision / timm builds it, create_model kwargs).
# torchvision's ViT round trips scanned (test_scanned_model_saves_the_reference_layout).
REFERENCES = {
    "resnet18": (_tv("resnet18"), {}),
    "resnet50d": (_timm("resnet50d"), {}),
    "mobilenet_v2_050": (_tv("mobilenet_v2", width_mult=0.5), {}),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), {}),
    "convnext_tiny": (_tv("convnext_tiny"), {}),
    "convnextv2_atto": (_timm("convnextv2_atto"), {}),
    "efficientnet_b0": (_tv("efficientnet_b0"), {}),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), {}),
    "vit_small_patch16_224": (_timm("vit_small_patch16_224", num_classes=10),
                              {"num_classes": 10}),
    "swin_t": (_tv("swin_t"), {}),
    "swin_v2_t": (_tv("swin_v2_t"), {}),
    "maxvit_t": (_tv("maxvit_t"), {}),
    "densenet121": (_tv("densenet121"), {}),
    "inception_v3": (_tv("inception_v3", aux_logits=True, init_weights=False), {}),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=False),
                  {"aux_logits": False}),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), {}),
    "squeezenet1_0": (_tv("squeezenet1_0"), {}),
    "mnasnet0_5": (_tv("mnasnet0_5"), {}),
    "xception": (_timm("legacy_xception"), {}),
    "mobilenet_v1": (_timm("mobilenetv1_100"), {}),
    "deeplabv3_mobilenet_v3_large": _segmenter("deeplabv3_mobilenet_v3_large", True),
    "lraspp_mobilenet_v3_large": _segmenter("lraspp_mobilenet_v3_large", False),
    "fasterrcnn_mobilenet_v3_large_fpn": (_frozen_detector, {}),
}
# Large ones (big fully connected layers, deep ResNets), and families whose layouts the
# round trips above already cover: keys, shapes and dtypes only.
SHAPE_ONLY = {
    "xception65": (_timm("xception65"), {}),
    "fcn_resnet50": _segmenter("fcn_resnet50", False),
    "vgg11_bn": (_tv("vgg11_bn", num_classes=10), {"num_classes": 10}),
    "alexnet": (_tv("alexnet"), {}),
    "deeplabv3_resnet50": _segmenter("deeplabv3_resnet50", True),
    "deeplabv3_resnet101": _segmenter("deeplabv3_resnet101", False),
    "fcn_resnet101": _segmenter("fcn_resnet101", True),
}


def scrambled(build, seed: int = 0) -> torch.nn.Module:
    """`build()` with every parameter and BN statistic drawn at random (zeros and ones
    would hide a transposed layout), other buffers (Swin's relative position tables) as
    the reference computes them. Parameters start on the meta device where the model
    allows it (no init cost)."""
    try:
        with _parameters_on_meta():
            model = build()
    except (RuntimeError, NotImplementedError):
        model = build()
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()  # keeps its `_metadata` (MNASNet reads its version there)
    for key, value in state.items():
        if value.is_floating_point() and (value.is_meta or key.endswith(
                ("running_mean", "running_var", "weight", "bias"))):
            state[key] = torch.rand(value.shape, generator=g) + (0.5 if "var" in key else -0.5)
    model.load_state_dict(state, assign=True)
    return model.eval()


def write(state: dict, path):
    safetensors.numpy.save_file({k: v.numpy() for k, v in state.items()}, str(path))
    return path


def load_strict(model, state: dict):
    """`model.load_state_dict(state, strict=True)`; torchvision's MNASNet reads its layout
    version from the state dict's metadata, which no safetensors file carries."""
    if type(model).__name__ == "MNASNet":
        state = collections.OrderedDict(state)
        state._metadata = model.state_dict()._metadata
    model.load_state_dict(state, strict=True)


def assert_same_state(saved: dict, original: dict):
    assert sorted(saved) == sorted(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            assert saved[key].dtype == torch.int64 and saved[key].shape == value.shape
            continue
        assert saved[key].dtype == value.dtype, key
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("name", list(REFERENCES))
def test_torch_layout_round_trip(name, tmp_path):
    """torch state dict -> load_pretrained -> save_weights(layout='torch'): every key and
    tensor as it was, and the file loads strictly into the reference."""
    build, kwargs = REFERENCES[name]
    ref = scrambled(build)
    original = ref.state_dict()
    variables = fb.load_pretrained(name, write(original, tmp_path / "in.safetensors"), **kwargs)
    path = fb.save_weights(variables, tmp_path / "out.safetensors", name, "torch",
                           model_kwargs=kwargs)
    saved = load_file(str(path))
    assert_same_state(saved, original)
    load_strict(ref, saved)


@pytest.mark.parametrize("name", list(SHAPE_ONLY))
def test_torch_layout_of_large_models(name):
    """The reference's every key, shape and dtype from variables of the model's shapes."""
    build, kwargs = SHAPE_ONLY[name]
    with _parameters_on_meta():
        ref = build()
    shapes = abstract_variables(name, kwargs)
    state = fb.weights.torch_state_dict(
        jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), shapes),
        name, **kwargs)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == {
        k: (v.shape, v.dtype) for k, v in ref.state_dict().items()}
    ref.load_state_dict(tensors, strict=True, assign=True)


def test_scanned_model_saves_the_reference_layout(tmp_path):
    """torchvision's vit_b_16 loaded with scan_blocks=True saves the unscanned state dict."""
    original = scrambled(_tv("vit_b_16"), seed=1).state_dict()
    variables = fb.load_pretrained("vit_b_16", write(original, tmp_path / "in.safetensors"),
                                   scan_blocks=True)
    assert any("_scan/" in k for k in flatten_dict(variables, sep="/"))
    path = fb.save_weights(variables, tmp_path / "out.safetensors", "vit_b_16", "torch",
                           model_kwargs={"scan_blocks": True})
    assert_same_state(load_file(str(path)), original)


def test_outputs_equal_torch_after_saving_flax_variables(tmp_path):
    """flaxbones variables (resnet18, 10 classes) -> torch file -> torchvision's model:
    the same logits; the same variables through the flax layout load back bit for bit."""
    model = fb.create_model("resnet18", num_classes=10)
    images = np.random.RandomState(0).randn(2, 61, 67, 3).astype(np.float32)
    variables = random_variables(model, images[:1], scale=None, train=False)
    torch_path = fb.save_weights(variables, tmp_path / "r18.safetensors", "resnet18", "torch",
                                 model_kwargs={"num_classes": 10})
    ref = torchvision.models.resnet18(num_classes=10)
    ref.load_state_dict(load_file(str(torch_path)), strict=True)
    apply = jax.jit(functools.partial(model.apply, train=False))
    logits = apply(variables, images)["out"]
    print("max rel error", assert_close(logits, run(ref, images), what="logits"))
    flax_path = fb.save_weights(variables, tmp_path / "r18_flax.safetensors", "resnet18",
                                model_kwargs={"num_classes": 10})
    loaded = fb.load_pretrained(None, flax_path)
    assert_identical(loaded, variables)
    np.testing.assert_array_equal(apply(loaded, images)["out"], logits)
    assert_identical(fb.load_pretrained(None, torch_path), variables)  # it names its model


def assert_identical(a, b):
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_b.items():
        assert flat_a[key].dtype == value.dtype, key
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(value), err_msg=str(key))


def header(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


FLAX_CASES = {
    "bf16": ("resnet18", dict(num_classes=7, layers=(1, 1, 1, 1), dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16)),
    "segmenter": ("deeplabv3", dict(backbone="resnet18", layers=(1, 1, 1, 1), num_classes=3,
                                    output_stride=16, atrous_rates=(6, 12, 18))),
    "scanned": ("vit_b_16", dict(num_classes=5, image_size=32, hidden_dim=16, num_layers=3,
                                 num_heads=2, mlp_dim=32, scan_blocks=True)),
}


@pytest.mark.parametrize("case", list(FLAX_CASES))
def test_flax_layout_round_trip(case, tmp_path):
    """save_weights(layout='flax') -> load_pretrained(None, path): the same model kwargs
    (dtypes and tuples included) and bit-identical variables (bf16 stays bf16)."""
    name, kwargs = FLAX_CASES[case]
    size = kwargs.get("image_size", 64)
    shapes = jax.eval_shape(functools.partial(fb.create_model(name, **kwargs).init, train=False),
                            jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.RandomState(0)
    variables = jax.tree.map(lambda x: rng.randn(*x.shape).astype(x.dtype), shapes)
    path = fb.save_weights(variables, tmp_path / "w.safetensors", name, model_kwargs=kwargs,
                           metadata={"note": "hello"})
    meta = header(path)
    assert meta["model"] == name and meta["note"] == "hello" and meta["flaxbones_layout"] == "flax"
    assert fb.weights.io.decode_kwargs(meta["model_kwargs"]) == kwargs
    loaded, report = fb.load_pretrained(None, path, return_report=True)
    assert_identical(loaded, variables)
    assert not report.skipped and len(report.loaded) == len(jax.tree.leaves(variables))
    if case == "scanned":  # loads unscanned on request
        plain = fb.load_pretrained(name, path, scan_blocks=False)
        assert_identical(plain, fb.unscan_variables(variables, fb.create_model(name, **kwargs)))
    if case == "bf16":
        assert meta["mean"] == json.dumps(list(fb.get_spec(name).weights.mean))
        assert {x.dtype for x in jax.tree.leaves(loaded["params"])} == {jnp.dtype(jnp.bfloat16)}


R18 = {"num_classes": 7, "layers": (1, 1, 1, 1)}  # narrow: cheap to trace and initialise


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A flax-layout file of a narrow resnet18 (7 classes) and its variables."""
    model = fb.create_model("resnet18", **R18)
    variables = random_variables(model, np.zeros((1, 64, 64, 3), np.float32), train=False)
    path = tmp_path_factory.mktemp("flax") / "r18.safetensors"
    return fb.save_weights(variables, path, "resnet18", model_kwargs=R18), variables


def _edit(path, tmp_path, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    out = tmp_path / "edited.safetensors"
    out.write_bytes(bytes(data))
    return out


def _replace(old: bytes, new: bytes):
    def edit(data):
        at = data.index(old)
        data[at:at + len(old)] = new
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.__delitem__(slice(len(d) - 100, None)), "not a readable safetensors file"),
    (_replace(b'"__metadata__"', b'"__metadata_X"'), "not a readable safetensors file"),
    (_replace(b'"resnet18"', b'"resnet34"'), "altered after flaxbones wrote it"),
    (_replace(b'"flaxbones_version":"0', b'"flaxbones_version":"9'), "altered after"),
    (lambda d: d.__setitem__(len(d) - 5, d[len(d) - 5] ^ 1), "altered after flaxbones wrote it"),
    (lambda d: d.__setitem__(slice(0, 8), (10 ** 9).to_bytes(8, "little")), "not a readable"),
], ids=["truncated", "broken-header", "model-name", "version", "tensor-bit", "header-size"])
def test_corrupt_files_are_clear_errors(resnet18_file, tmp_path, edit, message):
    """Truncated files, broken headers, edited metadata or tensor bytes: a ValueError."""
    with pytest.raises(ValueError, match=message):
        fb.load_pretrained(None, _edit(resnet18_file[0], tmp_path, edit))


def test_files_for_another_model_are_refused(resnet18_file, tmp_path):
    path, variables = resnet18_file
    with pytest.raises(ValueError, match="holds weights of 'resnet18', not 'resnet34'"):
        fb.load_pretrained("resnet34", path)
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*mismatch:\n    params/head/fc/"
                                         r"bias \(7,\) float32 -> model \(5,\) float32"):
        fb.load_pretrained(None, path, num_classes=5)
    with pytest.raises(ValueError, match=r"missing:\n    batch_stats/backbone/layer1_1/"):
        fb.load_pretrained(None, path, layers=(2, 1, 1, 1))
    _, report = fb.load_pretrained(None, path, num_classes=5, skip_head=True, return_report=True)
    assert report.skipped == ["params/head/fc/bias", "params/head/fc/kernel"]
    assert fb.load_pretrained("resnet18", path)["params"]["head"]["fc"]["bias"].shape == (7,)
    nameless = fb.save_weights(variables, tmp_path / "nameless.safetensors")
    with pytest.raises(ValueError, match="saved without a model name"):
        fb.load_pretrained(None, nameless)
    assert_identical(fb.load_pretrained("resnet18", nameless, **R18), variables)
    plain = save_state(torchvision.models.resnet18(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="pass the model name"):
        fb.load_pretrained(None, plain)  # a torch state dict without flaxbones metadata


def test_bad_saves_write_nothing(resnet18_file, tmp_path):
    """Wrong suffix, variables of another model, kwargs the reference cannot express,
    leftover variables: a ValueError and no file."""
    _, variables = resnet18_file
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=".safetensors files only"):
        fb.save_weights(variables, tmp_path / "x.pth", "resnet18")
    with pytest.raises(ValueError, match="(?s)do not match the model; nothing was written.*head"):
        fb.save_weights(variables, out, "resnet18", model_kwargs={"layers": (1, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"cannot express model_kwargs \['layers'\]"):
        fb.save_weights(variables, out, "resnet18", "torch", model_kwargs=R18)
    extra = {**variables, "params": {**variables["params"], "extra": {"kernel": np.ones(3)}}}
    with pytest.raises(ValueError, match=r"(?s)reference keys without a variable:\n    layer1.1."
                                         r".*variables unused:\n    params/extra/kernel"):
        fb.save_weights(extra, out, "resnet18", "torch", model_kwargs={"num_classes": 7})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(resnet18_file, tmp_path, monkeypatch):
    """A writer that dies part-way leaves the old file byte for byte and no temp file."""
    path, variables = resnet18_file
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())

    def dying(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", dying)
    with pytest.raises(OSError, match="disk full"):
        fb.save_weights(variables, target, "resnet18", model_kwargs=R18)
    assert target.read_bytes() == path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        fb.save_weights(variables, tmp_path / "new.safetensors", "resnet18", model_kwargs=R18)
    assert os.listdir(tmp_path) == [path.name]
