"""Metrics as sums over the global batch (accumulate by adding; finish with `summarize`).

A diverged model reads as wrong: non-finite logits never count as a right answer."""
import jax.numpy as jnp
import numpy as np


def topk_correct(logits, labels, ks=(1, 5), mask=None):
    """{f'top{k}': number of unmasked examples whose label is within the top k}: its logit
    is finite, no logit of the example is NaN, and fewer than k other classes have a logit
    >= it (ties count against the label)."""
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits >= label_logit, axis=-1) - 1  # other classes as good as the label
    valid = jnp.isfinite(label_logit[:, 0]) & ~jnp.isnan(logits).any(-1)
    return {f"top{k}": jnp.sum((valid & (rank < k)) * mask) for k in ks if k <= logits.shape[-1]}


def predictions(logits):
    """argmax over the last axis as int32, or -1 (no valid prediction) where any logit of
    the row is NaN or infinite; `confusion_matrix` counts -1 as a miss."""
    return jnp.where(jnp.isfinite(logits).all(-1), logits.argmax(-1), -1).astype(jnp.int32)


def confusion_matrix(preds, labels, num_classes: int, weights):
    """(num_classes, num_classes + 1) counts, rows = true class, columns = predicted class,
    the last column = no valid prediction (`predictions` gave -1, or any id out of range):
    a miss of the true class, no class's prediction. Pixels with weight 0 (ignored,
    padded) are not counted."""
    cols = num_classes + 1
    preds = jnp.where((preds >= 0) & (preds < num_classes), preds, num_classes)
    idx = jnp.where(weights > 0, labels * cols + preds, 0).reshape(-1)
    w = (weights > 0).astype(jnp.int32).reshape(-1)
    cm = jnp.zeros((num_classes * cols,), jnp.int32).at[idx].add(w)
    return cm.reshape(num_classes, cols)


def segmentation_scores(cm) -> dict:
    """mIoU over classes that occur (in labels or predictions), pixel accuracy, per-class
    IoU, from a `confusion_matrix` (a square one, without the invalid column, works too)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm[:, :cm.shape[0]])
    union = cm[:, :cm.shape[0]].sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)), "iou": iou}


def summarize(sums: dict) -> dict:
    """Finished numbers from accumulated sums: every `<name>_sum` as a mean per counted
    example (the loss and its terms), top-k accuracy, mIoU, pixel accuracy."""
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
