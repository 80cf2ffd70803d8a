"""Mask and keypoint targets and losses against torchvision's roi_heads functions: blob masks at
an odd size, boxes inside, across the border, tiny and image-sized; keypoints on roi edges,
outside and invisible; losses and their gradients with and without positives."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import roi_heads as tv
from torchvision.ops import roi_align as tv_roi_align

from flaxbones.detection import instance_targets as it

H, W, G, P, C, K = 37, 53, 4, 24, 3, 5


def _blobs(rng, g, h, w):
    """Random blob masks (uint8): a few discs per instance."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((g, h, w), np.uint8)
    for m in masks:
        for cy, cx, r in zip(rng.uniform(0, h, 3), rng.uniform(0, w, 3), rng.uniform(3, 12, 3)):
            m[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    return masks


def _boxes(rng, p):
    """Boxes inside the image, across its border, tiny (< 1 px) and image-sized."""
    x0, y0 = rng.uniform(-8, W - 4, p), rng.uniform(-8, H - 4, p)
    bw, bh = rng.uniform(1, W - 10, p), rng.uniform(1, H - 10, p)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], 1)
    boxes[:4] = [[0, 0, W, H], [0.3, 0.2, W - 0.1, H - 0.4], [10.2, 5.5, 10.6, 5.7], [-3, -2, 30, 31]]
    boxes[4] = [W - 5.5, H - 3.25, W + 6.0, H + 20.0]
    return boxes.astype(np.float32)


@pytest.fixture(scope="module")
def instances():
    rng = np.random.default_rng(0)
    masks = np.stack([_blobs(rng, G, H, W) for _ in range(2)])
    boxes = np.stack([_boxes(rng, P) for _ in range(2)])
    matched = rng.integers(0, G, (2, P))
    return masks, boxes, matched


def _torch_project(masks, boxes, matched, size):
    return tv.project_masks_on_boxes(torch.from_numpy(masks), torch.from_numpy(boxes),
                                     torch.from_numpy(matched), size).numpy()


@functools.cache
def _jit_project(size, sampling_ratio=None, method="gather"):
    fn = functools.partial(it.project_masks, size=size, sampling_ratio=sampling_ratio,
                           method=method)
    return jax.jit(jax.vmap(fn))


@pytest.mark.parametrize("size", [7, 14])
def test_project_masks_bit_equal_to_torchvision(instances, size):
    masks, boxes, matched = instances
    got = np.asarray(_jit_project(size)(masks, boxes, matched))
    assert got.shape == (2, P, size, size) and got.dtype == np.float32
    for i in range(2):
        np.testing.assert_array_equal(got[i], _torch_project(masks[i], boxes[i], matched[i], size))
    assert got.max() > 0.5


def test_project_masks_matmul_equal_to_torchvision(instances):
    """The matmul form sums the same samples in another order: equal to float32 rounding."""
    masks, boxes, matched = instances
    got = np.asarray(_jit_project(14, method="matmul")(masks, boxes, matched))
    for i in range(2):
        ref = _torch_project(masks[i], boxes[i], matched[i], 14)
        np.testing.assert_allclose(got[i], ref, rtol=0, atol=1e-6)


def test_project_masks_bool_input_and_fixed_grid(instances):
    masks, boxes, matched = instances
    got = np.asarray(it.project_masks(masks[0].astype(bool), boxes[0], matched[0], 7))
    np.testing.assert_array_equal(got, _torch_project(masks[0], boxes[0], matched[0], 7))
    got = np.asarray(_jit_project(7, 2)(masks, boxes, matched))[0]
    rois = torch.cat([torch.from_numpy(matched[0]).float()[:, None], torch.from_numpy(boxes[0])], 1)
    expected = tv_roi_align(torch.from_numpy(masks[0])[:, None].float(), rois, (7, 7), 1.0, 2)
    np.testing.assert_array_equal(got, expected[:, 0].numpy())
    with pytest.raises(ValueError, match="sampling_ratio"):
        it.project_masks(masks[0], boxes[0], matched[0], 7, sampling_ratio=0)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("num_pos", [(5, 3), (0, 0)])
def test_mask_loss_and_gradient_equal_torchvision(instances, num_pos):
    masks, boxes, matched = instances
    m = 14
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, P, m, m, C)).astype(np.float32)
    gt_labels = rng.integers(1, C, (2, G))
    positive = np.zeros((2, P), bool)
    for i, n in enumerate(num_pos):
        positive[i, rng.choice(P, n, replace=False)] = True
    targets = _jit_project(m)(masks, boxes, matched)
    labels = np.take_along_axis(gt_labels, matched, 1)
    loss, grad = jax.jit(jax.value_and_grad(it.mask_loss))(logits, labels, targets, positive)

    t_logits = torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 1, 4, 2, 3)[positive]))
    t_logits.requires_grad_()
    args = [[torch.from_numpy(a[i][positive[i]]) for i in range(2)] for a in (boxes, matched)]
    t_loss = tv.maskrcnn_loss(t_logits, args[0], [torch.from_numpy(x) for x in masks],
                              [torch.from_numpy(x) for x in gt_labels], args[1])
    t_loss.backward()
    t_loss = t_loss.detach()
    expected_grad = np.zeros_like(logits)
    expected_grad[positive] = t_logits.grad.numpy().transpose(0, 2, 3, 1)
    if sum(num_pos):
        assert _rel(loss, t_loss.numpy()) <= 1e-6
        assert _rel(grad, expected_grad) <= 1e-5
    else:
        assert float(loss) == 0.0 == t_loss.item()
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


def _keypoints(rng, rois, k):
    """Keypoints matched to rois: inside, on the x2 / y2 edges, outside, invisible."""
    lo, hi = np.minimum(rois[:, :2], rois[:, 2:]) - 3, np.maximum(rois[:, :2], rois[:, 2:]) + 3
    kp = np.stack([rng.uniform(lo[:, :1], hi[:, :1], (len(rois), k)),
                   rng.uniform(lo[:, 1:], hi[:, 1:], (len(rois), k)),
                   rng.integers(0, 3, (len(rois), k))], -1).astype(np.float32)
    kp[:, 0, 0], kp[:, 1, 1] = rois[:, 2], rois[:, 3]
    kp[:, 2, :2] = rois[:, 2:]
    kp[:, 3, :2] = rois[:, :2]
    kp[:, :4, 2] = 1
    return kp


@pytest.fixture(scope="module")
def keypoint_case(instances):
    boxes = instances[1].copy()
    boxes[:, 5] = [4.0, 4.0, 4.0, 9.0]  # zero width: scale inf, NaN on its edge
    boxes[:, 6] = [4.0, 9.0, 3.0, 2.0]  # inverted
    rng = np.random.default_rng(2)
    return boxes, np.stack([_keypoints(rng, b, K) for b in boxes])


@pytest.mark.parametrize("size", [7, 56])
def test_keypoints_to_heatmap_equal_to_torchvision(keypoint_case, size):
    boxes, kps = keypoint_case
    heat, valid = jax.jit(jax.vmap(it.keypoints_to_heatmap, (0, 0, None)), static_argnums=2)(
        kps, boxes, size)
    assert heat.dtype == jnp.int32 and valid.dtype == jnp.bool_
    for i in range(2):
        t_heat, t_valid = tv.keypoints_to_heatmap(torch.from_numpy(kps[i]),
                                                  torch.from_numpy(boxes[i]), size)
        np.testing.assert_array_equal(np.asarray(valid[i]), t_valid.numpy().astype(bool))
        np.testing.assert_array_equal(np.asarray(heat[i]), t_heat.numpy())
    assert 0.2 < float(valid.mean()) < 0.9 and bool(valid[:, :, 2].all())


@pytest.mark.parametrize("num_pos", [(6, 2), (0, 0)])
def test_keypoint_loss_and_gradient_equal_torchvision(keypoint_case, num_pos):
    boxes, kps = keypoint_case
    s = 14
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (2, P, s, s, K)).astype(np.float32)
    positive = np.zeros((2, P), bool)
    for i, n in enumerate(num_pos):
        positive[i, rng.choice(P, n, replace=False)] = True
    heat, valid = jax.vmap(it.keypoints_to_heatmap, (0, 0, None))(kps, boxes, s)
    loss, grad = jax.jit(jax.value_and_grad(it.keypoint_loss))(logits, heat, valid, positive)

    t_logits = torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 1, 4, 2, 3)[positive]))
    t_logits.requires_grad_()
    t_loss = tv.keypointrcnn_loss(
        t_logits, [torch.from_numpy(boxes[i][positive[i]]) for i in range(2)],
        [torch.from_numpy(kps[i][positive[i]]) for i in range(2)],
        [torch.arange(int(positive[i].sum())) for i in range(2)])
    t_loss.backward()
    t_loss = t_loss.detach()
    expected_grad = np.zeros_like(logits)
    expected_grad[positive] = t_logits.grad.numpy().transpose(0, 2, 3, 1)
    if sum(num_pos):
        assert _rel(loss, t_loss.numpy()) <= 1e-6
        assert _rel(grad, expected_grad) <= 1e-5
    else:
        assert float(loss) == 0.0 == t_loss.item()
        np.testing.assert_array_equal(np.asarray(grad), 0.0)
