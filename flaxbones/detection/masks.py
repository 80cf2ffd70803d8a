"""Host-side (numpy) mask pasting as torchvision's paste_masks_in_image, and the bilinear resize
(torch's interpolate, align_corners=False, float32 op for op) it and the input transform share."""
import numpy as np

_F = np.float32


def _linear_taps(in_size: int, out_size: int):
    """torch's bilinear source taps for one axis: (index0, index1, weight0, weight1), (out,)."""
    scale = _F(in_size) / _F(out_size)
    # scale * (i + 0.5) - 0.5 as one fused multiply-add (ATen's kernels are built with FMA)
    real = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(_F)
    real = np.maximum(real, _F(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    w1 = np.clip(real - i0.astype(_F), _F(0), _F(1)).astype(_F)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (_F(1) - w1).astype(_F), w1


def _fma(a, b, c):
    """a * b + c rounded once to float32 (float64 holds the product exactly)."""
    return (a.astype(np.float64) * b + c).astype(_F)


def resize_bilinear(x, out_h: int, out_w: int, channels_last: bool = False):
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) to (out_h, out_w)
    of float32 `x` (..., H, W), or (H, W, C) if `channels_last`, rounded as torch's AVX2/AVX-512
    CPU kernels (FMA builds): the 4-weight kernel when out_h + out_w <= 128, else the separable
    one (rows, then columns)."""
    x = np.asarray(x, _F)
    if channels_last:
        return np.moveaxis(resize_bilinear(np.moveaxis(x, -1, 0), out_h, out_w), 0, -1)
    y0, y1, wy0, wy1 = _linear_taps(x.shape[-2], out_h)
    x0, x1, wx0, wx1 = _linear_taps(x.shape[-1], out_w)
    wy0, wy1 = wy0[:, None], wy1[:, None]
    r0, r1 = x[..., y0, :], x[..., y1, :]
    if out_h + out_w <= 128:
        w00, w01, w10, w11 = wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1
        top = _fma(r0[..., x0], w00, r0[..., x1] * w01)
        return _fma(r1[..., x1], w11, _fma(r1[..., x0], w10, top))
    rows = lambda r: _fma(r[..., x0], wx0, r[..., x1] * wx1)
    return _fma(rows(r0), wy0, rows(r1) * wy1)


def paste_masks_in_image(masks, boxes, image_size, padding: int = 1):
    """torchvision's paste_masks_in_image: `masks` (k, M, M) probabilities, `boxes` (k, 4) in the
    image frame -> (k, h, w) float32; each mask padded by `padding`, its box expanded to match and
    truncated to ints, resized bilinearly to the box's (x2 - x1 + 1, y2 - y1 + 1) and clipped
    into the image (a box wholly outside pastes nothing)."""
    masks = np.asarray(masks, _F)
    boxes = np.asarray(boxes, _F).reshape(-1, 4)
    im_h, im_w = (int(s) for s in image_size)
    out = np.zeros((masks.shape[0], im_h, im_w), _F)
    if not masks.shape[0]:
        return out
    m = masks.shape[-1]
    scale = _F(float(m + 2 * padding) / m)
    masks = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    half = (boxes[:, 2:] - boxes[:, :2]) * _F(0.5) * scale
    center = (boxes[:, 2:] + boxes[:, :2]) * _F(0.5)
    ints = np.concatenate([center - half, center + half], 1).astype(np.int64)  # truncation
    for i, (x1, y1, x2, y2) in enumerate(ints.tolist()):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        xa, xb, ya, yb = max(x1, 0), min(x2 + 1, im_w), max(y1, 0), min(y2 + 1, im_h)
        if xb > xa and yb > ya:
            out[i, ya:yb, xa:xb] = resize_bilinear(masks[i], h, w)[ya - y1:yb - y1, xa - x1:xb - x1]
    return out
