"""Detection box ops, anchors and NMS against torchvision's own implementations."""
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
