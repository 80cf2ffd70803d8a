"""RoIAlign, multi-scale RoIAlign and keypoint decoding against torchvision's own ops: both
alignments, fixed and adaptive sampling, boxes outside the map, degenerate and empty sets."""
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from flaxbones.detection.roi_align import MultiScaleRoIAlign, roi_align  # noqa: E402


def _boxes(rng, n, r, lo, hi, size_lo, size_hi):
    b = rng.uniform(lo, hi, size=(n, r, 4)).astype(np.float32)
    b[..., 2:] = b[..., :2] + rng.uniform(size_lo, size_hi, size=(n, r, 2))
    b[:, 0] = [4.0, 4.0, 4.0, 4.0]  # zero area
    b[:, 1] = [-30.0, -30.0, -20.0, -25.0]  # fully outside
    b[:, 2] = [6.0, 5.0, 2.0, 9.0]  # inverted in x
    return b


def _tv_roi_align(f, b, *args):
    out = torchvision.ops.roi_align(torch.from_numpy(f).permute(0, 3, 1, 2),
                                    [torch.from_numpy(x) for x in b], *args)
    n, r = b.shape[:2]
    return out.permute(0, 2, 3, 1).numpy().reshape(n, r, *out.shape[2:], f.shape[-1])


def _tol(ref):
    """A few ulps: the arithmetic is torchvision's kernel's op for op, FMAs blocked (bit-equal
    on XLA's CPU backend when this was written)."""
    return 1e-6 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 0, -1])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, scale):
    rng = np.random.default_rng(sampling_ratio + 2 + 7 * aligned)
    f = rng.normal(size=(2, 13, 17, 5)).astype(np.float32)
    b = _boxes(rng, 2, 30, -12 / scale, 20 / scale, -2 / scale, 22 / scale)
    if aligned and sampling_ratio <= 0:  # torchvision's kernel cannot size a negative grid
        b[..., 2:] = np.maximum(b[..., 2:], b[..., :2])
    ref = _tv_roi_align(f, b, (3, 4), scale, sampling_ratio, aligned)
    grid = (40, 40) if sampling_ratio <= 0 else None  # adaptive: a cap above every roi here
    out = jax.jit(lambda f, b: roi_align(f, b, (3, 4), scale, sampling_ratio, aligned, grid))(f, b)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=_tol(ref))


def test_adaptive_default_cap_is_exact_inside_the_map():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(1, 20, 30, 3)).astype(np.float32)
    b = rng.uniform(0, 10, size=(1, 25, 4)).astype(np.float32)
    b[..., 2:] = np.minimum(b[..., :2] + rng.uniform(0, 20, size=(1, 25, 2)), [29.0, 19.0])
    ref = _tv_roi_align(f, b, 2, 1.0, 0, True)
    np.testing.assert_allclose(np.asarray(roi_align(f, b, 2, 1.0, 0, True)), ref, atol=_tol(ref))


def test_roi_align_empty_and_jit_shapes():
    f = jnp.ones((2, 8, 9, 3))
    out = jax.jit(lambda f, b: roi_align(f, b, 7, 0.5, 2))(f, jnp.zeros((2, 0, 4)))
    assert out.shape == (2, 0, 7, 7, 3)
    assert MultiScaleRoIAlign(7, 2)([f, f[:, ::2, ::2]], [8, 16], jnp.zeros((2, 0, 4))).shape \
        == (2, 0, 7, 7, 3)


def _tv_multiscale(feats, strides, b, image_sizes, output_size, sr):
    names = [str(i) for i in range(len(feats))]
    x = OrderedDict((k, torch.from_numpy(f).permute(0, 3, 1, 2)) for k, f in zip(names, feats))
    m = torchvision.ops.MultiScaleRoIAlign(names, output_size, sr)
    out = m(x, [torch.from_numpy(v) for v in b], image_sizes)
    assert m.scales == [1.0 / s for s in strides]  # the inferred scales agree with the strides
    n, r = b.shape[:2]
    return out.permute(0, 2, 3, 1).numpy().reshape(n, r, *out.shape[2:], feats[0].shape[-1])


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multiscale_fpn_levels_match_torchvision(sampling_ratio):
    rng = np.random.default_rng(2)
    strides = [4, 8, 16, 32]
    feats = [rng.normal(size=(2, 480 // s, 640 // s, 4)).astype(np.float32) for s in strides]
    b = rng.uniform(-20, 500, size=(2, 60, 4)).astype(np.float32)
    side, aspect = np.exp(rng.uniform(0, 6.6, (2, 60, 1))), np.exp(rng.uniform(-.3, .3, (2, 60, 1)))
    b[..., 2:] = b[..., :2] + np.concatenate([side * aspect, side / aspect], -1)  # 1 .. 735 px
    b[:, 0] = [30.0, 40.0, 30.0, 90.0]  # zero area: the finest level
    b[:, 1] = [50.0, 40.0, 20.0, 90.0]  # inverted: torchvision pools nothing (NaN level)
    ref = _tv_multiscale(feats, strides, b, [(450, 610), (470, 601)], (7, 7), sampling_ratio)
    m = MultiScaleRoIAlign(7, sampling_ratio)
    out = np.asarray(jax.jit(lambda f, b: m(f, strides, b))(feats, b))
    np.testing.assert_allclose(out, ref, atol=_tol(ref))
    assert not out[:, 1].any()
    sizes = np.sqrt(np.abs(np.prod(b[..., 2:] - b[..., :2], -1)))
    assert (sizes < 112).any() and (sizes >= 448).any()  # every level is used


def test_multiscale_two_levels_at_one_stride_map_to_the_first():
    """fasterrcnn_mobilenet_v3_large_fpn: both pooled FPN levels are at stride 32."""
    rng = np.random.default_rng(3)
    feats = [rng.normal(size=(1, 10, 13, 3)).astype(np.float32) for _ in range(2)]
    b = rng.uniform(0, 300, size=(1, 20, 4)).astype(np.float32)
    b[..., 2:] = b[..., :2] + rng.uniform(1, 400, size=(1, 20, 2))
    ref = _tv_multiscale(feats, [32, 32], b, [(301, 410)], 7, 2)
    out = np.asarray(MultiScaleRoIAlign(7, 2)(feats, [32, 32], b))
    np.testing.assert_allclose(out, ref, atol=_tol(ref))
    np.testing.assert_allclose(out, roi_align(feats[0], b, 7, 1 / 32, 2), atol=1e-6)


def test_heatmaps_to_keypoints_matches_torchvision():
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_decode

    from flaxbones.detection.keypoints import heatmaps_to_keypoints
    rng = np.random.default_rng(4)
    h, w, k, r = 90, 130, 5, 18
    maps = rng.normal(size=(2, r, k, 14, 14)).astype(np.float32)
    x0 = rng.uniform(-3, w, (2, r)), rng.uniform(-3, h, (2, r))
    size = np.exp(rng.uniform(-1, 5, (2, r, 2)))  # 0.4 .. 150 px: clamped to 1, every canvas
    rois = np.stack([*x0, x0[0] + size[..., 0], x0[1] + size[..., 1]], -1)
    rois = np.clip(rois, 0, [w, h, w, h]).astype(np.float32)  # many touch the image border
    rois[0, :3] = [[0, 0, w, h], [w - 0.3, h - 0.6, w, h], [0.2, 3.7, 0.2, 3.7]]
    kps, scores = jax.jit(lambda m, b: heatmaps_to_keypoints(m, b, (h, w)))(maps, rois)
    assert kps.shape == (2, r, k, 3) and scores.shape == (2, r, k)
    for i in range(2):
        ref_k, ref_s = (t.numpy() for t in tv_decode(torch.from_numpy(maps[i]),
                                                      torch.from_numpy(rois[i])))
        np.testing.assert_allclose(np.asarray(scores[i]), ref_s, atol=1e-5)
        diff = np.abs(np.asarray(kps[i]) - ref_k).max(-1)
        for j, kk in zip(*np.nonzero(diff > 1e-4)):  # only a near tie may pick another pixel
            bw, bh = max(rois[i, j, 2] - rois[i, j, 0], 1), max(rois[i, j, 3] - rois[i, j, 1], 1)
            roi_map = torch.nn.functional.interpolate(
                torch.from_numpy(maps[i, j, kk])[None, None],
                size=(int(np.ceil(bh)), int(np.ceil(bw))),
                mode="bicubic", align_corners=False)[0, 0]
            xi = round(float((kps[i, j, kk, 0] - rois[i, j, 0]) / (bw / np.ceil(bw))) - 0.5)
            yi = round(float((kps[i, j, kk, 1] - rois[i, j, 1]) / (bh / np.ceil(bh))) - 0.5)
            assert abs(float(roi_map[yi, xi]) - ref_s[j, kk]) <= 1e-5
        assert (diff > 1e-4).mean() < 0.02, diff


def test_heatmaps_to_keypoints_no_rois():
    from flaxbones.detection.keypoints import heatmaps_to_keypoints
    kps, scores = heatmaps_to_keypoints(jnp.zeros((0, 17, 56, 56)), jnp.zeros((0, 4)), (64, 64))
    assert kps.shape == (0, 17, 3) and scores.shape == (0, 17)


@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 2), (True, -1), (False, 0)])
def test_matmul_roi_align_matches_torchvision_with_gradients(aligned, sampling_ratio):
    """method='matmul' (separable weight matrices) against torchvision's roi_align: outputs and
    the gradient to the features, boxes outside the map and degenerate included."""
    rng = np.random.default_rng(11 + sampling_ratio)
    f = rng.normal(size=(2, 13, 17, 5)).astype(np.float32)
    b = _boxes(rng, 2, 30, -12, 20, -2, 22)
    if aligned and sampling_ratio <= 0:
        b[..., 2:] = np.maximum(b[..., 2:], b[..., :2])
    ft = torch.from_numpy(f).permute(0, 3, 1, 2).requires_grad_()
    ref = torchvision.ops.roi_align(ft, [torch.from_numpy(x) for x in b], (3, 4), 1.0,
                                    sampling_ratio, aligned)
    weight = rng.normal(size=ref.shape).astype(np.float32)
    (ref * torch.from_numpy(weight)).sum().backward()
    grid = (40, 40) if sampling_ratio <= 0 else None
    fn = lambda f: roi_align(f, b, (3, 4), 1.0, sampling_ratio, aligned, grid, method="matmul")
    out, vjp = jax.vjp(jax.jit(fn), f)
    ref = ref.detach().permute(0, 2, 3, 1).numpy().reshape(out.shape)
    np.testing.assert_allclose(np.asarray(out), ref, atol=_tol(ref))
    weight = weight.transpose(0, 2, 3, 1).reshape(out.shape)
    grad = ft.grad.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(vjp(weight)[0]), grad, atol=1e-5 * np.abs(grad).max())


def test_matmul_multiscale_matches_torchvision():
    """MultiScaleRoIAlign(method='matmul') on the FPN level mapping, every level used, and
    rois torchvision pools nothing for (a NaN level) pooled as zeros."""
    rng = np.random.default_rng(12)
    strides = [4, 8, 16, 32]
    feats = [rng.normal(size=(2, 256 // s, 320 // s, 4)).astype(np.float32) for s in strides]
    b = rng.uniform(-20, 250, size=(2, 40, 4)).astype(np.float32)
    side = np.exp(rng.uniform(0, 6.0, (2, 40, 1)))
    b[..., 2:] = b[..., :2] + side
    b[:, 1] = [50.0, 40.0, 20.0, 90.0]
    ref = _tv_multiscale(feats, strides, b, [(250, 310), (240, 301)], (7, 7), 2)
    m = MultiScaleRoIAlign(7, 2, method="matmul")
    out = np.asarray(jax.jit(lambda f, b: m(f, strides, b))(feats, b))
    np.testing.assert_allclose(out, ref, atol=_tol(ref))
    assert not out[:, 1].any()
    with pytest.raises(ValueError, match="method"):
        MultiScaleRoIAlign(7, 2, method="dense")(feats, strides, b)
