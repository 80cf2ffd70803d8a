"""The host-side detection transform and mask pasting against torchvision's own:
bilinear resize, GeneralizedRCNNTransform (resize, normalise, pad; SSD's fixed size),
transform.postprocess and paste_masks_in_image, plus the padding buckets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

from flaxbones.detection.masks import paste_masks_in_image, resize_bilinear  # noqa: E402
from flaxbones.detection.transform import (IMAGENET_MEAN, IMAGENET_STD, padded_size,  # noqa: E402
                                           postprocess, preprocess, resize_image)


@pytest.mark.parametrize("out", [(77, 51), (13, 9), (64, 65), (1, 1), (300, 410), (28, 28)])
def test_resize_bilinear_matches_interpolate(out):
    x = np.random.default_rng(0).random((2, 31, 29)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(x, *out), ref[0].numpy(), rtol=0, atol=1e-6)


def test_paste_masks_matches_torchvision():
    rng = np.random.default_rng(1)
    k, m, h, w = 40, 28, 77, 103
    masks = (1 / (1 + np.exp(-3 * rng.normal(size=(k, m, m))))).astype(np.float32)
    boxes = rng.uniform(-20, 100, (k, 4)).astype(np.float32)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(0, 60, (k, 2))
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    boxes[:3] = [[-10, -5, 50, 40], [90, 70, 130, 120], [5, 5, 5.2, 5.3]]  # out of frame, tiny
    ref = tv_paste(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (h, w))[:, 0].numpy()
    out = paste_masks_in_image(masks, boxes, (h, w))
    assert out.shape == (k, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert ((out > 0.5) == (ref > 0.5)).mean() >= 0.999
    assert paste_masks_in_image(np.zeros((0, m, m)), np.zeros((0, 4)), (h, w)).shape == (0, h, w)


def _tv_transform(min_size, max_size, **kw):
    return GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                                    **kw).eval()


@pytest.mark.parametrize("shape", [(37, 53), (101, 67), (64, 64), (45, 211)])
def test_resize_image_matches_torchvision(shape):
    img = np.random.default_rng(2).random((*shape, 3)).astype(np.float32)
    ref, _ = _tv_transform(64, 100).resize(torch.from_numpy(img).permute(2, 0, 1))
    out = resize_image(img, 64, 100)
    assert out.shape[:2] == tuple(ref.shape[1:])
    np.testing.assert_allclose(out, ref.permute(1, 2, 0).numpy(), rtol=0, atol=1e-5)


def _two_images(rng):
    return [rng.random((61, 83, 3)).astype(np.float32), rng.random((97, 45, 3)).astype(np.float32)]


@pytest.mark.parametrize("buckets", [None, 8])
def test_preprocess_matches_generalized_rcnn_transform(buckets):
    images = _two_images(np.random.default_rng(3))
    ref, _ = _tv_transform(72, 120)([torch.from_numpy(i).permute(2, 0, 1) for i in images])
    batch, sizes, original = preprocess(images, 72, 120, size_buckets=buckets)
    assert sizes.dtype == np.int32 and sizes.tolist() == [list(s) for s in ref.image_sizes]
    assert original.tolist() == [[61, 83], [97, 45]]
    tv = ref.tensors.permute(0, 2, 3, 1).numpy()
    if buckets is None:
        assert batch.shape == tv.shape
    else:
        assert batch.shape[1] >= tv.shape[1] and batch.shape[2] >= tv.shape[2]
    for i, (h, w) in enumerate(sizes):
        np.testing.assert_allclose(batch[i, :h, :w], tv[i, :h, :w], rtol=0, atol=1e-5)
        assert not batch[i, h:].any() and not batch[i, :, w:].any()
    as_uint8 = [(i * 255).round().astype(np.uint8) for i in images]
    np.testing.assert_allclose(preprocess(as_uint8, 72, 120)[0],
                               preprocess([i / np.float32(255) for i in as_uint8], 72, 120)[0])


def test_preprocess_fixed_size_as_ssd():
    images = _two_images(np.random.default_rng(4))
    mean, std = (0.48, 0.46, 0.41), (0.5, 0.5, 0.5)
    t = GeneralizedRCNNTransform(64, 96, list(mean), list(std), size_divisible=1,
                                 fixed_size=(96, 64)).eval()  # torchvision's (width, height)
    ref, _ = t([torch.from_numpy(i).permute(2, 0, 1) for i in images])
    batch, sizes, _ = preprocess(images, 64, 96, mean, std, size_divisible=1, fixed_size=(96, 64))
    assert batch.shape == (2, 64, 96, 3) and sizes.tolist() == [[64, 96]] * 2
    np.testing.assert_allclose(batch, ref.tensors.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_padding_buckets_are_bounded():
    assert padded_size(800, 800, 1333) == 800 and padded_size(1199, 800, 1333) == 1344
    assert padded_size(1199, 800, 1333, size_buckets=None) == 1216
    shapes = set()
    for h in range(8, 1000, 7):
        for w in range(8, 1400, 11):
            hh, ww = int(h * min(800 / min(h, w), 1333 / max(h, w))), int(
                w * min(800 / min(h, w), 1333 / max(h, w)))
            shapes.add((padded_size(hh, 800, 1333), padded_size(ww, 800, 1333)))
    assert len(shapes) <= 2 * (8 + 1), len(shapes)  # short side 800 or long side 1333


def test_postprocess_matches_torchvision():
    rng = np.random.default_rng(5)
    n, k = 2, 6
    image_sizes, original = np.array([[72, 98], [120, 56]]), np.array([[61, 83], [97, 45]])
    boxes = rng.uniform(0, 50, (n, k, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    outputs = {
        "boxes": boxes, "scores": rng.random((n, k)).astype(np.float32),
        "labels": rng.integers(1, 5, (n, k)).astype(np.int32),
        "valid": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool),
        "masks": rng.random((n, k, 28, 28)).astype(np.float32),
        "keypoints": np.concatenate([rng.uniform(0, 90, (n, k, 17, 2)),
                                     np.ones((n, k, 17, 1))], -1).astype(np.float32),
        "keypoint_scores": rng.normal(size=(n, k, 17)).astype(np.float32)}
    ours = postprocess(outputs, image_sizes, original)
    keep = outputs["valid"]
    result = [{"boxes": torch.from_numpy(boxes[i][keep[i]]),
               "masks": torch.from_numpy(outputs["masks"][i][keep[i]])[:, None],
               "keypoints": torch.from_numpy(outputs["keypoints"][i][keep[i]])} for i in range(n)]
    ref = _tv_transform(72, 120).postprocess(result, [tuple(s) for s in image_sizes],
                                             [tuple(s) for s in original])
    for i in range(n):
        assert set(ours[i]) == set(outputs) - {"valid"}
        assert len(ours[i]["scores"]) == keep[i].sum()
        assert ours[i]["masks"].shape[1:] == tuple(original[i])
        np.testing.assert_array_equal(ours[i]["boxes"], ref[i]["boxes"].numpy())
        np.testing.assert_array_equal(ours[i]["keypoints"], ref[i]["keypoints"].numpy())
        np.testing.assert_allclose(ours[i]["masks"], ref[i]["masks"][:, 0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(ours[i]["labels"], outputs["labels"][i][keep[i]])
