"""Parity with torchvision's segmenters: same random weights, odd input, out and aux."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.models.segmentation as tvseg

import flaxbones as fb
from flaxbones.heads import FCNHead
import torch_ref

H, W = 97, 131


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _reference(name, seed, **kwargs):
    torch.manual_seed(seed)
    model = getattr(tvseg, name)(weights=None, weights_backbone=None, **kwargs)
    return torch_ref.randomize(model, seed).eval()


def _images(seed=0, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def fcn_case(tmp_path_factory):
    ref = _reference("fcn_resnet50", 1, aux_loss=True)
    path = torch_ref.save_state(ref, tmp_path_factory.mktemp("w") / "fcn.safetensors")
    return ref, fb.load_pretrained("fcn_resnet50", path, aux_loss=True)


@pytest.mark.parametrize("name, seed", [("fcn_resnet50", 1), ("deeplabv3_resnet50", 2),
                                        ("deeplabv3_mobilenet_v3_large", 4)])
def test_eval_parity_with_aux(name, seed, tmp_path, fcn_case):
    if name == "fcn_resnet50":
        ref, variables = fcn_case
    else:
        ref = _reference(name, seed, aux_loss=True)
        path = torch_ref.save_state(ref, tmp_path / f"{name}.pth")
        variables = fb.load_pretrained(name, path, aux_loss=True)
    model = fb.create_model(name, aux_loss=True)
    x = _images(seed)
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x))
    expected = torch_ref.run(ref, x)
    assert set(out) == set(expected) == {"out", "aux"}
    for key in ("out", "aux"):
        rel = torch_ref.assert_close(out[key], expected[key], what=f"{name} {key}")
        print(f"{name} eval {key}: max rel diff {rel:.2e}")


@pytest.fixture(scope="module")
def lraspp_case(tmp_path_factory):
    ref = _reference("lraspp_mobilenet_v3_large", 5)
    return ref, torch_ref.save_state(ref, tmp_path_factory.mktemp("w") / "lraspp.safetensors")


def test_lraspp_mobilenet_v3_large_parity(lraspp_case):
    ref, path = lraspp_case
    model = fb.create_model("lraspp_mobilenet_v3_large")
    x = _images(5)
    out = jax.jit(model.apply)(fb.load_pretrained("lraspp_mobilenet_v3_large", path), x)
    rel = torch_ref.assert_close(out["out"], torch_ref.run(ref, x)["out"], what="lraspp out")
    print(f"lraspp_mobilenet_v3_large eval out: max rel diff {rel:.2e}")


def test_fcn_train_mode_parity(fcn_case):
    """Train mode: outputs and every updated running statistic (dropout off both sides)."""
    ref, variables = fcn_case
    ref.classifier[3].p = ref.aux_classifier[3].p = 0.0
    model = fb.Segmenter(fb.create_backbone("resnet50", output_stride=8),
                         FCNHead(21, dropout=0.0), FCNHead(21, feature="C4", dropout=0.0))
    x = _images(3)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(x))
    expected = torch_ref.run(ref, x, train=True)
    for key in ("out", "aux"):
        rel = torch_ref.assert_close(out[key], expected[key], what=f"train {key}")
        print(f"fcn_resnet50 train {key}: max rel diff {rel:.2e}")
    ref.eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    flat = fb.weights.convert_state_dict(state, jax.eval_shape(lambda: variables),
                                         fb.get_spec("fcn_resnet50").weights.rules)[0]
    worst = max(torch_ref.assert_close(a, b, what="running stats") for a, b in zip(
        jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(flat["batch_stats"])))
    print(f"fcn_resnet50 train running stats: max rel diff {worst:.2e}")


@pytest.mark.parametrize("name", ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50",
                                  "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large"])
def test_parameter_counts(name):
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    with torch.device("meta"):
        ref = getattr(tvseg, name)(weights=None, weights_backbone=None, **aux)
    model = fb.create_model(name, **aux)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert _count(shapes["params"]) == sum(p.numel() for p in ref.parameters())
    buffers = sum(b.numel() for n, b in ref.named_buffers()
                  if not n.endswith("num_batches_tracked"))
    assert _count(shapes["batch_stats"]) == buffers


def test_head_prefixes_cover_the_num_classes_dependent_leaves(lraspp_case):
    """The source's head_prefix (what `skip_head` leaves to init) is exactly the classifiers.

    Checked through convert_state_dict: load_pretrained(skip_head=True) jit-inits the whole
    model for the fresh leaves, which costs half a minute of CPU here."""
    _, path = lraspp_case
    name = "lraspp_mobilenet_v3_large"
    source = fb.get_spec(name).weights
    target = jax.eval_shape(fb.create_model(name, num_classes=5).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 64, 64, 3)))
    _, report = fb.weights.convert_state_dict(fb.weights.read_state_dict(path), target,
                                              source.rules, source.head_prefix)
    assert sorted(report.skipped) == [f"params/head/{c}_classifier/{p}" for c in ("high", "low")
                                      for p in ("bias", "kernel")]
    assert fb.get_spec("fcn_resnet50").weights.head_prefix == ("head/classifier",
                                                               "aux_head/classifier")
    with pytest.raises(ValueError, match="shape mismatch"):
        fb.load_pretrained(name, path, num_classes=5)
    with pytest.raises(ValueError, match="missing in the file"):
        fb.load_pretrained("deeplabv3_mobilenet_v3_large", path)
