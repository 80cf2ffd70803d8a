"""flaxbones.data.coco: a tiny official COCO layout (PNG images, instances and keypoints
json with polygons, compressed and uncompressed RLE, a crowd, images without annotations)
read back and compared with pycocotools."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from flaxbones.data import coco as fbcoco

tf = fbcoco.tf  # TensorFlow as flaxbones.data loads it (triton first: importing TF here segfaults)

# pycocotools 2.0.x's mask.decode passes numpy 2 a copy keyword its own arrays refuse
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SPLIT = "train2017"
SIZES = {9: (40, 56), 4: (48, 32), 25: (32, 32), 30: (36, 44), 12: (24, 40)}  # file order
# 25: no annotation; 30: only a 1-px-wide box (torchvision drops it too)


def _write_layout(root):
    rs = np.random.RandomState(0)
    (root / SPLIT).mkdir(parents=True)
    (root / "annotations").mkdir()
    images, pixels = [], {}
    for i, (h, w) in SIZES.items():
        pixels[i] = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
        name = f"{i:012d}.png"
        (root / SPLIT / name).write_bytes(tf.io.encode_png(pixels[i]).numpy())
        images.append({"id": i, "file_name": name, "height": h, "width": w})
    rect = np.zeros((40, 56), np.uint8)
    rect[5:20, 10:30] = 1
    rle = mask_util.encode(np.asfortranarray(rect))
    crowd = np.zeros((48, 32), np.uint8)
    crowd[10:40, 2:30] = 1
    flat = crowd.T.reshape(-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    anns = [
        {"image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [3.5, 2.0, 40.0, 30.5],
         "segmentation": [[3.5, 2.0, 43.5, 2.0, 43.5, 32.5, 3.5, 32.5]]},
        {"image_id": 9, "category_id": 18, "iscrowd": 0, "bbox": [10.0, 5.0, 20.0, 15.0],
         "segmentation": {"counts": rle["counts"].decode(), "size": [40, 56]}},
        {"image_id": 4, "category_id": 90, "iscrowd": 1, "bbox": [2.0, 10.0, 28.0, 30.0],
         "segmentation": {"counts": counts, "size": [48, 32]}},
        {"image_id": 4, "category_id": 1, "iscrowd": 0, "bbox": [20.0, 40.0, 20.0, 20.0],
         "segmentation": [[20, 40, 31, 40, 31, 47, 20, 47], [0, 0, 3, 0, 3, 3]]},
        {"image_id": 30, "category_id": 3, "iscrowd": 0, "bbox": [4.0, 4.0, 1.0, 10.0],
         "segmentation": [[4, 4, 5, 4, 5, 14, 4, 14]]},
        {"image_id": 12, "category_id": 3, "iscrowd": 0, "bbox": [0.0, 0.0, 40.0, 24.0],
         "segmentation": [[0, 0, 40, 0, 40, 24]]},
    ]
    for n, a in enumerate(anns):
        a.update(id=n + 1, area=a["bbox"][2] * a["bbox"][3])
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 18, 90)]
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    kp_anns = []
    for image_id, visible in ((9, 12), (4, 6), (12, 9)):  # 4 and 12 under 10 visible
        kp = np.zeros((17, 3))
        kp[:visible] = [[5 + k, 6 + k, 2] for k in range(visible)]
        kp_anns.append({"id": len(kp_anns) + 1, "image_id": image_id, "category_id": 1,
                        "iscrowd": 0, "bbox": [2.0, 3.0, 20.0, 20.0], "area": 400.0,
                        "num_keypoints": visible, "keypoints": kp.reshape(-1).tolist(),
                        "segmentation": [[2, 3, 22, 3, 22, 23, 2, 23]]})
    (root / "annotations" / f"person_keypoints_{SPLIT}.json").write_text(json.dumps(
        {"images": images, "annotations": kp_anns,
         "categories": [{"id": 1, "name": "person", "keypoints": list(map(str, range(17)))}]}))
    return pixels


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    pixels = _write_layout(root)
    coco = fbcoco.load_annotations(root / "annotations" / f"instances_{SPLIT}.json")
    return root, pixels, coco


def _read(root, **kwargs):
    return list(fbcoco.coco_dataset(root, SPLIT, **kwargs).as_numpy_iterator())


def test_reads_every_image_with_masks(layout):
    root, pixels, coco = layout
    ds = fbcoco.coco_dataset(root, SPLIT, with_masks=True, train=False)
    assert int(ds.cardinality()) == 5
    examples = list(ds.as_numpy_iterator())
    assert [int(e["image/id"]) for e in examples] == list(SIZES)
    for e in examples:
        i = int(e["image/id"])
        h, w = SIZES[i]
        np.testing.assert_array_equal(e["image"], pixels[i])
        anns = coco.imgToAnns[i]
        obj = e["objects"]
        assert obj["mask"].shape == (len(anns), h, w) and obj["mask"].dtype == np.uint8
        for k, ann in enumerate(anns):
            np.testing.assert_array_equal(obj["mask"][k], coco.annToMask(ann))
            x, y, bw, bh = ann["bbox"]
            want = np.clip([y / h, x / w, (y + bh) / h, (x + bw) / w], 0, 1)
            np.testing.assert_allclose(obj["bbox"][k], want, rtol=1e-6)
        assert obj["label"].tolist() == [a["category_id"] for a in anns]
        assert obj["is_crowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert "keypoints" not in obj
    by_id = {int(e["image/id"]): e["objects"] for e in examples}
    assert by_id[4]["is_crowd"].tolist() == [True, False]
    assert by_id[4]["label"].tolist() == [90, 1]  # category ids, not contiguous labels
    assert by_id[4]["bbox"][1].tolist() == pytest.approx([40 / 48, 20 / 32, 1.0, 1.0])  # clipped
    assert by_id[25]["bbox"].shape == (0, 4) and by_id[25]["label"].shape == (0,)


def test_training_skips_images_without_annotations(layout):
    root = layout[0]
    ids = [int(e["image/id"]) for e in _read(root)]  # train2017: train by default
    assert ids == [9, 4, 12]  # 25 has none, 30 only a 1-px-wide box
    ids = [int(e["image/id"]) for e in _read(root, remove_images_without_annotations=False)]
    assert ids == list(SIZES)
    assert "mask" not in _read(root)[0]["objects"]


def test_keypoints(layout):
    root = layout[0]
    kp_coco = fbcoco.load_annotations(root / "annotations" / f"person_keypoints_{SPLIT}.json")
    train = _read(root, kind="person_keypoints")
    assert [int(e["image/id"]) for e in train] == [9]  # the others have < 10 visible keypoints
    examples = _read(root, kind="person_keypoints", train=False)
    for e in examples:
        anns = kp_coco.imgToAnns[int(e["image/id"])]
        kps = e["objects"]["keypoints"]
        assert kps.shape == (len(anns), 17, 3) and kps.dtype == np.float32
        for k, ann in enumerate(anns):
            np.testing.assert_array_equal(kps[k].reshape(-1), ann["keypoints"])
    with_kp = _read(root, train=False, with_keypoints=True)  # instances: no keypoints -> 0
    assert not with_kp[0]["objects"]["keypoints"].any()


def test_shards(layout):
    root = layout[0]
    parts = [[int(e["image/id"]) for e in _read(root, train=False, shard_index=s,
                                                  shard_count=2)] for s in range(2)]
    assert parts == [[9, 4, 25], [30, 12]]
    assert fbcoco.shard(list(range(7)), 2, 3) == [5, 6]
    with pytest.raises(ValueError, match="shard index 2"):
        fbcoco.shard([1, 2], 2, 2)


def test_errors(layout, tmp_path):
    root = layout[0]
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        fbcoco.coco_dataset(root, "val2017", image_dir=root / SPLIT)
    with pytest.raises(FileNotFoundError, match="COCO image folder not found: .*val2017"):
        fbcoco.coco_dataset(root, "val2017")
    bad = tmp_path / "annotations" / "instances_x.json"
    bad.parent.mkdir()
    (tmp_path / "x").mkdir()
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_x.json is not valid json"):
        fbcoco.coco_dataset(tmp_path, "x")
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"instances_x.json is not a COCO annotation file"):
        fbcoco.coco_dataset(tmp_path, "x")
    with pytest.raises(ValueError, match="kind"):
        fbcoco.coco_dataset(root, SPLIT, kind="captions")
    images = [{"id": 1, "file_name": "gone.png", "height": 4, "width": 4},
              {"id": 2, "file_name": "small.png", "height": 5, "width": 4}]
    (tmp_path / "x" / "small.png").write_bytes(
        tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    bad.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    ds = fbcoco.coco_dataset(tmp_path, "x", train=False)
    with pytest.raises(tf.errors.NotFoundError, match="gone.png"):
        next(iter(ds.take(1)))
    bad.write_text(json.dumps({"images": images[1:], "annotations": [], "categories": []}))
    ds = fbcoco.coco_dataset(tmp_path, "x", train=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)image size differs.*small"):
        next(iter(ds))


def test_stored_once_then_read_by_name_like_any_tfds_dataset(layout, tmp_path):
    """store_coco writes coco_instances into data_dir; detection_pipeline then finds it by
    name (as an experiment config does), labels staying the category ids."""
    from flaxbones import data as fbd
    root, _, coco = layout
    builder = fbcoco.store_coco(root, str(tmp_path), splits={"train": SPLIT})
    assert builder.info.full_name.startswith("coco_instances/")
    names = builder.info.features["objects"]["label"].names
    assert names[0] == "background" and all(
        names[c["id"]] == c["name"] for c in coco.dataset["categories"])
    pipe = fbd.detection_pipeline("coco_instances", batch_size=len(SIZES), train=False,
                                  data_dir=str(tmp_path), label_offset=0, mean=(0.5,) * 3,
                                  std=(0.25,) * 3, min_size=64, max_size=64, pad_size=64)
    batch = next(iter(pipe))
    ids = np.asarray(batch["image_id"])[np.asarray(batch["valid"]) > 0]
    assert sorted(ids) == sorted(fbcoco.image_ids(coco, True))  # a train split: annotated
    for row, image_id in enumerate(np.asarray(batch["image_id"])):
        if image_id < 0:
            continue
        want = sorted(a["category_id"] for a in coco.imgToAnns[int(image_id)]
                      if not a.get("iscrowd") and min(a["bbox"][2:]) > 0)
        got = np.asarray(batch["labels"][row])[np.asarray(batch["instance_valid"][row])]
        assert sorted(got.tolist()) == want
    assert "masks" in batch
    again = fbcoco.store_coco(root, str(tmp_path), splits={"train": SPLIT})
    assert again.info.splits["train"].num_examples == len(ids)
    boxes = fbcoco.store_coco(root, str(tmp_path), splits={"train": SPLIT}, with_masks=False)
    assert boxes.info.full_name.startswith("coco_instances_boxes/")
    assert "mask" not in boxes.info.features["objects"]
