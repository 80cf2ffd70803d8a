"""Faster / Mask / Keypoint R-CNN against torchvision 0.29, preset by preset: the same random
weights (loaded through fb.load_pretrained from a .pth), the same two images of odd sizes put
through torchvision's own transform (min_size 64, max_size 128), and every stage compared:
FPN features, RPN raw outputs, proposals, box head outputs, final detections one to one,
per-box mask probabilities, keypoints. Plus parameter counts, trainable layers, wrong files,
bad inputs and the generic builders on four backbone families."""
import re
from functools import lru_cache
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import rcnn_ref  # noqa: E402
import torch_ref  # noqa: E402
from flax import traverse_util  # noqa: E402

import flaxbones as fb  # noqa: E402
import flaxbones.detection.rcnn_presets  # noqa: E402,F401  (registers the presets)
from flaxbones.detection.base import trainable_mask  # noqa: E402
from flaxbones.detection.boxes import box_iou  # noqa: E402
from flaxbones.detection.base import frozen_bn_patterns  # noqa: E402
from flaxbones.weights.convert import map_module_path  # noqa: E402

PRESETS = list(rcnn_ref.PRESETS)
MASKS = [n for n in PRESETS if n.startswith("mask")]
REL = 1e-4  # max abs diff <= REL x max abs value


MEASURED: dict[str, dict[str, float]] = {}  # preset -> what -> max rel diff (shown with -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, diffs in MEASURED.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), end="")


def _close(case, a, b, what, key=None):
    rel = torch_ref.assert_close(a, b, REL, f"{case.name} {what}")
    key = key or what
    table = MEASURED.setdefault(case.name, {})
    table[key] = max(table.get(key, 0.0), float(rel))


@lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(lambda v, x, s: model.apply(v, x, s, mutable=["intermediates"]))


@pytest.fixture(scope="module", params=PRESETS)
def case(request, tmp_path_factory):
    name = request.param
    classes = 2 if name.startswith("keypoint") else 5
    ref = rcnn_ref.build(name, classes)
    want = rcnn_ref.run(ref, rcnn_ref.images())
    path = torch_ref.save_state(ref, tmp_path_factory.mktemp("rcnn") / f"{name}.pth")
    kwargs = dict(num_classes=classes, **rcnn_ref.settings(name)[1])
    variables = fb.load_pretrained(name, path, **kwargs)
    model = fb.create_model(name, **kwargs)
    out, state = _apply(model)(variables, jnp.asarray(want["images"]),
                               jnp.asarray(want["image_sizes"]))
    inter = state["intermediates"]
    got = dict(features=list(inter["features"][0].values()),
               objectness=inter["rpn"]["objectness"][0], deltas=inter["rpn"]["deltas"][0],
               proposals=np.asarray(inter["proposals"][0]),
               proposal_valid=np.asarray(inter["proposal_valid"][0]),
               proposal_scores=np.asarray(inter["proposal_scores"][0]),
               class_logits=np.asarray(inter["roi_heads"]["class_logits"][0]),
               box_regression=np.asarray(inter["roi_heads"]["box_regression"][0]))
    return SimpleNamespace(name=name, want=want, got=got, out=jax.device_get(out),
                           limit=model.roi_heads.detections_per_img)


def test_features_and_rpn_outputs(case):
    for what in ("features", "objectness", "deltas"):
        assert len(case.got[what]) == len(case.want[what])
        for level, (a, b) in enumerate(zip(case.got[what], case.want[what])):
            _close(case, a, b, f"{what} level {level}", what)


TIE = 1e-5  # scores this close may rank either way (fp32 noise in two implementations)


def tie_swaps_only(lost, extra, floor):
    """True when every unpaired score has a near-equal unpaired one on the other side (two
    near-tied candidates ranked or suppressed the other way) or sits at the cut `floor`."""
    near = lambda s, others: any(abs(s - o) <= TIE for o in others) or abs(s - floor) <= TIE
    return all(near(s, extra) for s in lost) and all(near(s, lost) for s in extra)


def pair_ranked(want_boxes, want_scores, got_boxes, got_scores):
    """One-to-one pairs (torchvision index, flaxbones index) of two score-ranked box lists:
    same box (max abs diff <= REL x the largest coordinate) and |score diff| <= TIE, so a
    different order among near-tied scores is no failure; anything else unpaired is."""
    tol = REL * max(np.abs(want_boxes).max(initial=0), 1.0)
    pairs, used = [], np.zeros(len(got_scores), bool)
    for r, (box, score) in enumerate(zip(want_boxes, want_scores)):
        cand = np.nonzero(~used & (np.abs(got_scores - score) <= TIE))[0]
        diff = np.abs(got_boxes[cand] - box).max(1) if len(cand) else np.zeros(0)
        if len(cand) and diff.min() <= tol:
            pairs.append((r, cand[diff.argmin()]))
            used[cand[diff.argmin()]] = True
    lost = np.delete(want_scores, [p[0] for p in pairs])
    floor = min(want_scores.min(initial=1), got_scores.min(initial=1))
    assert tie_swaps_only(lost, got_scores[~used], floor), \
        f"unpaired scores: {lost} (torchvision), {got_scores[~used]} (flaxbones)"
    return np.asarray(pairs, int).reshape(-1, 2)


def proposal_pairs(case, i):
    valid = case.got["proposal_valid"][i]
    assert valid[:valid.sum()].all(), "valid proposals come first"
    return pair_ranked(case.want["proposals"][i], case.want["proposal_scores"][i],
                       case.got["proposals"][i][valid], case.got["proposal_scores"][i][valid])


def test_proposals(case):
    for i, want in enumerate(case.want["proposals"]):
        pairs = proposal_pairs(case, i)
        got = case.got["proposals"][i][case.got["proposal_valid"][i]]
        _close(case, got[pairs[:, 1]], want[pairs[:, 0]], f"proposals {i}", "proposals")
        table = MEASURED[case.name]
        table["proposals unpaired"] = table.get("proposals unpaired", 0) + len(want) - len(pairs)


def test_box_head_outputs(case):
    offset = np.cumsum([0] + [len(p) for p in case.want["proposals"]])
    for what in ("class_logits", "box_regression"):
        for i in range(len(case.want["proposals"])):
            pairs = proposal_pairs(case, i)
            got = case.got[what][i][case.got["proposal_valid"][i]][pairs[:, 1]]
            want = case.want[what][offset[i]:offset[i + 1]][pairs[:, 0]]
            _close(case, got, want, f"{what} {i}", what)


def _iou(a, b):
    return np.asarray(box_iou(jnp.asarray(a), jnp.asarray(b)))


def match_detections(want: dict, got: dict, i: int, score_thresh=0.05, limit=100):
    """One-to-one pairs (torchvision index, flaxbones index): same label, IoU >= 0.99,
    |score difference| <= 1e-4. Unpaired detections are allowed only within 1e-5 of the
    score threshold, of the last score kept at the detections-per-image limit, or of an
    unpaired one on the other side (an NMS tie decided the other way)."""
    valid = got["valid"][i]
    assert valid[:valid.sum()].all(), "valid detections come first"
    g = {k: got[k][i][valid] for k in ("boxes", "scores", "labels")}
    assert np.all(np.diff(g["scores"]) <= 0), "descending scores"
    iou = _iou(want["boxes"], g["boxes"])
    ok = ((want["labels"][:, None] == g["labels"][None]) & (iou >= 0.99)
          & (np.abs(want["scores"][:, None] - g["scores"][None]) <= 1e-4))
    pairs, used = [], set()
    for r in range(len(want["scores"])):
        options = [c for c in np.nonzero(ok[r])[0] if c not in used]
        if options:
            c = max(options, key=lambda c: iou[r, c])
            pairs.append((r, c))
            used.add(c)
    lost = [s for r, s in enumerate(want["scores"]) if r not in {p[0] for p in pairs}]
    extra = [s for c, s in enumerate(g["scores"]) if c not in used]
    full = max(len(g["scores"]), len(want["scores"])) == limit
    floor = min(want["scores"].min(initial=1), g["scores"].min(initial=1)) if full else -1
    at_threshold = lambda s: abs(s - score_thresh) <= TIE
    assert tie_swaps_only([s for s in lost if not at_threshold(s)],
                          [s for s in extra if not at_threshold(s)], floor), \
        f"image {i}: unmatched {lost} (torchvision), {extra} (flaxbones)"
    return pairs


def test_detections(case):
    total, iou, score = 0, 1.0, 0.0
    for i, want in enumerate(case.want["detections"]):
        pairs = match_detections(want, case.out, i, limit=case.limit)
        total += len(pairs)
        r, c = (np.asarray(p) for p in zip(*pairs))
        valid = case.out["valid"][i]
        iou = min(iou, _iou(want["boxes"][r], case.out["boxes"][i][valid][c]).diagonal().min())
        score = max(score, np.abs(want["scores"][r] - case.out["scores"][i][valid][c]).max())
    MEASURED.setdefault(case.name, {}).update(
        {"detections": total, "min IoU": iou, "max |score diff|": score})
    assert total > 10, f"{case.name}: too few detections ({total}) for a meaningful test"


def test_masks(case):
    if not case.name.startswith("mask"):
        pytest.skip("no mask branch")
    for i, want in enumerate(case.want["detections"]):
        pairs = match_detections(want, case.out, i, limit=case.limit)
        r, c = (np.asarray(p) for p in zip(*pairs))
        a, b = case.out["masks"][i][case.out["valid"][i]][c], want["masks"][r, 0]
        _close(case, a, b, f"masks {i}", "masks")
        agree = np.mean((a > 0.5) == (b > 0.5))
        assert agree >= 0.99
        MEASURED[case.name]["mask pixels disagreeing"] = max(
            MEASURED[case.name].get("mask pixels disagreeing", 0.0), 1 - agree)


def test_keypoints(case):
    if not case.name.startswith("keypoint"):
        pytest.skip("no keypoint branch")
    for i, want in enumerate(case.want["detections"]):
        pairs = match_detections(want, case.out, i, limit=case.limit)
        r, c = (np.asarray(p) for p in zip(*pairs))
        valid = case.out["valid"][i]
        a, b = case.out["keypoints"][i][valid][c], want["keypoints"][r]
        assert np.abs(a - b).max() <= 0.5, f"keypoints {i}: {np.abs(a - b).max()} px"
        table = MEASURED.setdefault(case.name, {})
        table["keypoints px"] = max(table.get("keypoints px", 0.0), float(np.abs(a - b).max()))
        _close(case, case.out["keypoint_scores"][i][valid][c], want["keypoints_scores"][r],
               f"keypoint scores {i}", "keypoint scores")


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_is_torchvisions(name):
    """At the default classes, flaxbones' params minus the FrozenBN scale/bias (buffers in
    torchvision) equal torchvision's published num_params."""
    model = fb.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    frozen = [re.compile(p) for p in frozen_bn_patterns(model.backbone)]
    count = sum(int(np.prod(v.shape)) for k, v in flat.items()
                if not any(p.match(k) for p in frozen))
    assert count == rcnn_ref.PRESETS[name][0].DEFAULT.meta["num_params"]


# --- trainable layers, wrong files, bad inputs -------------------------------------------

@lru_cache(maxsize=None)
def _param_shapes(name):
    model = fb.create_model(name)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]


def _torchvision_backbone(name, k):
    """torchvision's own extractor at trainable_layers=k, FrozenBatchNorm as with weights."""
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.detection import backbone_utils
    from torchvision.ops.misc import FrozenBatchNorm2d
    if "mobilenet" in name:
        return backbone_utils._mobilenet_extractor(
            mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, k)
    return backbone_utils._resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), k)


@pytest.mark.parametrize("name,k", [("fasterrcnn_resnet50_fpn", k) for k in (0, 3, 5)]
                         + [("fasterrcnn_mobilenet_v3_large_fpn", k) for k in (0, 3, 6)])
def test_trainable_layers_match_torchvision_requires_grad(name, k):
    """The mask from frozen_param_patterns() equals torchvision's requires_grad, leaf by leaf
    (FrozenBatchNorm's weight/bias are buffers there: never trained)."""
    ref = _torchvision_backbone(name, k)
    want = {f"backbone.{key}": p.requires_grad for key, p in ref.named_parameters()}
    want.update({f"backbone.{key}": False for key, _ in ref.named_buffers()
                 if key.endswith((".weight", ".bias"))})
    model = fb.create_model(name, trainable_layers=k)
    mask = traverse_util.flatten_dict(
        trainable_mask(_param_shapes(name), model.frozen_param_patterns()), sep="/")
    rules = fb.get_spec(name).weights.rules
    checked = set()
    for key, trainable in want.items():
        module, _, leaf = key.rpartition(".")
        path = map_module_path(module, rules)
        leaves = [f"{path}/{n}" for n in (("kernel", "scale") if leaf == "weight" else ("bias",))]
        (flax_key,) = [p for p in leaves if p in mask]
        assert mask[flax_key] == trainable, f"k={k}: {key} -> {flax_key}"
        checked.add(flax_key)
    assert checked == {p for p in mask if p.startswith(("backbone/", "neck/"))}
    assert all(mask[p] for p in mask if not p.startswith("backbone/"))


def test_trainable_layers_out_of_range_or_undefined():
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        fb.create_model("fasterrcnn_resnet50_fpn", trainable_layers=6)
    with pytest.raises(ValueError, match="no such stages"):
        fb.create_model("fasterrcnn", backbone="xception65", trainable_layers=3)


@pytest.mark.parametrize("file_of,loaded_as,named", [
    ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "roi_heads.mask_head"),
    ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn", "params/neck/lateral_0/bias")])
def test_another_detectors_weights_are_refused(tmp_path, file_of, loaded_as, named):
    from torchvision.models import detection as tvd
    ref = getattr(tvd, file_of)(weights=None, weights_backbone=None, num_classes=5)
    path = torch_ref.save_state(ref, tmp_path / f"{file_of}.pth")
    with pytest.raises(ValueError, match="nothing was loaded") as err:
        fb.load_pretrained(loaded_as, path, num_classes=5)
    assert "unexpected in the file" in str(err.value) and named in str(err.value)


def test_skip_head_keeps_all_but_the_class_layers(tmp_path):
    """Fine-tuning COCO weights on other classes: only the class-specific layers re-init."""
    from torchvision.models import detection as tvd
    ref = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)  # 91 classes
    path = torch_ref.save_state(ref, tmp_path / "coco.pth")
    _, report = fb.load_pretrained("maskrcnn_resnet50_fpn", path, num_classes=3, skip_head=True,
                                   return_report=True)
    assert sorted(report.skipped) == [f"params/roi_heads/{m}/{leaf}" for m in (
        "box_predictor/bbox_pred", "box_predictor/cls_score", "mask_predictor/mask_fcn_logits")
        for leaf in ("bias", "kernel")]


def _legacy(key: str) -> str:
    """torchvision's key before its module version 2 (what its 2019 COCO files hold)."""
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    key = re.sub(r"\.fpn\.(inner|layer)_blocks\.(\d)\.0\.", r".fpn.\1_blocks.\2.", key)
    return re.sub(r"mask_head\.(\d)\.0\.", lambda m: f"mask_head.mask_fcn{int(m[1]) + 1}.", key)


def test_legacy_key_names_load_the_same(tmp_path):
    from torchvision.models import detection as tvd
    ref = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    legacy = {_legacy(k): v for k, v in state.items()}
    assert sum(a != b for a, b in zip(state, legacy)) == 2 + 16 + 8  # rpn, fpn, mask convs
    torch.save(state, tmp_path / "new.pth")
    torch.save(legacy, tmp_path / "old.pth")
    load = lambda f: traverse_util.flatten_dict(
        fb.load_pretrained("maskrcnn_resnet50_fpn", tmp_path / f, num_classes=3))
    new, old = load("new.pth"), load("old.pth")
    assert new.keys() == old.keys() and all(np.array_equal(new[k], old[k]) for k in new)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        fb.create_model("fasterrcnn", backbone="resnet18", num_classes=0)
    with pytest.raises(ValueError, match="C6"):
        fb.create_model("maskrcnn", backbone="resnet18", fpn_levels=("C3", "C4", "C6"))
    model = fb.create_model("fasterrcnn", backbone="resnet18", num_classes=3)
    rng, x = jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        jax.eval_shape(model.init, rng, x, jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="do not fit"):
        model.init(rng, x, jnp.asarray([[64, 64], [65, 10]], jnp.int32))
    with pytest.raises(ValueError, match="train=True needs targets"):
        jax.eval_shape(lambda: model.init(rng, x, train=True))


# --- any backbone x R-CNN ----------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "xception65", "vgg16"])
@pytest.mark.parametrize("detector", ["fasterrcnn", "maskrcnn"])
def test_generic_builders_on_any_backbone(detector, backbone):
    """Build, init and apply under jit at 64 px: fixed shapes, valid first, finite. Mask
    R-CNN runs Faster R-CNN's whole path too: it is compiled and run on ResNet-18 and
    MobileNetV3; every other pair is traced (shapes), to keep the suite's compile time down."""
    model = fb.create_model(detector, backbone=backbone, num_classes=3, detections_per_img=10,
                            rpn_post_nms_top_n=64)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3))
    sizes = jnp.asarray([[64, 64], [50, 61]], jnp.int32)
    if detector == "fasterrcnn" or backbone not in ("resnet18", "mobilenet_v3_large"):
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, sizes)
        out = jax.eval_shape(model.apply, shapes, x, sizes)
        assert out["boxes"].shape == (2, 10, 4) and out["labels"].dtype == jnp.int32
        if detector == "maskrcnn":
            assert out["masks"].shape == (2, 10, 28, 28)
        return
    key = jax.random.key(0, impl="unsafe_rbg")  # a cheaper init program to compile
    variables = jax.jit(model.init)(key, x, sizes)
    out = jax.jit(model.apply)(variables, x, sizes)  # two programs compile faster than one
    assert "params" in variables
    assert out["boxes"].shape == (2, 10, 4) and out["labels"].dtype == jnp.int32
    if detector == "maskrcnn":
        assert out["masks"].shape == (2, 10, 28, 28)
    for i, (h, w) in enumerate(np.asarray(sizes)):
        valid = np.asarray(out["valid"][i])
        assert valid.any() and valid[:valid.sum()].all()
        boxes = np.asarray(out["boxes"][i])
        assert np.isfinite(boxes).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_bfloat16_compute():
    """bf16 compute (params and RoIAlign sampling in fp32) runs and detects."""
    model = fb.create_model("maskrcnn", backbone="resnet18", num_classes=3, dtype=jnp.bfloat16,
                            detections_per_img=5, rpn_post_nms_top_n=32)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)
    out = jax.jit(model.apply)(variables, x, jnp.asarray([[60, 50]], jnp.int32))
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    assert np.asarray(out["valid"]).any() and np.isfinite(np.asarray(out["masks"])).all()


@pytest.mark.parametrize("name", PRESETS)
def test_transform_defaults_match_torchvision(name):
    """What api.predict reads off the weight source is torchvision's eval transform."""
    from torchvision.models import detection as tvd
    tv = getattr(tvd, name)(weights=None, weights_backbone=None).transform
    source = fb.get_spec(name).weights
    np.testing.assert_allclose(source.mean, tv.image_mean)
    np.testing.assert_allclose(source.std, tv.image_std)
    transform = dict(source.transform)
    assert transform == {"min_size": tv.min_size[-1], "max_size": tv.max_size,
                         "size_divisible": tv.size_divisible}  # eval: the last min_size
    assert source.input_size == tv.min_size[-1]
    assert source.num_classes == (2 if name.startswith("keypoint") else 91)
