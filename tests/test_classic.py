"""VGG, GoogLeNet and AlexNet against torchvision: parity, counts, feature_info, errors."""
import copy
import gc
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones.layers import adaptive_avg_pool
from flaxbones.weights import convert_state_dict
import torch_ref

VGGS = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
NAMES = VGGS + ["googlenet", "alexnet"]
STRIDES = {n: (8, 16, 32) for n in VGGS} | {"googlenet": (32,), "alexnet": (32,)}
IMAGES = np.random.RandomState(0).randn(2, 97, 131, 3).astype(np.float32)


def _n_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _vgg_taps(tm):
    """C1..C4: the ReLU before pool2..pool5; C5: pool5 (see flaxbones.backbones.vgg)."""
    pools = [i for i, m in enumerate(tm.features) if isinstance(m, torch.nn.MaxPool2d)]
    taps = {f"C{k}": tm.features[pools[k] - 1] for k in range(1, 5)}
    return taps | {"C5": tm.features[pools[4]]}


def _googlenet_taps(tm):
    return {"C1": tm.conv1, "C2": tm.conv3, "C3": tm.inception3b, "C4": tm.inception4e,
            "C5": tm.inception5b, "inception4a": tm.inception4a, "inception4d": tm.inception4d}


def _alexnet_taps(tm):
    return {"C2": tm.features[1], "C3": tm.features[4], "C4": tm.features[11],
            "C5": tm.features[12]}


def _torch_forward(tm, taps, x, train):
    """The reference's outputs and the NHWC features captured by forward hooks."""
    feats = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: feats.__setitem__(k, out.clone()))
             for k, m in taps.items()]
    try:
        out = torch_ref.run(tm, x, train=train)
    finally:
        for h in hooks:
            h.remove()
    return out, torch_ref.to_numpy(feats)


def _flax_forward(model, variables, x, train, mutable=("intermediates",)):
    """One compiled call: outputs, backbone features, and the updated collections."""
    fn = jax.jit(partial(model.apply, train=train, mutable=list(mutable),
                         capture_intermediates=lambda m, _: m.name == "backbone"))
    out, state = fn(variables, jnp.asarray(x))
    return out, state.pop("intermediates")["backbone"]["__call__"][0], state


def _compare_features(feats, ref_feats, what):
    assert sorted(feats) == sorted(ref_feats), what
    return {k: torch_ref.assert_close(feats[k], ref_feats[k], what=f"{what} {k}")
            for k in ref_feats}


# name -> (torchvision reference with dropout off, its feature taps)
REFERENCES = {
    "vgg11": (lambda: torchvision.models.vgg11(dropout=0.0), _vgg_taps),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(dropout=0.0), _vgg_taps),
    "vgg16_bn": (lambda: torchvision.models.vgg16_bn(dropout=0.0), _vgg_taps),
    "googlenet": (lambda: torchvision.models.googlenet(
        init_weights=True, aux_logits=True, dropout=0.0, dropout_aux=0.0), _googlenet_taps),
    "alexnet": (lambda: torchvision.models.alexnet(dropout=0.0), _alexnet_taps),
}
TRAIN = ("vgg11_bn", "googlenet")


@pytest.mark.parametrize("name", list(REFERENCES))
def test_parity(name, tmp_path):
    """Eval (and for BN models train) parity: logits, every feature level, running stats.

    GoogLeNet runs eval with transform_input=True and train with it off, so both paths
    are covered by one set of weights; train mode compares the aux logits too (torchvision
    returns them only in training; flaxbones in both modes).
    """
    build, taps = REFERENCES[name]
    torch.manual_seed(0)
    tm = torch_ref.randomize(build())
    path = torch_ref.save_state(tm, tmp_path / f"{name}.safetensors")
    variables = fb.load_pretrained(name, path)
    errors = {}
    for train in (False, True) if name in TRAIN else (False,):
        kwargs = {"transform_input": not train} if name == "googlenet" else {}
        tm.transform_input = kwargs.get("transform_input", False)
        ref, ref_feats = _torch_forward(tm, taps(tm), IMAGES, train)
        mutable = ("intermediates", "batch_stats") if train else ("intermediates",)
        out, feats, state = _flax_forward(fb.create_model(name, **kwargs), variables, IMAGES,
                                          train, mutable)
        mode = "train" if train else "eval"
        assert sorted(out) == (["aux1", "aux2", "out"] if name == "googlenet" else ["out"])
        if isinstance(ref, tuple):  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
            errors[f"{mode} logits"] = torch_ref.assert_close(out["out"], ref.logits)
            errors[f"{mode} aux1"] = torch_ref.assert_close(out["aux1"], ref.aux_logits1)
            errors[f"{mode} aux2"] = torch_ref.assert_close(out["aux2"], ref.aux_logits2)
        else:
            errors[f"{mode} logits"] = torch_ref.assert_close(out["out"], ref, what=f"{name} {mode}")
        for k, e in _compare_features(feats, ref_feats, f"{name} {mode}").items():
            errors[f"{mode} {k}"] = e
        if train:
            state_dict = {k: v.numpy() for k, v in tm.state_dict().items()}
            expected, _ = convert_state_dict(state_dict, variables, fb.get_spec(name).weights.rules)
            got = jax.tree_util.tree_leaves_with_path(state["batch_stats"])
            want = jax.tree_util.tree_leaves(expected["batch_stats"])
            assert len(got) == len(want)
            errors["train running stats"] = max(
                torch_ref.assert_close(g, w, what=jax.tree_util.keystr(p))
                for (p, g), w in zip(got, want))
    print(f"\n{name} max relative diff:", {k: f"{v:.1e}" for k, v in errors.items()})
    del tm, variables
    gc.collect()


def test_vgg_dilated_matches_dilated_torch():
    """OS16/OS8 equal a torchvision VGG edited as DeepLab-LargeFOV: pools past the stride
    become MaxPool2d(3, 1, 1) and later convs get dilation (and padding) 2 per removed stride."""
    torch.manual_seed(0)
    tm = torch_ref.randomize(torchvision.models.vgg11_bn()).eval()
    clf = fb.create_model("vgg11_bn")
    target = jax.eval_shape(partial(clf.init, train=False), jax.random.PRNGKey(0), IMAGES[:1])
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    converted, _ = convert_state_dict(state, target, fb.get_spec("vgg11_bn").weights.rules)
    variables = {col: tree["backbone"] for col, tree in converted.items()}

    def dilated_features(output_stride):
        features, stride, dilation = copy.deepcopy(tm.features), 1, 1
        for i, m in enumerate(features):
            if isinstance(m, torch.nn.Conv2d):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)
            elif isinstance(m, torch.nn.MaxPool2d) and stride * 2 > output_stride:
                features[i], dilation = torch.nn.MaxPool2d(3, 1, 1), dilation * 2
            elif isinstance(m, torch.nn.MaxPool2d):
                stride *= 2
        return features

    models = {os: fb.create_backbone("vgg11_bn", output_stride=os) for os in (8, 16)}
    outs = jax.jit(lambda v, x: {os: m.apply(v, x) for os, m in models.items()})(
        variables, jnp.asarray(IMAGES))
    expected_strides = {8: [2, 4, 8, 8, 8], 16: [2, 4, 8, 16, 16]}
    for os, feats in outs.items():
        infos = models[os].feature_info
        assert [i.stride for i in infos] == expected_strides[os]
        ref = types.SimpleNamespace(features=dilated_features(os))
        _, ref_feats = _torch_forward(ref.features, _vgg_taps(ref), IMAGES, False)
        errors = _compare_features(feats, ref_feats, f"vgg11_bn OS{os}")
        for info in infos:
            assert feats[info.name].shape[-1] == info.channels
            assert np.isfinite(np.asarray(feats[info.name])).all()
        print(f"\nvgg11_bn OS{os} max relative diff:", {k: f"{v:.1e}" for k, v in errors.items()})


def _torch_params(name, **kwargs):
    with torch.device("meta"):
        if name == "googlenet":
            kwargs.setdefault("init_weights", False)
        model = getattr(torchvision.models, name)(**kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    model = fb.create_model(name)
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.PRNGKey(0), IMAGES[:1])
    assert _n_params(shapes["params"]) == _torch_params(name)


def test_googlenet_without_aux_counts_and_loads(tmp_path):
    """aux_logits=False is torchvision's googlenet(aux_logits=False): 6.6M parameters, and
    the state dict of a pretrained torchvision GoogLeNet (aux dropped) loads only that way."""
    model = fb.create_model("googlenet", aux_logits=False)
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.PRNGKey(0), IMAGES[:1])
    assert _n_params(shapes["params"]) == _torch_params("googlenet", aux_logits=False)
    assert "aux_head" not in shapes["params"]
    tm = torchvision.models.googlenet(aux_logits=False, init_weights=False)
    path = torch_ref.save_state(tm, tmp_path / "googlenet_noaux.safetensors")
    fb.load_pretrained("googlenet", path, aux_logits=False)
    with pytest.raises(ValueError, match="aux_head/aux1"):
        fb.load_pretrained("googlenet", path)


@pytest.mark.parametrize("name,num_features", [("vgg11", 4096), ("alexnet", 4096),
                                               ("googlenet", 1024)])
def test_num_classes_zero_returns_features(name, num_features):
    model = fb.create_model(name, num_classes=0)
    out, _ = jax.eval_shape(partial(model.init_with_output, train=False),
                            jax.random.PRNGKey(0), IMAGES)
    assert out["out"].shape == (2, num_features)


@pytest.mark.parametrize("name,output_stride",
                         [(n, s) for n in NAMES for s in STRIDES[n]])
def test_feature_info_matches_shapes(name, output_stride):
    bb = fb.create_backbone(name, output_stride=output_stride)
    out, _ = jax.eval_shape(partial(bb.init_with_output, train=False),
                            jax.random.PRNGKey(0), IMAGES)
    info = bb.feature_info
    assert list(out) == [i.name for i in info]
    for i in info:
        n, h, w, c = out[i.name].shape
        assert (n, c) == (2, i.channels), i
        for size, got in ((97, h), (131, w)):  # valid convs and floor pools lose a pixel or two
            assert size // i.stride - 1 <= got <= -(-size // i.stride), (i, out[i.name].shape)


def test_googlenet_aux_inputs_are_declared_levels():
    """The aux classifiers read named Inception blocks, which the classifier asks its
    backbone for; a backbone that cannot give them fails at construction."""
    assert [i.name for i in fb.create_backbone("googlenet").feature_info] == \
        ["C1", "C2", "C3", "C4", "C5"]
    model = fb.create_model("googlenet")
    assert model.aux_head.levels == ("inception4a", "inception4d")
    assert [i.name for i in model.feature_info][-2:] == ["inception4a", "inception4d"]
    assert fb.create_backbone("googlenet", out_features=("inception4a",)).feature_info == (
        fb.FeatureInfo("inception4a", 16, 512),)
    with pytest.raises(ValueError, match="missing .*inception4a"):
        fb.create_model("googlenet", out_features=("C5",))


@pytest.mark.parametrize("name,output_stride", [("googlenet", 16), ("googlenet", 8),
                                                ("alexnet", 16), ("vgg16", 4), ("vgg11_bn", 64)])
def test_unsupported_output_stride(name, output_stride):
    with pytest.raises(ValueError, match=f"output_stride={output_stride} is not supported"):
        fb.create_backbone(name, output_stride=output_stride)
    with pytest.raises(ValueError, match="output_stride"):
        fb.create_model(name, output_stride=output_stride)


@pytest.mark.parametrize("name,size", [("vgg11", 31), ("alexnet", 62), ("googlenet", 14)])
def test_too_small_images(name, size):
    bb = fb.create_backbone(name)
    with pytest.raises(ValueError, match="smaller than"):
        jax.eval_shape(bb.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size + 1, 3)))
    jax.eval_shape(bb.init, jax.random.PRNGKey(0), jnp.zeros((1, size + 1, size + 1, 3)))


def test_nchw_input_rejected():
    with pytest.raises(ValueError, match="NCHW"):
        jax.eval_shape(fb.create_backbone("vgg11").init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 3, 64, 64)))


@pytest.mark.parametrize("size,out", [((3, 4), 7), ((13, 17), (4, 6)), ((14, 14), 4),
                                      ((6, 6), 6), ((1, 2), 3)])
def test_adaptive_avg_pool_matches_torch(size, out):
    x = np.random.RandomState(1).randn(2, *size, 5).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out)
    torch_ref.assert_close(adaptive_avg_pool(jnp.asarray(x), out),
                           ref.permute(0, 2, 3, 1).numpy(), rel=1e-6)


@pytest.mark.parametrize("name", ["vgg11_bn", "googlenet", "alexnet"])
def test_dtype_policy_is_threaded(name):
    clf = fb.create_model(name, num_classes=10, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    out, variables = jax.eval_shape(partial(clf.init_with_output, train=False),
                                    jax.random.PRNGKey(0), IMAGES)
    assert {o.dtype for o in out.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
