"""Detection box ops, anchors and NMS against torchvision's own implementations."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from flaxbones.detection import anchors as A
from flaxbones.detection import boxes as B
from flaxbones.detection import nms as N


def _random_boxes(rng, n, lo=-20.0, hi=120.0, min_wh=0.0, max_wh=60.0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _odd_boxes(rng, n):
    """Random boxes plus the awkward ones: zero-area, identical, out of image, inverted."""
    b = _random_boxes(rng, n)
    b[0] = [5, 5, 5, 5]            # a point
    b[1] = [10, 10, 10, 40]        # zero width
    b[2] = b[3]                    # duplicate
    b[4] = [-50, -50, -10, -10]    # fully outside
    b[5] = [30, 30, 20, 20]        # inverted
    return b


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _close(a, b, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("n,m", [(7, 9), (0, 5), (4, 0), (0, 0)])
def test_box_iou_and_giou_match_torchvision(n, m):
    rng = np.random.default_rng(n * 10 + m)
    b1, b2 = _odd_boxes(rng, max(n, 6))[:n], _odd_boxes(rng, max(m, 6))[:m]
    iou = jax.jit(B.box_iou)(b1, b2)
    assert iou.shape == (n, m)
    np.testing.assert_array_equal(np.asarray(iou), torchvision.ops.box_iou(_t(b1), _t(b2)).numpy())
    _close(jax.jit(B.generalized_box_iou)(b1, b2), torchvision.ops.generalized_box_iou(_t(b1), _t(b2)))
    np.testing.assert_array_equal(np.asarray(B.box_area(b1)), torchvision.ops.box_area(_t(b1)).numpy())


def test_box_iou_bit_exact_at_scale():
    """XLA contracts a*b+c into FMAs; boxes.no_fma keeps every IoU bit-identical to torch's."""
    rng = np.random.default_rng(12)
    b1, b2 = _random_boxes(rng, 400, 0, 500, 1, 300), _random_boxes(rng, 300, 0, 500, 1, 300)
    np.testing.assert_array_equal(np.asarray(jax.jit(B.box_iou)(b1, b2)),
                                  torchvision.ops.box_iou(_t(b1), _t(b2)).numpy())
    np.testing.assert_array_equal(np.asarray(jax.jit(B.generalized_box_iou)(b1, b2)),
                                  torchvision.ops.generalized_box_iou(_t(b1), _t(b2)).numpy())


def test_box_iou_batched_leading_dims():
    rng = np.random.default_rng(1)
    b1 = np.stack([_random_boxes(rng, 5) for _ in range(3)])
    b2 = np.stack([_random_boxes(rng, 4) for _ in range(3)])
    got = np.asarray(B.box_iou(b1, b2))
    assert got.shape == (3, 5, 4)
    for i in range(3):
        np.testing.assert_array_equal(got[i], torchvision.ops.box_iou(_t(b1[i]), _t(b2[i])).numpy())


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
    rng = np.random.default_rng(2)
    ref = _random_boxes(rng, 50, min_wh=1.0)
    gt = _random_boxes(rng, 50, min_wh=1.0)
    codes = (rng.normal(size=(50, 4)) * 2).astype(np.float32)
    codes[:3, 2:] = [[20.0, 30.0], [100.0, -5.0], [-40.0, 8.0]]  # exercise the clamp
    tv = tv_utils.BoxCoder(weights)
    coder = B.BoxCoder(weights)
    _close(jax.jit(coder.decode)(codes, ref), tv.decode_single(_t(codes), _t(ref)), rtol=2e-6, atol=1e-4)
    _close(jax.jit(coder.encode)(gt, ref), tv.encode_single(_t(gt), _t(ref)), rtol=2e-6, atol=1e-5)
    # without exp (dw = dh = 0) the float math is bit-identical (true division by the weights)
    flat = codes.copy()
    flat[:, 2:] = 0
    np.testing.assert_array_equal(np.asarray(jax.jit(coder.decode)(flat, ref)),
                                  tv.decode_single(_t(flat), _t(ref)).numpy())
    # RoI-head style: (R, C, 4) codes against (R, 1, 4) proposals == decode of (R, 4C) codes
    codes3 = codes.reshape(10, 5, 4)
    got = coder.decode(codes3, ref[:10, None, :])
    want = tv.decode(_t(codes3.reshape(10, 20)), [_t(ref[:10])])
    _close(got, want, rtol=2e-6, atol=1e-4)
    assert coder.decode(codes[:0], ref[:0]).shape == (0, 4)
    assert B.BoxCoder().bbox_xform_clip == math.log(1000.0 / 16)


def test_clip_boxes_per_image():
    rng = np.random.default_rng(3)
    boxes = np.stack([_odd_boxes(rng, 20) for _ in range(2)])
    sizes = np.array([[37, 91], [64, 45]], np.int32)
    got = np.asarray(jax.jit(B.clip_boxes)(boxes, sizes))
    for i, (h, w) in enumerate(sizes):
        want = torchvision.ops.clip_boxes_to_image(_t(boxes[i]), (int(h), int(w))).numpy()
        np.testing.assert_array_equal(got[i], want)
    # extra middle dims (R, C, 4) per image
    got = np.asarray(B.clip_boxes(boxes.reshape(2, 5, 4, 4), sizes)).reshape(2, 20, 4)
    np.testing.assert_array_equal(got[1], torchvision.ops.clip_boxes_to_image(_t(boxes[1]), (64, 45)).numpy())
    assert B.clip_boxes(np.zeros((2, 0, 4), np.float32), sizes).shape == (2, 0, 4)


@pytest.mark.parametrize("min_size", [1e-3, 1e-2, 1.0, 7.5])
def test_small_boxes_mask_matches_remove_small_boxes(min_size):
    rng = np.random.default_rng(4)
    b = _odd_boxes(rng, 40)
    b[6] = [0, 0, np.float32(min_size), np.float32(min_size)]        # exactly at the threshold
    b[7] = [0, 0, np.nextafter(np.float32(min_size), 0), 5.0]        # just below
    b[8] = [100.0, 100.0, 100.0 + np.float32(min_size), 100.5]       # rounded width
    got = np.nonzero(np.asarray(B.small_boxes_mask(b, min_size)))[0]
    np.testing.assert_array_equal(got, torchvision.ops.remove_small_boxes(_t(b), min_size).numpy())
    assert B.small_boxes_mask(b[:0], min_size).shape == (0,)


def _feature_maps(shapes):
    return [torch.zeros(1, 1, h, w) for h, w in shapes]


CASES = [((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]),
         ((128, 96), [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2)]),
         ((61, 77), [(61, 77), (31, 39), (1, 1), (3, 2), (5, 7)])]


@pytest.mark.parametrize("image_shape,shapes", CASES)
@pytest.mark.parametrize("kind", ["rcnn", "retinanet", "fcos"])
def test_anchor_generator_matches_torchvision(kind, image_shape, shapes):
    if kind == "rcnn":
        ours = A.AnchorGenerator()
        tv = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    elif kind == "retinanet":
        ours = A.retinanet_anchor_generator()
        sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
        tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    else:
        ours = A.fcos_anchor_generator()
        tv = TVAnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    assert ours.num_anchors_per_location() == tuple(tv.num_anchors_per_location())
    images = ImageList(torch.zeros(2, 3, *image_shape), [(image_shape[0] - 3, image_shape[1]), image_shape])
    want = tv(images, _feature_maps(shapes))[0].numpy()
    got = ours(image_shape, shapes)
    assert [g.shape[0] for g in got] == [h * w * ours.num_anchors_per_location()[i]
                                          for i, (h, w) in enumerate(shapes)]
    assert all(g.dtype == np.float32 for g in got)
    np.testing.assert_array_equal(np.concatenate(got), want)


def test_anchor_generator_single_level_many_sizes_and_errors():
    ours = A.AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    tv = TVAnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 45, 70), [(45, 70)])
    np.testing.assert_array_equal(ours((45, 70), [(6, 9)])[0], tv(images, _feature_maps([(6, 9)]))[0].numpy())
    with pytest.raises(ValueError, match="feature maps"):
        ours((45, 70), [(6, 9), (3, 4)])


@pytest.mark.parametrize("kind", ["ssd300", "ssdlite320"])
@pytest.mark.parametrize("image_shape", [(300, 300), (320, 320), (157, 211)])
def test_default_box_generator_matches_torchvision(kind, image_shape):
    if kind == "ssd300":
        ours = A.ssd300_box_generator()
        tv = TVDefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                   scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                   steps=[8, 16, 32, 64, 100, 300])
        shapes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    else:
        ours = A.ssdlite320_box_generator()
        tv = TVDefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
        shapes = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    if image_shape[0] != image_shape[1]:
        shapes = [(max(1, h // 2 + 1), w) for h, w in shapes]
    assert ours.num_anchors_per_location() == tuple(tv.num_anchors_per_location())
    assert ours.scales == tuple(tv.scales)
    images = ImageList(torch.zeros(2, 3, *image_shape), [image_shape] * 2)
    want = tv(images, _feature_maps(shapes))[0].numpy()
    got = ours(image_shape, shapes)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------- NMS


@functools.partial(jax.jit, static_argnums=(4,))
def _jit_nms(b, s, idxs, thr, max_output, valid):
    if idxs is None:
        return N.nms(b, s, thr, max_output, valid)
    return N.batched_nms(b, s, idxs, thr, max_output, valid)


def _run(b, s, thr, max_output, valid=None, idxs=None, pad_to=None):
    """Our NMS, padded with invalid entries up to `pad_to` so few shapes compile; the threshold
    is traced, rounded as nms() rounds a Python float."""
    n = len(b)
    valid = np.ones(n, bool) if valid is None else valid
    if pad_to is not None and pad_to > n:
        extra = pad_to - n
        b = np.concatenate([b, np.tile(b[:1] if n else np.zeros((1, 4), np.float32), (extra, 1))])
        s = np.concatenate([s, np.full(extra, 100.0, np.float32)])
        valid = np.concatenate([valid, np.zeros(extra, bool)])
        idxs = None if idxs is None else np.concatenate([idxs, np.zeros(extra, idxs.dtype)])
    return _got(_jit_nms(b, s, idxs, jnp.float32(N._threshold(thr)), max_output, valid))


def _tv_keep(b, s, thr, valid=None, idxs=None):
    """torchvision's kept indices (into the full input) on the valid subset."""
    sub = np.arange(len(b)) if valid is None else np.nonzero(valid)[0]
    tb, ts = _t(b[sub]), _t(s[sub])
    if idxs is None:
        k = torchvision.ops.nms(tb, ts, thr)
    else:
        k = torchvision.ops.batched_nms(tb, ts, _t(idxs[sub]), thr)
    return sub[k.numpy()]


def _got(out):
    keep, ok = (np.asarray(x) for x in out)
    assert ok.dtype == bool and keep.dtype == np.int32
    assert (np.diff(ok.astype(int)) <= 0).all()  # valid slots first
    return keep[ok]


def _scenario(name, n, rng):
    if name == "random":
        return _random_boxes(rng, n, 0, 300, 1, 60), rng.random(n).astype(np.float32)
    if name == "heavy":
        return _random_boxes(rng, n, 0, 20, 5, 30), rng.random(n).astype(np.float32)
    if name == "ties":  # few distinct scores, many duplicate boxes
        b = _random_boxes(rng, n, 0, 60, 5, 30)
        b[n // 2:] = b[: n - n // 2]
        return b, rng.integers(0, 4, n).astype(np.float32) * 0.25
    if name == "degenerate":
        b = _odd_boxes(rng, n)
        b[6::7, 2] = b[6::7, 0]  # zero width every 7th
        return b, rng.random(n).astype(np.float32)
    if name == "all_suppressed":
        return np.tile(_random_boxes(rng, 1, 0, 50, 5, 30), (n, 1)), rng.random(n).astype(np.float32)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["random", "heavy", "ties", "degenerate", "all_suppressed"])
@pytest.mark.parametrize("n", [1, 9, 300])
def test_nms_matches_torchvision(name, n):
    rng = np.random.default_rng(n)
    b, s = _scenario(name, max(n, 6), rng)
    b, s = b[:n], s[:n]
    for thr in (0.3, 0.5, 0.7):
        want = _tv_keep(b, s, thr)
        for max_output in (4, 400):  # fewer / more slots than torchvision keeps
            got = _run(b, s, thr, max_output, pad_to=16 if n < 16 else 320)
            np.testing.assert_array_equal(got, want[:max_output])


def test_nms_unpadded_static_threshold_and_edge_sizes():
    """The public signature as models call it: Python float threshold, valid=None, exact n."""
    rng = np.random.default_rng(11)
    b, s = _scenario("heavy", 50, rng)
    for max_output in (3, 50, 80):
        keep, ok = jax.jit(N.nms, static_argnums=(2, 3))(b, s, 0.6, max_output)
        assert keep.shape == ok.shape == (max_output,)
        np.testing.assert_array_equal(_got((keep, ok)), _tv_keep(b, s, 0.6)[:max_output])
        assert (np.asarray(keep)[~np.asarray(ok)] == 0).all()
    keep, ok = N.nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 7)
    assert keep.shape == (7,) and not np.asarray(ok).any()
    keep, ok = N.batched_nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                             np.zeros((0,), np.int32), 0.5, 3)
    assert keep.shape == (3,) and not np.asarray(ok).any()
    keep, ok = N.nms(b, s, 0.5, 0)
    assert keep.shape == (0,) and ok.shape == (0,)


def test_nms_invalid_entries_are_neither_kept_nor_suppress():
    rng = np.random.default_rng(5)
    b, s = _scenario("heavy", 300, rng)
    valid = rng.random(300) < 0.6
    s[~valid] += 10.0  # invalid boxes have the best scores: they must not suppress anything
    for thr in (0.4, 0.6):
        np.testing.assert_array_equal(_run(b, s, thr, 400, valid, pad_to=320), _tv_keep(b, s, thr, valid))
    assert len(_run(b, s, 0.5, 400, np.zeros(300, bool), pad_to=320)) == 0


def test_nms_threshold_compared_as_double():
    """An IoU of exactly float32(0.6) = 0.60000002 is > 0.6 for torchvision (double compare)."""
    a = np.array([[0, 0, 10, 10], [0, 0, 6, 10], [0, 0, 7.5, 8], [20, 20, 30, 30]], np.float32)
    s = np.array([1.0, 0.9, 0.8, 0.7], np.float32)
    for thr in (0.6, 0.6000000238418579, 0.59999999, 0.45):
        np.testing.assert_array_equal(_run(a, s, thr, 4, pad_to=16), _tv_keep(a, s, thr))
    assert N._threshold(0.6) < np.float32(0.6) and N._threshold(0.5) == np.float32(0.5)


def test_nms_signed_zero_and_negative_scores_tie_like_torch():
    rng = np.random.default_rng(6)
    b = _random_boxes(rng, 300, 0, 100, 5, 40)
    s = np.where(rng.random(300) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    s[::5] = -1.5
    np.testing.assert_array_equal(_run(b, s, 0.5, 400, pad_to=320), _tv_keep(b, s, 0.5))


@pytest.mark.parametrize("n_valid", [40, 1000, 1001, 1700])
def test_batched_nms_matches_torchvision_both_paths(n_valid):
    """<= 1000 valid boxes: torchvision offsets boxes by class (its rounding mirrored); above,
    it loops over classes. Ties across classes above 1000 are ordered by torch's unstable sort,
    so distinct scores here (the kept set with ties is checked separately)."""
    rng = np.random.default_rng(n_valid)
    n = n_valid + 37
    b = _random_boxes(rng, n, 0, 400, 2, 80) * 3
    s = rng.permutation(n).astype(np.float32) / n
    idxs = rng.integers(0, 90, n).astype(np.int32)
    valid = np.zeros(n, bool)
    valid[rng.permutation(n)[:n_valid]] = True
    for thr in (0.5, 0.7):
        want = _tv_keep(b, s, thr, valid, idxs)
        for max_output in (100, 2000):
            got = _run(b, s, thr, max_output, valid, idxs, pad_to=2048)
            np.testing.assert_array_equal(got, want[:max_output])


def test_batched_nms_ties_and_few_classes():
    rng = np.random.default_rng(7)
    for n in (300, 1500):
        b, s = _scenario("ties", n, rng)
        idxs = rng.integers(0, 3, n).astype(np.int32)
        want = _tv_keep(b, s, 0.5, None, idxs)
        got = _run(b, s, 0.5, 2000, None, idxs, pad_to=2048)
        if n * 4 <= 4000:
            np.testing.assert_array_equal(got, want)
        else:  # torchvision's final sort is unstable: same set, same score sequence
            np.testing.assert_array_equal(np.sort(got), np.sort(want))
            np.testing.assert_array_equal(s[got], s[want])


def test_nms_vmaps_over_a_batch():
    rng = np.random.default_rng(8)
    bs, ss, vs, ids = zip(*[(*_scenario(k, 150, rng), rng.random(150) < 0.8, rng.integers(0, 5, 150))
                            for k in ("random", "heavy", "ties")])
    b, s, v, i = (np.stack(x) for x in (bs, ss, vs, ids))
    keep, ok = jax.jit(jax.vmap(lambda b, s, i, v: N.batched_nms(b, s, i, 0.5, 60, v)))(b, s, i, v)
    keep1, ok1 = jax.jit(jax.vmap(lambda b, s, v: N.nms(b, s, 0.5, 60, v)))(b, s, v)
    for j in range(3):
        np.testing.assert_array_equal(_got((keep[j], ok[j])), _tv_keep(b[j], s[j], 0.5, v[j], i[j])[:60])
        np.testing.assert_array_equal(_got((keep1[j], ok1[j])), _tv_keep(b[j], s[j], 0.5, v[j])[:60])


@pytest.mark.parametrize("name", ["all_suppressed", "ties", "heavy", "random"])
def test_nms_large_input_prefix_and_full_sort_paths(name):
    """> 1024 candidates: a top_k prefix first, a full sort only when the prefix does not fill the
    output (all_suppressed/ties need it; random does not). Includes valid boxes scored -inf."""
    rng = np.random.default_rng(9)
    b, s = _scenario(name, 3000, rng)
    s[rng.random(3000) < 0.1] = -np.inf
    valid = rng.random(3000) < 0.9
    for thr in (0.5, 0.7):
        want = _tv_keep(b, s, thr, valid)
        np.testing.assert_array_equal(_run(b, s, thr, 100, valid, pad_to=3072), want[:100])
    idxs = rng.integers(0, 4, 3000).astype(np.int32)
    want = _tv_keep(b, s, 0.5, valid, idxs)
    got = _run(b, s, 0.5, 100, valid, idxs, pad_to=3072)
    if name == "ties":
        np.testing.assert_array_equal(s[got], s[want[:100]])
    else:
        np.testing.assert_array_equal(got, want[:100])


def test_nms_vmap_mixes_prefix_and_full_sort_images():
    rng = np.random.default_rng(10)
    (b1, s1), (b2, s2) = _scenario("random", 2000, rng), _scenario("all_suppressed", 2000, rng)
    b, s = np.stack([b1, b2]), np.stack([s1, s2])
    keep, ok = jax.jit(jax.vmap(lambda b, s: N.nms(b, s, 0.5, 50)))(b, s)
    for j in range(2):
        np.testing.assert_array_equal(_got((keep[j], ok[j])), _tv_keep(b[j], s[j], 0.5)[:50])


def test_nms_thresholds_equal_to_actual_ious():
    """Thresholds set to IoU values that occur (ties exactly at the threshold): any last-bit
    difference in our IoU (e.g. an FMA) would flip a decision here."""
    rng = np.random.default_rng(13)
    b = _random_boxes(rng, 300, 0, 120, 10, 80)
    s = rng.random(300).astype(np.float32)
    iou = torchvision.ops.box_iou(_t(b), _t(b)).numpy()
    order = np.argsort(-s, kind="stable")
    cand = [iou[order[i], order[i + 1 + k]] for i in range(40) for k in range(3)]
    cand = [float(v) for v in cand if 0.2 < v < 0.9][:12]
    assert len(cand) >= 6
    for thr in cand:
        np.testing.assert_array_equal(_run(b, s, thr, 400, pad_to=320), _tv_keep(b, s, thr))
