"""COCO evaluation (pycocotools' COCOeval) of detections in each image's original frame.

    evaluator = CocoEvaluator("annotations/instances_val2017.json", iou_types=("bbox", "segm"))
    for batch in eval_batches:                                   # this host's rows
        outputs = apply(variables, batch["image"], batch["image_size"])
        evaluator.add(fb.detection.postprocess(outputs, batch["image_size"],
                                               batch["original_size"]),
                      batch["image_id"], batch["valid"])
    metrics = evaluator.evaluate()    # {"bbox/AP": .., "segm/AP50": ..}, on every process

Without an annotation json, `add_ground_truth` (boxes in original pixels) builds the ground
truth in memory. Each host adds its own images; `evaluate` gathers everything once across
processes and runs COCOeval on every process, so N hosts give the numbers of one. Values
are pycocotools' `stats`, except its -1 (no ground truth in that area range or at all),
reported as NaN. pycocotools is imported inside the functions: the core does not need it.
"""
import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from numpy.typing import ArrayLike

IOU_TYPES = ("bbox", "segm", "keypoints")
DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def metric_names(iou_type: str) -> tuple[str, ...]:
    """The names `evaluate` returns for `iou_type`, in COCOeval.stats order."""
    names = KEYPOINT_METRICS if iou_type == "keypoints" else DETECTION_METRICS
    return tuple(f"{iou_type}/{n}" for n in names)


def _category_lookup(label_to_category):
    if label_to_category is None:
        return lambda label: int(label)
    table = (dict(label_to_category) if isinstance(label_to_category, Mapping)
             else dict(enumerate(label_to_category)))

    def lookup(label):
        if int(label) not in table:
            raise ValueError(f"label {int(label)} has no category in label_to_category")
        return int(table[int(label)])
    return lookup


def _encode_masks(binary):
    """(k, h, w) bool -> COCO compressed RLEs with str counts (json-serialisable)."""
    from pycocotools import mask as mask_util
    if not len(binary):
        return []
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xywh(boxes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def detection_results(image_id: int, detections: Mapping[str, Any], iou_types=IOU_TYPES,
                      label_to_category=None) -> dict[str, list[dict]]:
    """One image's detections (original frame: `boxes` (k, 4) xyxy, `scores`, `labels`,
    optional `valid` (k,), `masks` (k, h, w) probabilities, `keypoints` (k, 17, 3)) ->
    COCO result dicts per iou type (xywh boxes, RLE masks binarised at > 0.5, flat
    keypoints)."""
    category = _category_lookup(label_to_category)
    keep = np.ones(len(np.asarray(detections["scores"]).reshape(-1)), bool)
    if detections.get("valid") is not None:
        keep = np.asarray(detections["valid"]).astype(bool).reshape(-1)
    scores = np.asarray(detections["scores"], np.float64).reshape(-1)[keep]
    labels = np.asarray(detections["labels"]).reshape(-1)[keep]
    base = [{"image_id": int(image_id), "category_id": category(c), "score": float(s)}
            for c, s in zip(labels, scores)]
    out = {}
    for iou_type in iou_types:
        if iou_type == "bbox":
            values = [{"bbox": b.tolist()} for b in _xywh(detections["boxes"])[keep]]
        elif iou_type == "segm":
            if detections.get("masks") is None:
                raise ValueError("iou type 'segm' needs detections['masks'] (k, h, w)")
            masks = np.asarray(detections["masks"])
            if masks.ndim == 4:  # (k, 1, h, w) as torchvision returns them
                masks = masks[:, 0]
            values = [{"segmentation": r} for r in _encode_masks(masks[keep] > 0.5)]
        elif iou_type == "keypoints":
            if detections.get("keypoints") is None:
                raise ValueError("iou type 'keypoints' needs detections['keypoints'] (k, 17, 3)")
            kps = np.asarray(detections["keypoints"], np.float64)[keep]
            values = [{"keypoints": k.reshape(-1).tolist()} for k in kps]
        else:
            raise ValueError(f"unknown iou type {iou_type!r}; choose from {IOU_TYPES}")
        out[iou_type] = [{**b, **v} for b, v in zip(base, values)]
    return out


def ground_truth_annotations(example: Mapping[str, Any], label_to_category=None):
    """One image's ground truth in its original frame (`image_id`, `original_size` (h, w),
    `boxes` (G, 4) xyxy pixels, `labels`, optional `instance_valid`, `is_crowd`, `masks`
    (G, H >= h, W >= w), `keypoints` (G, 17, 3), `area`) -> (COCO image dict, annotation
    dicts without ids). Areas from the masks when present, else from the boxes."""
    category = _category_lookup(label_to_category)
    h, w = (int(s) for s in np.asarray(example["original_size"]).reshape(2))
    image = {"id": int(example["image_id"]), "height": h, "width": w}
    labels = np.asarray(example["labels"]).reshape(-1)
    keep = np.ones(len(labels), bool)
    if example.get("instance_valid") is not None:
        keep = np.asarray(example["instance_valid"]).astype(bool).reshape(-1)
    boxes = _xywh(example["boxes"])[keep]
    crowd = np.zeros(len(labels), bool)
    if example.get("is_crowd") is not None:
        crowd = np.asarray(example["is_crowd"]).astype(bool).reshape(-1)
    anns = [{"image_id": image["id"], "category_id": category(c), "bbox": b.tolist(),
             "iscrowd": int(z), "area": float(b[2] * b[3])}
            for c, b, z in zip(labels[keep], boxes, crowd[keep])]
    if example.get("masks") is not None:
        masks = np.asarray(example["masks"])[keep][:, :h, :w] > 0
        for ann, rle, m in zip(anns, _encode_masks(masks), masks):
            ann.update(segmentation=rle, area=float(m.sum()))
    if example.get("area") is not None:
        for ann, a in zip(anns, np.asarray(example["area"]).reshape(-1)[keep]):
            ann["area"] = float(a)
    if example.get("keypoints") is not None:
        for ann, k in zip(anns, np.asarray(example["keypoints"], np.float64)[keep]):
            ann.update(keypoints=k.reshape(-1).tolist(), num_keypoints=int((k[:, 2] > 0).sum()))
    return image, anns


def coco_ground_truth(images: Sequence[dict], annotations: Sequence[dict],
                      categories: Sequence[int] | None = None) -> dict:
    """A COCO ground-truth dict from image dicts and id-less annotations: ids numbered 1.. in
    (image id, given order), categories the given ids or those the annotations use."""
    ids = [im["id"] for im in images]
    _no_duplicates(ids, "ground-truth image")
    order = sorted(range(len(annotations)), key=lambda i: annotations[i]["image_id"])
    anns = [{**annotations[i], "id": n + 1} for n, i in enumerate(order)]
    if categories is None:
        categories = sorted({a["category_id"] for a in anns})
    return {"images": sorted(images, key=lambda im: im["id"]), "annotations": anns,
            "categories": [{"id": int(c), "name": str(c)} for c in categories]}


def _no_duplicates(ids, what):
    unique, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"duplicate {what} ids {unique[counts > 1][:10].tolist()}: each image "
                         "must be evaluated once (over all hosts)")


def _split_batch(detections, image_ids, valid, original_sizes):
    """Per-image dicts of the examples that `valid` keeps, with their ids."""
    ids = np.asarray(image_ids).reshape(-1)
    valid = np.ones(len(ids), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if isinstance(detections, Mapping):
        per_image = [{k: (None if v is None else np.asarray(v)[i]) for k, v in detections.items()}
                     for i in range(len(ids))]
    else:
        per_image = [dict(d) for d in detections]
    if len(per_image) != len(ids) or len(valid) != len(ids):
        raise ValueError(f"{len(per_image)} detections, {len(ids)} image ids and {len(valid)} "
                         "valid flags: one of each per example")
    if original_sizes is not None:
        for det, (h, w) in zip(per_image, np.asarray(original_sizes).reshape(-1, 2)):
            if det.get("masks") is not None:
                det["masks"] = det["masks"][..., :h, :w]
    return [(int(i), d) for i, d, v in zip(ids, per_image, valid) if v]


def load_annotations(path: str):
    """A pycocotools COCO object of the json at `path`; errors name the path."""
    from pycocotools.coco import COCO
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid json: {e}") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(dataset, dict) or k not in dataset]
    if missing:
        raise ValueError(f"{path} is not a COCO annotation file: no {missing}")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} has a malformed image or annotation entry: {e!r}") from None
    return coco


def _load_ground_truth(ground_truth):
    """A pycocotools COCO object from a COCO object, an annotation json path or a dict."""
    from pycocotools.coco import COCO
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, (str, os.PathLike)):
        return load_annotations(ground_truth)
    coco = COCO()
    coco.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (two collectives: lengths, then bytes)."""
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
    lengths = lengths.reshape(-1)
    buf = np.zeros(max(int(lengths.max()), 1), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
    return [gathered[p, :n].tobytes() for p, n in enumerate(lengths)]


class CocoEvaluator:
    """COCO evaluation (pycocotools' COCOeval) of detections in each image's original frame.

    Accumulates one host's detections (and optionally ground truth) batch by batch and
    evaluates them over all hosts' images, so N hosts give the numbers of one. Values are
    pycocotools' `stats`, except its -1 (no ground truth in that area range or at all),
    reported as NaN. Needs pycocotools (the `data` extra).

    Args:
        ground_truth: An annotation json path, a COCO dict or pycocotools COCO object,
            or None to build it from `add_ground_truth`.
        iou_types: Any of 'bbox', 'segm', 'keypoints'.
        label_to_category: The model's label -> COCO category id (a dict or sequence);
            None: labels are the category ids (torchvision's 91-id convention).
        categories: The category ids of an in-memory ground truth (default: those its
            annotations use).

    Raises:
        ValueError: No or unknown `iou_types`, or a ground-truth file that is not valid
            COCO json.
        FileNotFoundError: The annotation file does not exist.
    """

    def __init__(self, ground_truth: str | os.PathLike | dict | Any = None,
                 iou_types: Sequence[str] = ("bbox",),
                 label_to_category: Mapping[int, int] | Sequence[int] | None = None,
                 categories: Sequence[int] | None = None) -> None:
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types {tuple(iou_types)}: choose from {IOU_TYPES}")
        self.iou_types = tuple(iou_types)
        self.label_to_category = label_to_category
        self.categories = categories
        self._coco = None if ground_truth is None else _load_ground_truth(ground_truth)
        self.image_ids: list[int] = []
        self._seen: set[int] = set()
        self.results: dict[str, list[dict]] = {t: [] for t in self.iou_types}
        self.gt_images: list[dict] = []
        self.gt_annotations: list[dict] = []

    def add(self, detections: Sequence[Mapping[str, Any]] | Mapping[str, Any],
            image_ids: ArrayLike, valid: ArrayLike | None = None,
            original_sizes: ArrayLike | None = None) -> None:
        """Add one batch of detections.

        Args:
            detections: A list of per-image dicts (what `fb.detection.postprocess`
                returns), or a dict of (B, K, ...) arrays with `valid` (B, K).
            image_ids: (B,) int COCO image ids.
            valid: (B,) bool; False skips padded examples. None: all are real.
            original_sizes: (B, 2) (h, w): crops batched masks to each image.

        Raises:
            ValueError: An image id added twice, lengths that disagree, or detections
                without the masks / keypoints an iou type needs.
        """
        for image_id, det in _split_batch(detections, image_ids, valid, original_sizes):
            if image_id in self._seen:
                raise ValueError(f"image id {image_id} added twice")
            self._seen.add(image_id)
            self.image_ids.append(image_id)
            for t, res in detection_results(image_id, det, self.iou_types,
                                            self.label_to_category).items():
                self.results[t].extend(res)

    def add_ground_truth(self, batch: Mapping[str, Any]) -> None:
        """Add one batch of ground truth in the original frame (evaluators without a json).

        Args:
            batch: `image_id` (B,), `original_size` (B, 2), `boxes` (B, G, 4) xyxy pixels,
                `labels` (B, G), optional `instance_valid`, `is_crowd`, `masks`
                (B, G, H, W), `keypoints` (B, G, 17, 3), `area`, and `valid` (B,).

        Raises:
            ValueError: The evaluator was built with a ground-truth file.
        """
        if self._coco is not None:
            raise ValueError("this evaluator has a ground-truth file; add_ground_truth is for "
                             "ground_truth=None")
        ids = np.asarray(batch["image_id"]).reshape(-1)
        valid = np.ones(len(ids), bool) if batch.get("valid") is None else np.asarray(
            batch["valid"], bool).reshape(-1)
        for i in np.flatnonzero(valid):
            example = {k: (None if v is None else np.asarray(v)[i]) for k, v in batch.items()
                       if k != "valid"}
            image, anns = ground_truth_annotations(example, self.label_to_category)
            self.gt_images.append(image)
            self.gt_annotations.extend(anns)

    def _gather(self):
        local = json.dumps({"ids": self.image_ids, "results": self.results,
                            "images": self.gt_images, "annotations": self.gt_annotations})
        parts = [json.loads(b) for b in _allgather_bytes(local.encode("utf-8"))]
        ids = [i for p in parts for i in p["ids"]]
        results = {t: [r for p in parts for r in p["results"][t]] for t in self.iou_types}
        if self._coco is not None:
            return ids, results, self._coco
        images = [im for p in parts for im in p["images"]]
        anns = [a for p in parts for a in p["annotations"]]
        return ids, results, _load_ground_truth(coco_ground_truth(images, anns, self.categories))

    def evaluate(self) -> dict[str, float]:
        """Gather every process's images and run COCOeval on them.

        A collective: call it on all processes; each gets the same dict.

        Returns:
            {'bbox/AP': ..., 'segm/AP50': ...}: the 12 (10 for keypoints) COCOeval stats
                of each iou type, NaN where pycocotools gives -1.

        Raises:
            ValueError: No images were added, an image was added on two hosts, an image id
                is not in the ground truth, or the ground truth lacks the masks /
                keypoints an iou type needs.
        """
        ids, results, gt = self._gather()
        if not ids:
            raise ValueError("no images were added to the evaluator")
        _no_duplicates(ids, "image")
        missing = sorted(set(ids) - set(gt.getImgIds()))
        if missing:
            raise ValueError(f"image ids {missing[:10]} are not in the ground truth")
        metrics = {}
        for iou_type in self.iou_types:
            stats = _run_cocoeval(gt, results[iou_type], iou_type, sorted(ids))
            metrics.update(zip(metric_names(iou_type), stats))
        return metrics


def _run_cocoeval(gt, results, iou_type, image_ids):
    """COCOeval stats for `results` (-1 -> NaN); no results at all evaluates an empty set."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    needs = {"segm": "segmentation", "keypoints": "keypoints"}.get(iou_type)
    if needs and any(needs not in a for a in gt.dataset.get("annotations", [])):
        raise ValueError(f"iou type {iou_type!r} needs '{needs}' in every ground-truth "
                         "annotation")
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(copy.deepcopy(results))
        else:
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "annotations": [],
                          "categories": copy.deepcopy(gt.dataset.get("categories", []))}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float("nan") if s == -1 else float(s) for s in ev.stats]


def batch_ground_truth(batch: Mapping[str, Any]) -> dict:
    """A detection batch's ground truth (host numpy rows, in the resized frame the model
    sees) mapped to each original frame for `CocoEvaluator.add_ground_truth`: boxes (and
    keypoints) scaled back as detections are, masks resized back with nearest sampling.
    Exact when the transform keeps the size (the built-in datasets at their own size);
    evaluate COCO itself against its annotation json."""
    sizes = np.asarray(batch["image_size"]).reshape(-1, 2)
    originals = np.asarray(batch["original_size"]).reshape(-1, 2)
    ratio = originals / np.maximum(sizes, 1)  # (B, 2) as (h, w)
    out = {k: batch[k] for k in ("image_id", "original_size", "labels", "instance_valid",
                                 "valid") if k in batch}
    out["boxes"] = np.asarray(batch["boxes"]) * np.tile(ratio[:, ::-1], 2)[:, None, :]
    if batch.get("keypoints") is not None:
        points = np.array(batch["keypoints"], np.float32)
        points[..., :2] *= ratio[:, None, None, ::-1]
        out["keypoints"] = points
    if batch.get("masks") is not None:
        masks = np.asarray(batch["masks"])
        height, width = originals.max(0)
        resized = np.zeros(masks.shape[:2] + (height, width), masks.dtype)
        for i, ((h, w), (oh, ow)) in enumerate(zip(sizes, originals)):
            rows = np.minimum((np.arange(oh) + 0.5) * h / oh, h - 1).astype(int)
            cols = np.minimum((np.arange(ow) + 0.5) * w / ow, w - 1).astype(int)
            resized[i, :, :oh, :ow] = masks[i][:, rows][:, :, cols]
        out["masks"] = resized
    return out
