"""Metrics as sums over the global batch (accumulate by adding; finish with `summarize`)."""
import jax.numpy as jnp
import numpy as np


def topk_correct(logits, labels, ks=(1, 5), mask=None):
    """{f'top{k}': number of unmasked examples whose label is among the k best logits}."""
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # classes strictly better than the label
    return {f"top{k}": jnp.sum((rank < k) * mask) for k in ks if k <= logits.shape[-1]}


def confusion_matrix(preds, labels, num_classes: int, weights):
    """(num_classes, num_classes) counts, rows = true class, columns = predicted; pixels
    with weight 0 (ignored, padded) are not counted."""
    idx = jnp.where(weights > 0, labels * num_classes + preds, 0).reshape(-1)
    w = (weights > 0).astype(jnp.int32).reshape(-1)
    cm = jnp.zeros((num_classes * num_classes,), jnp.int32).at[idx].add(w)
    return cm.reshape(num_classes, num_classes)


def segmentation_scores(cm) -> dict:
    """mIoU over classes that occur (in labels or predictions), pixel accuracy, per-class IoU."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)), "iou": iou}


def summarize(sums: dict) -> dict:
    """Finished numbers from accumulated sums: loss, top-k accuracy, mIoU, pixel accuracy."""
    sums = {k: np.asarray(v) for k, v in sums.items()}
    count = max(float(sums.get("count", 0)), 1.0)
    out = {}
    for k, v in sums.items():
        if k == "loss_sum":
            out["loss"] = float(v) / count
        elif k.startswith("top"):
            out[k] = float(v) / count
        elif k == "confusion":
            out.update(segmentation_scores(v))
        elif k != "count":
            out[k] = v.item() if v.ndim == 0 else v
    return out
