"""Metrics as sums over the global batch (accumulate by adding; finish with `summarize`).

A diverged model reads as wrong: non-finite logits never count as a right answer."""
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5),
                 mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """The number of unmasked examples whose label is within the top k, for each k.

    An example counts when its label's logit is finite, no logit of the example is NaN,
    and fewer than k other classes have a logit >= it (ties count against the label).

    Args:
        logits: (N, C) float logits.
        labels: (N,) int class ids.
        ks: The k values; those above C are left out.
        mask: (N,) 0/1 or bool weights (padded examples 0); None counts every example.

    Returns:
        A dict of 'top{k}' float32 scalar counts.
    """
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits >= label_logit, axis=-1) - 1  # other classes as good as the label
    valid = jnp.isfinite(label_logit[:, 0]) & ~jnp.isnan(logits).any(-1)
    return {f"top{k}": jnp.sum((valid & (rank < k)) * mask) for k in ks if k <= logits.shape[-1]}


def predictions(logits: jax.Array) -> jax.Array:
    """argmax over the last axis as int32, or -1 where any logit of the row is not finite.

    `confusion_matrix` counts -1 as a miss: a diverged model reads as wrong.

    Args:
        logits: (..., C) float logits.

    Returns:
        (...) int32 class ids, -1 for no valid prediction.
    """
    return jnp.where(jnp.isfinite(logits).all(-1), logits.argmax(-1), -1).astype(jnp.int32)


def confusion_matrix(preds: jax.Array, labels: jax.Array, num_classes: int,
                     weights: jax.Array) -> jax.Array:
    """(num_classes, num_classes + 1) counts: rows the true class, columns the prediction.

    The last column is no valid prediction (`predictions` gave -1, or any id out of
    range): a miss of the true class, no class's prediction. Pixels with weight 0
    (ignored, padded) are not counted.

    Args:
        preds: int predictions of any shape (e.g. (N, H, W)).
        labels: int labels of the same shape, in [0, num_classes) where weighted.
        num_classes: The number of classes.
        weights: Weights of the same shape; > 0 counts the pixel.

    Returns:
        int32 (num_classes, num_classes + 1) counts.
    """
    cols = num_classes + 1
    preds = jnp.where((preds >= 0) & (preds < num_classes), preds, num_classes)
    idx = jnp.where(weights > 0, labels * cols + preds, 0).reshape(-1)
    w = (weights > 0).astype(jnp.int32).reshape(-1)
    cm = jnp.zeros((num_classes * cols,), jnp.int32).at[idx].add(w)
    return cm.reshape(num_classes, cols)


def segmentation_scores(cm: ArrayLike) -> dict:
    """mIoU, pixel accuracy and per-class IoU from a `confusion_matrix`.

    mIoU averages the classes that occur (in labels or predictions); a square matrix,
    without the invalid column, works too.

    Args:
        cm: The (accumulated) confusion matrix, any array-like.

    Returns:
        A dict of 'miou' (float, NaN when nothing was counted), 'pixel_accuracy' (float)
            and 'iou' (float64 (num_classes,), NaN for absent classes).
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm[:, :cm.shape[0]])
    union = cm[:, :cm.shape[0]].sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)), "iou": iou}


def summarize(sums: Mapping[str, Any]) -> dict:
    """Finished numbers from accumulated metric sums.

    Every `<name>_sum` becomes a mean per counted example (the loss and its terms),
    'top{k}' an accuracy, 'confusion' mIoU, pixel accuracy and per-class IoU; other
    entries pass through as Python scalars or arrays.

    Args:
        sums: The steps' metric sums, added over batches (device or host arrays).

    Returns:
        A dict of floats (and the 'iou' array).
    """
    sums = {k: np.asarray(v) for k, v in sums.items()}
    count = max(float(sums.get("count", 0)), 1.0)
    out = {}
    for k, v in sums.items():
        if k.endswith("_sum"):  # loss_sum -> loss, loss_mask_sum -> loss_mask
            out[k[:-4]] = float(v) / count
        elif k.startswith("top"):
            out[k] = float(v) / count
        elif k == "confusion":
            out.update(segmentation_scores(v))
        elif k != "count":
            out[k] = v.item() if v.ndim == 0 else v
    return out
