"""Parity with torchvision's segmenters: same random weights, odd input, out and aux."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.models.segmentation as tvseg

import flaxbones as fb
from flaxbones.heads import FCNHead
from tests import torch_ref

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


@pytest.mark.parametrize("name, seed", [("fcn_resnet50", 1), ("deeplabv3_resnet50", 2)])
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
                                  "deeplabv3_resnet101"])
def test_parameter_counts(name):
    with torch.device("meta"):
        ref = getattr(tvseg, name)(weights=None, weights_backbone=None, aux_loss=True)
    model = fb.create_model(name, aux_loss=True)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert _count(shapes["params"]) == sum(p.numel() for p in ref.parameters())
    buffers = sum(b.numel() for n, b in ref.named_buffers() if not n.endswith("num_batches_tracked"))
    assert _count(shapes["batch_stats"]) == buffers


def test_skip_head_loads_other_num_classes(fcn_case, tmp_path):
    ref, _ = fcn_case
    path = torch_ref.save_state(ref, tmp_path / "fcn.safetensors")
    variables, report = fb.load_pretrained("fcn_resnet50", path, aux_loss=True, num_classes=5,
                                           skip_head=True, return_report=True)
    assert sorted(report.skipped) == ["params/aux_head/classifier/bias",
                                      "params/aux_head/classifier/kernel",
                                      "params/head/classifier/bias", "params/head/classifier/kernel"]
    assert variables["params"]["head"]["classifier"]["kernel"].shape == (1, 1, 512, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        fb.load_pretrained("fcn_resnet50", path, aux_loss=True, num_classes=5)
