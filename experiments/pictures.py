"""PNGs people would rather look at than read: curves, segmentation maps, confusion matrices.

Class maps are drawn opaque in one fixed colour per class, the very colours of the legend's
swatches, so a class reads the same in the ground truth, the prediction and the legend;
ignored pixels (label 255: void, padding) are white, a colour no class uses, inside a
grey frame that every panel has.
"""
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Sasha Trubetskoy's 20 distinct colours, black first (class 0), grey for his near-white beige.
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
                    [170, 110, 40], [128, 128, 128], [128, 0, 0], [170, 255, 195],
                    [128, 128, 0], [255, 215, 180], [0, 0, 128]], np.uint8)
IGNORE_LABEL = 255
IGNORE_COLOUR = np.array([255, 255, 255], np.uint8)


def colour(k: int) -> np.ndarray:
    """The RGB uint8 colour of class `k` (or of IGNORE_LABEL)."""
    return IGNORE_COLOUR if k == IGNORE_LABEL else PALETTE[k % len(PALETTE)]


def colourize(mask) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the legend's colours, ignored pixels white."""
    mask = np.asarray(mask)
    out = PALETTE[np.where(mask == IGNORE_LABEL, 0, mask) % len(PALETTE)]
    out[mask == IGNORE_LABEL] = IGNORE_COLOUR
    return out


def denormalize(image, mean, std) -> np.ndarray:
    """Normalised float images back to uint8 for display."""
    return np.clip((np.asarray(image) * np.asarray(std) + np.asarray(mean)) * 255, 0, 255).astype(np.uint8)


def save_overlays(path, images, truths, preds, class_names=None, panel_inches=2.2):
    """One row per example: the image with the predicted regions outlined | ground truth |
    prediction, both class maps opaque; a legend names every colour drawn.

    `images` uint8 (N, H, W, 3); `truths` (N, H, W) class ids with IGNORE_LABEL, or None
    (prediction without labels); `preds` (N, H, W) class ids.
    """
    columns = 2 if truths is None else 3
    height, width = np.shape(images)[1:3]
    fig, axes = plt.subplots(len(images), columns, squeeze=False, layout="constrained",
                             figsize=(panel_inches * columns,
                                      panel_inches * height / width * len(images) + 0.6))
    for row, (image, pred) in enumerate(zip(images, preds)):
        panels = [("image, prediction outlined", image)]
        if truths is not None:
            panels.append(("ground truth", colourize(truths[row])))
        panels.append(("prediction", colourize(pred)))
        for ax, (title, panel) in zip(axes[row], panels):
            ax.imshow(panel, interpolation="antialiased" if panel is image else "nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.6")
            if row == 0:
                ax.set_title(title, fontsize=9)
        outline(axes[row][0], pred)
    entries = legend_entries([m for m in (truths, preds) if m is not None], class_names)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=rgb / 255, edgecolor="0.5", linewidth=0.5)
               for _, rgb in entries]
    fig.legend(handles, [name for name, _ in entries], loc="outside lower center", fontsize=8,
               frameon=False, ncol=min(len(entries), max(2, int(panel_inches * columns / 1.2))),
               handlelength=1.2, columnspacing=1.0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def legend_entries(masks, class_names=None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 colour) of every value in `masks`: class names where known, else
    'class k'; 'ignored' for IGNORE_LABEL."""
    drawn = np.unique(np.concatenate([np.ravel(m) for m in masks]))
    return [("ignored" if k == IGNORE_LABEL else class_names[k]
             if class_names and k < len(class_names) else f"class {k}", colour(int(k)))
            for k in drawn]


def outline(ax, mask):
    """Thin contours of every class region of `mask`, in its class colour, on `ax`."""
    mask = np.asarray(mask)
    limits = ax.get_xlim(), ax.get_ylim()
    for k in np.unique(mask):
        ax.contour((mask == k).astype(np.float32), levels=[0.5], colors=[colour(int(k)) / 255],
                   linewidths=1.2)
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])


def plot_curves(metrics_log, path):
    """Train and eval loss, and every eval metric, against the step (JSON-lines metrics log);
    metrics within [0, 1] (accuracy, mIoU) on a fixed 0-1 axis, so runs compare at a glance."""
    rows = [json.loads(line) for line in pathlib.Path(metrics_log).read_text().splitlines() if line]
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in ("step", "split", "loss") and isinstance(v, (int, float))
                        and ("/" not in k or k.endswith(("/AP", "/AP50")))})  # COCO: headline
    fig, axes = plt.subplots(1, 1 + len(eval_keys), figsize=(4 * (1 + len(eval_keys)), 3),
                             squeeze=False, sharex=True, layout="constrained")
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], ".-", label="train")
    if any("loss" in r for r in evals):
        ax.plot([r["step"] for r in evals if "loss" in r], [r["loss"] for r in evals if "loss" in r],
                "o-", label="eval")
    ax.set_title("loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], eval_keys):
        values = [r[key] for r in evals if key in r]
        ax.plot([r["step"] for r in evals if key in r], values, "o-")
        ax.set_title(f"eval {key}")
        if 0 <= min(values) and max(values) <= 1:
            ax.set_ylim(0, 1.02)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm, class_names, path, max_labelled=30):
    """A row-normalised confusion matrix (rows: truth, columns: prediction). Past
    `max_labelled` classes the figure stops growing and drops tick labels and values."""
    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(cm)
    side = 2 + 0.45 * n if n <= max_labelled else 9
    fig, ax = plt.subplots(figsize=(side + 1, side), layout="constrained")
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= max_labelled:
        names = class_names or [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{int(cm.sum())} examples, accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}",
                 fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_detections(path, images, truths, preds, class_names=None, score_thresh=0.5,
                    panel_inches=2.6):
    """One row per example: ground truth | detections scoring >= `score_thresh`, each
    instance's mask filled and its box drawn in its class colour, named (with the score).

    `images` uint8 (N, H, W, 3); `truths` and `preds` per image dicts of numpy arrays in the
    image's frame: `boxes` (k, 4) xyxy, `labels` (k,), optional `masks` (k, H, W) (> 0.5 is
    inside) and `keypoints` (k, K, 3), and, for predictions, `scores` (k,).
    """
    height, width = np.shape(images)[1:3]
    fig, axes = plt.subplots(len(images), 2, squeeze=False, layout="constrained",
                             figsize=(panel_inches * 2, panel_inches * height / width
                                      * len(images) + 0.3))
    for row, (image, truth, pred) in enumerate(zip(images, truths, preds)):
        keep = pred["scores"] >= score_thresh
        pred = {k: v[keep] for k, v in pred.items() if v is not None}
        for ax, title, found in ((axes[row][0], "ground truth", truth),
                                 (axes[row][1], f"detections (score >= {score_thresh})", pred)):
            ax.imshow(_paint_masks(image, found), interpolation="antialiased")
            for i, (box, label) in enumerate(zip(found["boxes"], found["labels"])):
                rgb = colour(int(label)) / 255
                ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1],
                                           fill=False, edgecolor=rgb, linewidth=1.2))
                if "keypoints" in found:
                    draw_keypoints(ax, found["keypoints"][i], rgb, size=0.6)
                ax.text(box[0], box[1], _tag(found, i, class_names), fontsize=6,
                        color=_ink(rgb), va="bottom",
                        bbox=dict(facecolor=rgb, edgecolor="none", pad=0.5, alpha=0.9))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paint_masks(image, found, alpha=0.55):
    """The image with each instance's mask blended in its class colour."""
    out = image.astype(np.float32)
    for mask, label in zip(found.get("masks", ()), found["labels"]):
        inside = np.asarray(mask)[:out.shape[0], :out.shape[1]] > 0.5
        out[inside] = (1 - alpha) * out[inside] + alpha * colour(int(label))
    return out.astype(np.uint8)


# COCO's person skeleton (person_keypoints_*.json "skeleton", 0-based): drawn when a
# detector predicts COCO's 17 keypoints
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
                 (3, 5), (4, 6))


def draw_keypoints(ax, keypoints, rgb, size=1.0):
    """An instance's `keypoints` (K, 3) (x, y, visibility; > 0 is drawn) as dots in `rgb`
    on `ax`, joined by COCO's skeleton when K is 17."""
    keypoints = np.asarray(keypoints)
    seen = keypoints[:, 2] > 0
    if len(keypoints) == 17:
        for a, b in COCO_SKELETON:
            if seen[a] and seen[b]:
                ax.plot(keypoints[[a, b], 0], keypoints[[a, b], 1], color=rgb,
                        linewidth=1.2 * size, solid_capstyle="round")
    ax.scatter(keypoints[seen, 0], keypoints[seen, 1], s=9 * size ** 2, color=rgb,
               edgecolors="white", linewidths=0.4 * size, zorder=3)


def save_detection_image(path, image, found, class_names=None, min_side=480, dpi=100):
    """`image` (H, W, 3) uint8 full-bleed in its own frame with its detections `found`
    (boxes, labels, optional scores, masks and keypoints, as save_detections takes them):
    masks blended and outlined, keypoints and skeletons, boxes and 'name score' tags in the
    class colour. The PNG is the image's
    size times `magnification` (an integer: small images grow until the tags are legible)."""
    if "scores" in found:  # the best drawn last, on top
        order = np.argsort(found["scores"], kind="stable")
        found = {k: np.asarray(v)[order] for k, v in found.items()}
    h, w = np.shape(image)[:2]
    s = magnification(h, w, min_side)
    fig = plt.figure(figsize=(w * s / dpi, h * s / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    painted = _paint_masks(np.asarray(image), found, alpha=0.45)
    ax.imshow(painted.repeat(s, 0).repeat(s, 1), extent=(0, w, h, 0), interpolation="nearest")
    side = max(h, w) * s  # pixels
    points = float(np.clip(side / 60, 7, 16))
    width = float(np.clip(side / 300, 1.2, 3.5))
    for i, (box, label) in enumerate(zip(found["boxes"], found["labels"])):
        rgb = colour(int(label)) / 255
        if "masks" in found and np.ptp(found["masks"][i]) > 0:
            ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, np.asarray(found["masks"][i]),
                       levels=[0.5], colors=[rgb], linewidths=width * 0.6)
        ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor=rgb, linewidth=width))
        if "keypoints" in found:
            draw_keypoints(ax, found["keypoints"][i], rgb, size=width)
        above = box[1] * s > points * dpi / 72 * 1.6  # room for the tag over the box
        ax.text(box[0], box[1], _tag(found, i, class_names), fontsize=points, color=_ink(rgb),
                va="bottom" if above else "top", clip_on=True,
                bbox={"facecolor": rgb, "edgecolor": "none", "pad": 1.5, "alpha": 0.85})
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def magnification(h: int, w: int, min_side: int = 480) -> int:
    """The integer zoom that brings an image's longer side to at least `min_side` pixels."""
    return max(1, -(-min_side // max(h, w)))


def _tag(found, i, class_names) -> str:
    """'name score' (or 'name' for ground truth) of instance `i`."""
    label = int(found["labels"][i])
    name = class_names[label] if class_names and label < len(class_names) else f"class {label}"
    return f"{name} {found['scores'][i]:.2f}" if "scores" in found else name


def _ink(rgb) -> str:
    """Black on light colours (yellow, cyan), white on dark ones."""
    return "black" if np.dot(rgb, (0.299, 0.587, 0.114)) > 0.6 else "white"
