"""PNGs people would rather look at than read: curves, overlays, confusion matrices."""
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
                    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
                    [128, 128, 0], [255, 215, 180], [0, 0, 128]], np.uint8)
IGNORE_COLOUR = np.array([255, 255, 255], np.uint8)


def colourize(mask, ignore_label=255):
    """(H, W) class ids -> (H, W, 3) uint8, ignored pixels white."""
    mask = np.asarray(mask)
    out = PALETTE[np.where(mask == ignore_label, 0, mask) % len(PALETTE)]
    out[mask == ignore_label] = IGNORE_COLOUR
    return out


def denormalize(image, mean, std):
    """A normalised float image back to uint8 for display."""
    return np.clip((np.asarray(image) * np.asarray(std) + np.asarray(mean)) * 255, 0, 255).astype(np.uint8)


def save_overlays(path, images, truths, preds, mean, std, class_names=None, alpha=0.5):
    """One row per example: image | ground truth over image | prediction over image.
    `truths` may be None (prediction without labels)."""
    columns = 2 if truths is None else 3
    fig, axes = plt.subplots(len(images), columns, figsize=(2.2 * columns, 2.2 * len(images)),
                             squeeze=False)
    for row, (image, pred) in enumerate(zip(images, preds)):
        picture = denormalize(image, mean, std)
        panels = [("image", picture)]
        if truths is not None:
            panels.append(("ground truth", _blend(picture, truths[row], alpha)))
        panels.append(("prediction", _blend(picture, pred, alpha)))
        for ax, (title, panel) in zip(axes[row], panels):
            ax.imshow(panel)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    if class_names:
        handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[i % len(PALETTE)] / 255)
                   for i in range(len(class_names))]
        fig.legend(handles, class_names, loc="lower center", ncol=min(len(class_names), 5),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if class_names else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _blend(image, mask, alpha):
    """Colour the labelled pixels of `image`; background (class 0) shows through."""
    mask = np.asarray(mask)
    weight = np.where(mask == 0, 0.0, alpha)[..., None]
    return (image * (1 - weight) + colourize(mask) * weight).astype(np.uint8)


def plot_curves(metrics_log, path):
    """Train loss and every eval metric against the step, from the JSON-lines metrics log."""
    rows = [json.loads(line) for line in pathlib.Path(metrics_log).read_text().splitlines() if line]
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in ("step", "split", "loss") and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 1 + len(eval_keys), figsize=(4 * (1 + len(eval_keys)), 3), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    for ax, key in zip(axes[0][1:], eval_keys):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-")
        ax.set_title(f"eval {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm, class_names, path):
    """A row-normalised confusion matrix (rows: truth, columns: prediction)."""
    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(cm)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 1 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = class_names or [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
