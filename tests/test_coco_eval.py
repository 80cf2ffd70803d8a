"""flaxbones.detection.coco_eval against pycocotools' own COCOeval on the same JSON files.

A synthetic COCO set (5 images of which one has no annotation; polygon, compressed RLE and
a crowd uncompressed-RLE mask; a person keypoints file) and detections written
independently as a result json here. Run as a script it is the worker of the two-process
test: `test_coco_eval.py OUT NUM_PROCESSES PROCESS_ID PORT`.
"""
import ast
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parent.parent
# pycocotools 2.0.x's mask.decode passes numpy 2 a copy keyword its own arrays refuse
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SIZES = {3: (120, 128), 7: (40, 56), 11: (96, 72), 42: (32, 32), 100: (56, 40)}  # id: (h, w)
CATEGORIES = (1, 3, 18)


def _runs(mask):
    """Uncompressed COCO RLE counts of a (h, w) mask (column-major, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _box(rs, h, w, large=False):
    """A box (x, y, bw, bh) in whole pixels inside the image."""
    bw = rs.randint(w - 20 if large else 6, w - 2)
    bh = rs.randint(h - 20 if large else 6, h - 2)
    return float(rs.randint(0, w - bw)), float(rs.randint(0, h - bh)), float(bw), float(bh)


def synthetic():
    """(instances json, person keypoints json, instance detections, keypoint detections);
    detections: image id -> dict of numpy arrays in the original frame."""
    rs = np.random.RandomState(0)
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i:012d}.png"}
              for i, (h, w) in SIZES.items()]
    anns, kp_anns = [], []
    for im in images[:-1]:
        h, w = im["height"], im["width"]
        for j in range(3):
            x, y, bw, bh = _box(rs, h, w, large=(im["id"], j) in ((3, 1), (11, 0)))
            ann = {"id": len(anns) + 1, "image_id": im["id"], "bbox": [x, y, bw, bh],
                   "category_id": CATEGORIES[(j + im["id"]) % 3], "iscrowd": 0}
            box_mask = np.zeros((h, w), np.uint8)
            box_mask[int(y):int(y + bh), int(x):int(x + bw)] = 1
            if j == 0:
                ann["segmentation"] = [[x, y + bh / 2, x + bw / 2, y, x + bw, y + bh / 2,
                                        x + bw / 2, y + bh]]
            elif j == 1 and im["id"] == 7:
                ann.update(iscrowd=1, segmentation={"counts": _runs(box_mask), "size": [h, w]})
            else:
                rle = mask_util.encode(np.asfortranarray(box_mask))
                ann["segmentation"] = {"counts": rle["counts"].decode(), "size": [h, w]}
            anns.append(ann)
    instances = {"images": images, "annotations": anns,
                 "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES]}
    coco = _coco(instances)
    for ann in anns:
        ann["area"] = float(coco.annToMask(ann).sum())
    for im in images[:3]:
        h, w = im["height"], im["width"]
        for _ in range(2):
            x, y, bw, bh = _box(rs, h, w)
            kp = np.stack([x + rs.randint(0, bw, 17), y + rs.randint(0, bh, 17),
                           rs.choice([0, 1, 2], 17)], 1).astype(float)
            kp[kp[:, 2] == 0, :2] = 0
            kp_anns.append({"id": len(kp_anns) + 1, "image_id": im["id"], "category_id": 1,
                            "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                            "keypoints": kp.reshape(-1).tolist(),
                            "num_keypoints": int((kp[:, 2] > 0).sum())})
    keypoints = {"images": images, "annotations": kp_anns,
                 "categories": [{"id": 1, "name": "person", "keypoints": [str(i) for i in
                                                                          range(17)]}]}
    return instances, keypoints, _detections(rs, coco, images), _kp_detections(rs, kp_anns)


def _coco(dataset):
    coco = COCO()
    coco.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(rs, coco, images):
    """Jittered ground truth (some mislabelled, imperfect masks) plus false positives;
    image 42 gets none at all."""
    out = {}
    for im in images:
        h, w = im["height"], im["width"]
        boxes, labels, masks = [], [], []
        if im["id"] == 42:
            out[42] = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                       "labels": np.zeros(0, np.int64), "masks": np.zeros((0, h, w), np.float32)}
            continue
        for ann in coco.imgToAnns[im["id"]]:
            dx, dy = rs.randint(-4, 5, 2)
            x, y, bw, bh = ann["bbox"]
            boxes.append([x + dx * 0.75, y + dy * 0.5, bw + rs.randint(-2, 3) * 0.25, bh])
            labels.append(ann["category_id"] if rs.rand() < 0.8 else CATEGORIES[0])
            shifted = np.roll(coco.annToMask(ann), (dy, dx), (0, 1))
            masks.append(shifted * 0.45 + rs.rand(h, w) * 0.3)
        for _ in range(2):
            boxes.append(list(_box(rs, h, w)))
            labels.append(CATEGORIES[rs.randint(3)])
            masks.append(rs.rand(h, w) * 0.6)
        xywh = np.array(boxes, np.float32)
        out[im["id"]] = {"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                         "scores": rs.rand(len(boxes)).astype(np.float32),
                         "labels": np.array(labels, np.int64),
                         "masks": np.array(masks, np.float32), "xywh": xywh}
    return out


def _kp_detections(rs, kp_anns):
    out = {i: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
               "labels": np.zeros(0, np.int64), "keypoints": np.zeros((0, 17, 3), np.float32)}
           for i in SIZES}
    for ann in kp_anns:
        kp = np.array(ann["keypoints"], np.float32).reshape(17, 3)
        kp[:, :2] += rs.randint(-3, 4, (17, 2)) * 0.5
        kp[:, 2] = 1
        x, y, bw, bh = ann["bbox"]
        d = out[ann["image_id"]]
        d["boxes"] = np.concatenate([d["boxes"], [[x + 1, y, x + bw, y + bh - 1]]]).astype(
            np.float32)
        d["scores"] = np.append(d["scores"], np.float32(rs.rand())).astype(np.float32)
        d["labels"] = np.append(d["labels"], 1)
        d["keypoints"] = np.concatenate([d["keypoints"], kp[None]])
    return out


def result_json(detections, iou_type):
    """The COCO result list written directly from the synthetic detections."""
    out = []
    for image_id, d in detections.items():
        for k in range(len(d["scores"])):
            r = {"image_id": image_id, "category_id": int(d["labels"][k]),
                 "score": float(d["scores"][k])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in d["boxes"][k])
                r["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            elif iou_type == "segm":
                rle = mask_util.encode(np.asfortranarray((d["masks"][k] > 0.5).astype(np.uint8)))
                r["segmentation"] = {"counts": rle["counts"].decode(), "size": rle["size"]}
            else:
                r["keypoints"] = [float(v) for v in d["keypoints"][k].reshape(-1)]
            out.append(r)
    return out


def pycocotools_stats(gt_path, results_path, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.where(ev.stats == -1, np.nan, ev.stats)


def ground_truth_batch(dataset, image_ids, with_masks):
    """The contract's ground truth for `image_ids` (original frame, padded to G instances,
    masks padded to the largest image) with one padded example at the end."""
    coco = _coco(dataset)
    g = max(len(coco.imgToAnns[i]) for i in image_ids) + 1
    hmax, wmax = (max(SIZES[i][d] for i in image_ids) for d in (0, 1))
    b = len(image_ids) + 1
    batch = {"image_id": np.array([*image_ids, 999], np.int64),
             "valid": np.array([True] * len(image_ids) + [False]),
             "original_size": np.array([SIZES[i] for i in image_ids] + [(8, 8)], np.int32),
             "boxes": np.zeros((b, g, 4), np.float32), "labels": np.zeros((b, g), np.int32),
             "instance_valid": np.zeros((b, g), bool), "is_crowd": np.zeros((b, g), bool)}
    if with_masks:
        batch["masks"] = np.zeros((b, g, hmax, wmax), np.uint8)
    if "keypoints" in dataset["annotations"][0]:
        batch["keypoints"] = np.zeros((b, g, 17, 3), np.float32)
    batch["labels"][-1] = 1
    batch["instance_valid"][-1] = True  # the padded example's junk must not count
    for n, i in enumerate(image_ids):
        for k, ann in enumerate(coco.imgToAnns[i]):
            x, y, w, h = ann["bbox"]
            batch["boxes"][n, k] = [x, y, x + w, y + h]
            batch["labels"][n, k] = ann["category_id"]
            batch["instance_valid"][n, k] = True
            batch["is_crowd"][n, k] = ann["iscrowd"]
            if with_masks:
                m = coco.annToMask(ann)
                batch["masks"][n, k, :m.shape[0], :m.shape[1]] = m
            if "keypoints" in batch:
                batch["keypoints"][n, k] = np.reshape(ann["keypoints"], (17, 3))
    return batch


def evaluate_split(evaluator, detections, image_ids, ground_truth=None, batch_size=2):
    """Adds `image_ids` in batches of `batch_size`: lists of per-image dicts, each batch
    followed by a padded example whose junk detections must be skipped."""
    for s in range(0, len(image_ids), batch_size):
        ids = image_ids[s:s + batch_size]
        junk = {k: v for k, v in detections[ids[0]].items()}
        evaluator.add([detections[i] for i in ids] + [junk], [*ids, ids[0]],
                      [True] * len(ids) + [False])
        if ground_truth is not None:
            evaluator.add_ground_truth(ground_truth_batch(ground_truth, ids,
                                                          "segm" in evaluator.iou_types))
    return evaluator.evaluate()


def _as_array(metrics, iou_type):
    from flaxbones.detection.coco_eval import metric_names
    return np.array([metrics[n] for n in metric_names(iou_type)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco_eval")
    instances, keypoints, dets, kp_dets = synthetic()
    paths = {"instances": tmp / "instances.json", "keypoints": tmp / "keypoints.json"}
    paths["instances"].write_text(json.dumps(instances))
    paths["keypoints"].write_text(json.dumps(keypoints))
    expected = {}
    for name, gt, d, types in (("instances", instances, dets, ("bbox", "segm")),
                               ("keypoints", keypoints, kp_dets, ("bbox", "keypoints"))):
        for t in types:
            res = tmp / f"{name}_{t}.json"
            res.write_text(json.dumps(result_json(d, t)))
            expected[name, t] = pycocotools_stats(paths[name], res, t)
    return {"instances": instances, "keypoints": keypoints, "dets": dets, "kp_dets": kp_dets,
            "paths": paths, "expected": expected, "tmp": tmp}


def _evaluator(*args, **kwargs):
    from flaxbones.detection.coco_eval import CocoEvaluator
    return CocoEvaluator(*args, **kwargs)


CASES = (("instances", "dets", ("bbox", "segm")), ("keypoints", "kp_dets", ("bbox", "keypoints")))


@pytest.mark.parametrize("name,dets,types", CASES)
def test_equals_pycocotools(data, name, dets, types):
    metrics = evaluate_split(_evaluator(data["paths"][name], types), data[dets], list(SIZES))
    for t in types:
        ref = data["expected"][name, t]
        assert 0.05 < ref[0] < 0.95, ref  # a non-trivial score
        np.testing.assert_array_equal(_as_array(metrics, t), ref, err_msg=t)
    assert len(metrics) == sum(len(_as_array(metrics, t)) for t in types)


@pytest.mark.parametrize("name,dets,types", CASES)
def test_in_memory_ground_truth_equals_json(data, name, dets, types):
    """Ground truth from contract batches (areas from masks / boxes, crowd flags kept)."""
    metrics = evaluate_split(_evaluator(None, types, categories=None), data[dets],
                             list(SIZES), ground_truth=data[name])
    for t in types:
        np.testing.assert_array_equal(_as_array(metrics, t), data["expected"][name, t])


def test_batched_dict_with_padding_and_label_table(data):
    """(B, K) arrays with a detection mask and masks padded to the batch's largest image;
    labels mapped through a label -> category table."""
    dets, ids = data["dets"], list(SIZES)
    table = {0: 1, 1: 3, 2: 18}
    to_label = {c: lbl for lbl, c in table.items()}
    evaluator = _evaluator(data["paths"]["instances"], ("bbox", "segm"),
                           label_to_category=table)
    k = max(len(dets[i]["scores"]) for i in ids) + 1
    hmax, wmax = (max(SIZES[i][d] for i in ids) for d in (0, 1))
    batch = {"boxes": np.zeros((6, k, 4), np.float32), "scores": np.zeros((6, k), np.float32),
             "labels": np.zeros((6, k), np.int32), "valid": np.zeros((6, k), bool),
             "masks": np.ones((6, k, hmax, wmax), np.float32)}  # junk outside each image
    for n, i in enumerate(ids):
        m = len(dets[i]["scores"])
        batch["boxes"][n, :m] = dets[i]["boxes"]
        batch["scores"][n, :m] = dets[i]["scores"]
        batch["labels"][n, :m] = [to_label[c] for c in dets[i]["labels"]]
        batch["valid"][n, :m] = True
        batch["masks"][n, :m] = 0
        batch["masks"][n, :m, :SIZES[i][0], :SIZES[i][1]] = dets[i]["masks"]
    batch["valid"][5] = True  # a padded example full of detections
    sizes = [SIZES[i] for i in ids] + [(8, 8)]
    evaluator.add(batch, [*ids, 3], [True] * 5 + [False], original_sizes=sizes)
    metrics = evaluator.evaluate()
    for t in ("bbox", "segm"):
        np.testing.assert_array_equal(_as_array(metrics, t), data["expected"]["instances", t])


def test_no_detections_is_zero(data):
    empty = {i: {k: v[:0] for k, v in d.items()} for i, d in data["dets"].items()}
    for gt in (data["paths"]["instances"], None):
        metrics = evaluate_split(_evaluator(gt, ("bbox", "segm")), empty, list(SIZES),
                                 ground_truth=None if gt else data["instances"])
        for t in ("bbox", "segm"):
            values = _as_array(metrics, t)
            ref = data["expected"]["instances", t]
            # 0 where the ground truth has objects; NaN (pycocotools' -1) where it has none
            np.testing.assert_array_equal(values, np.where(np.isnan(ref), np.nan, 0.0))
            assert metrics[f"{t}/AP"] == 0.0


def test_errors(data, tmp_path):
    from flaxbones.detection import coco_eval
    dets = data["dets"]
    ev = _evaluator(data["paths"]["instances"])
    ev.add([dets[3]], [3])
    with pytest.raises(ValueError, match="image id 3 added twice"):
        ev.add([dets[3]], [3])
    ev.add([dets[7]], [5])
    with pytest.raises(ValueError, match=r"image ids \[5\] are not in the ground truth"):
        ev.evaluate()
    with pytest.raises(ValueError, match="duplicate image ids"):
        coco_eval._no_duplicates([1, 2, 2], "image")
    with pytest.raises(ValueError, match="needs detections\\['masks'\\]"):
        _evaluator(data["paths"]["instances"], ("segm",)).add([{**dets[3], "masks": None}], [3])
    no_masks = _evaluator(None, ("segm",))
    no_masks.add([dets[3]], [3])
    no_masks.add_ground_truth(ground_truth_batch(data["instances"], [3], with_masks=False))
    with pytest.raises(ValueError, match="needs 'segmentation'"):
        no_masks.evaluate()
    with pytest.raises(ValueError, match="iou_types"):
        _evaluator(None, ("box",))
    with pytest.raises(ValueError, match="no images"):
        _evaluator(data["paths"]["instances"]).evaluate()
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        _evaluator(tmp_path / "nowhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid json"):
        _evaluator(bad)


def test_pycocotools_is_imported_lazily():
    """`import flaxbones` (the core) must not need pycocotools: imports inside functions."""
    tree = ast.parse((ROOT / "flaxbones/detection/coco_eval.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top
                                                      if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("pycocotools")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_equal_one(data):
    """2 localhost processes (jax.distributed, CPU), each with every other image and its own
    ground truth batches: every process returns the one-process numbers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(data["tmp"] / f"host{p}.json"),
                               "2", str(p), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    for p in range(2):
        out = json.loads((data["tmp"] / f"host{p}.json").read_text())
        for key, t in (("json", "bbox"), ("json", "segm"), ("memory", "bbox"),
                       ("memory", "segm")):
            np.testing.assert_array_equal(_as_array(out[key], t),
                                          data["expected"]["instances", t], err_msg=key)


def _worker(out_path, num_processes, process_id, port):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    instances, _, dets, _ = synthetic()
    mine = list(SIZES)[process_id::num_processes]
    gt_path = Path(out_path).with_name("instances.json")
    out = {"json": evaluate_split(_evaluator(str(gt_path), ("bbox", "segm")), dets, mine),
           "memory": evaluate_split(_evaluator(None, ("bbox", "segm")), dets, mine,
                                    ground_truth=instances)}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
