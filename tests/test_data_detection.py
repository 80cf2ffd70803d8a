"""Detection input pipeline: the built-in instances dataset, the batch contract, torchvision's
resize rule and reference targets, flips, crowd / degenerate filtering, label maps on a
coco/2017 mock, and the errors (too many instances, a dataset without boxes)."""
import flaxbones.data as fbd  # noqa: I001  (first: it loads triton before TensorFlow)
import contextlib
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from flaxbones.data import builtin, detection
from flaxbones.detection import transform

INSTANCES = "flaxbones_shapes/instances_tiny"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    fbd.load_builder(INSTANCES, data_dir)
    return data_dir


@pytest.fixture(scope="module")
def raw(shapes_dir):
    builder = fbd.load_builder(INSTANCES, shapes_dir)
    return {split: list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())
            for split in ("train", "test")}


def pipe(shapes_dir, train, **kwargs):
    kwargs = {"batch_size": 4, "mean": MEAN, "std": STD, "min_size": 64, "max_size": 100,
              "max_instances": 6, "data_dir": shapes_dir, **kwargs}
    return fbd.detection_pipeline(INSTANCES, train=train, **kwargs)


def extents(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_instances_dataset(raw):
    assert len(raw["train"]) == 16 and len(raw["test"]) == 8
    overlapping = 0
    for ex in raw["train"] + raw["test"]:
        objects = ex["objects"]
        masks, boxes = objects["mask"], objects["bbox"]
        n = len(objects["label"])
        assert ex["image"].shape == (64, 64, 3) and masks.shape == (n, 64, 64) and n >= 1
        assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
        assert masks.sum(0).max() == 1 and (masks.sum((1, 2)) >= 16).all()  # visible, disjoint
        assert set(objects["label"]) <= {0, 1, 2} and not objects["is_crowd"].any()
        for mask, box in zip(masks, boxes):
            x0, y0, x1, y1 = extents(mask)
            np.testing.assert_allclose(box * 64, [y0, x0, y1, x1], atol=1e-4)
        b = boxes * 64
        lo, hi = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:], b[None, :, 2:])
        overlapping += ((hi > lo).all(-1).sum() > n)
    assert overlapping > 0
    assert builtin.INSTANCE_CLASSES == ("circle", "square", "triangle")
    again = builtin.render_instances(np.random.default_rng([0, 0, 3]), 64)
    first = builtin.render_instances(np.random.default_rng([0, 0, 3]), 64)
    assert all(np.array_equal(a, b) for a, b in zip(again, first))


def test_train_batches(shapes_dir):
    train = pipe(shapes_dir, True)
    assert train.num_classes == len(builtin.CLASSES) == 4
    batch = next(iter(train))
    dtypes = {"image": np.float32, "image_size": np.int32, "original_size": np.int32,
              "image_id": np.int64, "boxes": np.float32, "labels": np.int32,
              "instance_valid": bool, "masks": np.uint8, "valid": bool}
    assert {k: v.dtype for k, v in batch.items()} == dtypes
    assert batch["image"].shape == (4, 64, 64, 3) and batch["masks"].shape == (4, 6, 64, 64)
    assert batch["boxes"].shape == (4, 6, 4) and batch["labels"].shape == (4, 6)
    assert (batch["image_size"] == 64).all() and (batch["original_size"] == 64).all()
    assert batch["valid"].all()
    iv = batch["instance_valid"]
    assert iv.any(1).all() and (iv[:, :-1] >= iv[:, 1:]).all()  # valid first, then padding
    assert ((batch["labels"] >= 1) == iv).all() and (batch["labels"] <= 3).all()
    assert not batch["masks"][~iv].any() and not batch["boxes"][~iv].any()
    for masks, boxes, valid in zip(batch["masks"], batch["boxes"], iv):
        for mask, box in zip(masks[valid], boxes[valid]):
            np.testing.assert_allclose(box, extents(mask), atol=1e-4)  # also after a flip
    stream = iter(pipe(shapes_dir, True))
    first, _, third = next(stream), next(stream), next(stream)
    assert all(np.array_equal(batch[k], first[k]) for k in batch)
    resumed = next(iter(pipe(shapes_dir, True, start_batch=2)))
    assert all(np.array_equal(third[k], resumed[k]) for k in batch)


def test_flip(shapes_dir):
    plain = next(iter(pipe(shapes_dir, True, flip_prob=0.0)))
    flipped = next(iter(pipe(shapes_dir, True, flip_prob=1.0)))
    np.testing.assert_array_equal(plain["image_id"], flipped["image_id"])
    np.testing.assert_allclose(flipped["image"], plain["image"][:, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(flipped["masks"], plain["masks"][..., ::-1])
    b, valid = plain["boxes"], plain["instance_valid"]
    mirrored = np.stack([64 - b[..., 2], b[..., 1], 64 - b[..., 0], b[..., 3]], -1)
    np.testing.assert_allclose(flipped["boxes"][valid], mirrored[valid], atol=1e-5)


def test_keypoints_flip_map_and_resize():
    kp = np.zeros((1, 17, 3), np.float32)
    kp[0, 1] = (10, 5, 2)  # left eye
    kp[0, 2] = (14, 6, 1)  # right eye
    kp[0, 5] = (3, 4, 0)   # invisible: zeroed by the flip, as torchvision's references
    once = detection.flip_keypoints(tf.constant(kp), 40.0, fbd.COCO_PERSON_KEYPOINT_FLIP).numpy()
    np.testing.assert_array_equal(once[0, 2], [30, 5, 2])
    np.testing.assert_array_equal(once[0, 1], [26, 6, 1])
    assert not once[0, 6].any() and not once[0, 5].any()
    twice = detection.flip_keypoints(once, 40.0, fbd.COCO_PERSON_KEYPOINT_FLIP).numpy()
    visible = kp.copy()
    visible[0, 5] = 0
    np.testing.assert_array_equal(twice, visible)

    settings = {"mean": MEAN, "std": STD, "min_size": (60,), "max_size": 200}
    preprocess = detection._preprocess(
        True, keys=list(detection._REQUIRED), settings=settings, static=(64, 96),
        max_instances=3, label_offset=1, table=None, masks=False, keypoints=17,
        flip_map=fbd.COCO_PERSON_KEYPOINT_FLIP, flip_prob=1.0, check_fit=False)
    example = {"image": tf.zeros((30, 40, 3), tf.uint8),
               "objects": {"bbox": tf.constant([[0.1, 0.25, 0.5, 0.5]]),
                           "label": tf.constant([4], tf.int64), "keypoints": tf.constant(kp)}}
    out = preprocess(example, tf.constant([1, 2], tf.int64))
    assert out["image_size"].numpy().tolist() == [60, 80] and out["image"].shape == (64, 96, 3)
    np.testing.assert_allclose(out["boxes"][0], np.array([20, 3, 30, 15]) * 2, atol=1e-5)
    np.testing.assert_allclose(out["keypoints"][0], once[0] * [2, 2, 1])
    assert out["labels"].numpy().tolist() == [5, 0, 0] and out["keypoints"].shape == (3, 17, 3)


@pytest.mark.parametrize("hw", [(64, 64), (97, 131), (131, 97), (480, 640), (33, 500)])
def test_resize_rule_is_torchvision(hw):
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    min_sizes, max_size = (56, 64, 80), 120
    reference = GeneralizedRCNNTransform(80, max_size, MEAN, STD).eval()
    images, _ = reference([torch.zeros(3, *hw)])
    settings = {"min_size": min_sizes, "max_size": max_size}
    eval_size = [int(s) for s in detection._resized_shape(*hw, settings, None)]
    assert eval_size == list(images.image_sizes[0]) == list(transform.resized_shape(*hw, 80, 120))
    drawn = {tuple(int(s) for s in detection._resized_shape(*hw, settings, tf.constant([i, 0])))
             for i in range(40)}
    assert drawn == {transform.resized_shape(*hw, m, max_size) for m in min_sizes}


@pytest.mark.parametrize("size", [80, 50])
def test_eval_equals_torchvision_transform(shapes_dir, raw, size):
    """Eval batches: every test example once, in order; images, masks and boxes as
    torchvision's GeneralizedRCNNTransform (train-mode targets) on the same example."""
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    evaluation = pipe(shapes_dir, False, batch_size=3, min_size=size, max_size=120)
    batches = list(evaluation)
    assert len(evaluation) == len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 8 + [False]
    last = batches[-1]
    assert last["image_id"][-1] == -1 and not last["instance_valid"][-1].any()
    assert not last["image"][-1].any()
    reference = GeneralizedRCNNTransform(size, 120, MEAN, STD)
    padded = -(-size // 32) * 32
    for i, ex in enumerate(raw["test"]):
        batch, j = batches[i // 3], i % 3
        assert batch["image_id"][j] == ex["image/id"]
        masks = torch.tensor(ex["objects"]["mask"])
        target = {"boxes": torch.tensor(ex["objects"]["bbox"][:, [1, 0, 3, 2]] * 64),
                  "labels": torch.tensor(ex["objects"]["label"]), "masks": masks}
        image = torch.tensor(ex["image"]).permute(2, 0, 1).float() / 255
        images, (target,) = reference.train()([image], [target])
        n = len(target["boxes"])
        assert batch["image"].shape[1:3] == images.tensors.shape[2:] == (padded, padded)
        assert batch["image_size"][j].tolist() == list(images.image_sizes[0]) == [size, size]
        np.testing.assert_allclose(batch["image"][j], images.tensors[0].permute(1, 2, 0),
                                   atol=2e-5)
        np.testing.assert_array_equal(batch["masks"][j, :n, :size, :size], target["masks"])
        np.testing.assert_allclose(batch["boxes"][j, :n], target["boxes"], rtol=1e-6)
        assert batch["instance_valid"][j].sum() == n


def test_size_buckets(shapes_dir):
    big = pipe(shapes_dir, False, min_size=100, max_size=256, batch_size=2)
    assert next(iter(big))["image"].shape == (2, 128, 128, 3)  # 100 -> the 128 bucket
    fixed = pipe(shapes_dir, True, pad_size=(112, 120), batch_size=2)
    batch = next(iter(fixed))
    assert batch["image"].shape == (2, 112, 120, 3) and batch["masks"].shape[2:] == (112, 120)
    hosts = pipe(shapes_dir, False, batch_size=2, process_index=1, process_count=2)
    assert next(iter(hosts))["image"].shape == (1, 128, 128, 3)  # hosts agree: the largest
    ssd = pipe(shapes_dir, True, fixed_size=(50, 40), size_divisible=1, batch_size=2)
    batch = next(iter(ssd))
    assert batch["image"].shape == (2, 40, 50, 3) and (batch["image_size"] == [40, 50]).all()


def test_too_many_instances_raises(shapes_dir):
    with pytest.raises(ValueError, match=r"image \d+ has [2-9] instances .*max_instances=1;"):
        list(pipe(shapes_dir, False, max_instances=1))


@pytest.fixture
def mocked():
    """TFDS mock data, with the builder reporting itself prepared (mock data has no files)."""
    with contextlib.ExitStack() as stack:
        def use(**kwargs):
            stack.enter_context(
                mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True))
            stack.enter_context(tfds.testing.mock_data(**kwargs))
        yield use


COCO_LIKE = [  # (h, w), bbox, label, is_crowd
    ((50, 70), [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.4, 0.6, 0.4],
                [0.2, 0.1, 0.9, 0.3]], [0, 5, 6, 79], [False, True, False, False]),
    ((90, 40), [[0.5, 0.5, 1.0, 1.0]], [11], [False]),
]


def coco_like(builder, split, decoders=None, read_config=None, shuffle_files=False):
    """coco/2017 records (images still encoded, as the pipeline reads them)."""
    def examples():
        for i, (hw, bbox, label, crowd) in enumerate(COCO_LIKE):
            image = np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8)
            yield {"image": tf.io.encode_png(image).numpy(), "image/id": 1000 + i,
                   "objects": {"bbox": np.array(bbox, np.float32),
                               "label": np.array(label, np.int64),
                               "is_crowd": np.array(crowd)}}
    spec = {"image": tf.TensorSpec((), tf.string), "image/id": tf.TensorSpec((), tf.int64),
            "objects": {"bbox": tf.TensorSpec((None, 4), tf.float32),
                        "label": tf.TensorSpec((None,), tf.int64),
                        "is_crowd": tf.TensorSpec((None,), tf.bool)}}
    ds = tf.data.Dataset.from_generator(examples, output_signature=spec)
    return ds.apply(tf.data.experimental.assert_cardinality(len(COCO_LIKE)))


def test_coco_mock_crowd_degenerate_and_label_map(mocked):
    mocked(as_dataset_fn=coco_like)
    evaluation = fbd.detection_pipeline("coco/2017", batch_size=2, train=False,
                                        model="fasterrcnn_resnet50_fpn", min_size=64,
                                        max_size=96, label_map=fbd.COCO_CATEGORY_IDS,
                                        max_instances=3)
    assert evaluation.num_classes == 91 and "masks" not in evaluation.dataset.element_spec
    (batch,) = list(evaluation)
    assert batch["image_id"].tolist() == [1000, 1001]
    assert batch["original_size"].tolist() == [[50, 70], [90, 40]]
    assert batch["image_size"].tolist() == [[64, 89], [96, 42]]
    assert batch["image"].shape == (2, 96, 96, 3)  # buckets of 96 (rows) and 89 (cols)
    assert batch["instance_valid"].tolist() == [[True, True, False], [True, False, False]]
    assert batch["labels"].tolist() == [[1, 90, 0], [13, 0, 0]]  # crowd and x0 == x1 dropped
    scale = np.array([89 / 70, 64 / 50] * 2, np.float32)
    pixels = np.array([[14, 5, 42, 25], [7, 10, 21, 45]], np.float32)
    np.testing.assert_allclose(batch["boxes"][0, :2], pixels * scale, rtol=1e-6)
    offset = fbd.detection_pipeline("coco/2017", batch_size=2, train=True,
                                    model="fasterrcnn_resnet50_fpn", min_size=64, max_size=96)
    assert offset.num_classes == 81 and next(iter(offset))["labels"].max() <= 80


def test_coco_category_ids_are_torchvisions():
    from torchvision.models import _meta

    names = _meta._COCO_CATEGORIES
    assert fbd.COCO_CATEGORY_IDS == tuple(
        i for i, c in enumerate(names) if c not in ("__background__", "N/A"))


def test_not_a_detection_dataset(mocked):
    mocked(num_examples=2)
    with pytest.raises(ValueError, match=r"no \['objects/bbox', 'objects/label'\].*not a "
                                         r"detection dataset"):
        fbd.detection_pipeline("cifar10", batch_size=2, train=True, model="resnet50")


def test_bad_arguments(shapes_dir):
    with pytest.raises(ValueError, match="model=<name>"):
        fbd.detection_pipeline(INSTANCES, batch_size=2, train=True, data_dir=shapes_dir)


def coco_reader_like():
    """Decoded raw examples as flaxbones.data.coco.coco_dataset yields them (labels are
    category ids, crowd flagged, keypoints in pixels)."""
    def examples():
        for i, n in enumerate((2, 1, 3)):
            h, w = 40 + 8 * i, 60 - 4 * i
            masks = np.zeros((n, h, w), np.uint8)
            boxes, kps = [], np.zeros((n, 17, 3), np.float32)
            for k in range(n):
                y0, x0 = 4 + 6 * k, 5 + 7 * k
                masks[k, y0:y0 + 10, x0:x0 + 12] = 1
                boxes.append([y0 / h, x0 / w, (y0 + 10) / h, (x0 + 12) / w])
                kps[k, 1] = (x0 + 2, y0 + 3, 2)
            yield {"image": np.full((h, w, 3), 10 * i, np.uint8), "image/id": 7 + i,
                   "image/filename": f"{i}.jpg",
                   "objects": {"bbox": np.array(boxes, np.float32),
                               "label": np.array([1, 90, 44][:n], np.int64),
                               "is_crowd": np.arange(n) == 2, "mask": masks,
                               "keypoints": kps}}
    objects = {"bbox": tf.TensorSpec((None, 4), tf.float32),
               "label": tf.TensorSpec((None,), tf.int64),
               "is_crowd": tf.TensorSpec((None,), tf.bool),
               "mask": tf.TensorSpec((None, None, None), tf.uint8),
               "keypoints": tf.TensorSpec((None, 17, 3), tf.float32)}
    spec = {"image": tf.TensorSpec((None, None, 3), tf.uint8),
            "image/id": tf.TensorSpec((), tf.int64), "image/filename": tf.TensorSpec((), tf.string),
            "objects": objects}
    return tf.data.Dataset.from_generator(examples, output_signature=spec)


def test_stored_reader_output_with_keypoints(tmp_path):
    builder = detection.store_detection_dataset("coco_like", {"val": coco_reader_like()},
                                                str(tmp_path), masks=True, keypoints=17)
    again = detection.store_detection_dataset("coco_like", {"val": coco_reader_like()},
                                              str(tmp_path), masks=True, keypoints=17)
    assert again.data_dir == builder.data_dir  # prepared once, then found
    kwargs = {"builder": builder, "split": "val", "batch_size": 3, "model":
              "keypointrcnn_resnet50_fpn", "min_size": 80, "max_size": 160, "label_offset": 0,
              "max_instances": 4}
    (plain,) = list(fbd.detection_pipeline(train=False, **kwargs))
    flipped = next(iter(fbd.detection_pipeline(train=True, flip_prob=1.0, **kwargs)))
    assert plain["keypoints"].shape == (3, 4, 17, 3) and plain["masks"].shape[:2] == (3, 4)
    for batch, flip in ((plain, False), (flipped, True)):
        for j in range(3):
            i = int(batch["image_id"][j]) - 7
            n, w = (2, 1, 2)[i], batch["original_size"][j, 1]
            assert batch["instance_valid"][j].sum() == n  # the crowd instance dropped
            assert batch["labels"][j, :n].tolist() == [1, 90][:n]
            ratio = batch["image_size"][j] / batch["original_size"][j]
            for k in range(n):
                x, y = 5 + 7 * k + 2, 4 + 6 * k + 3
                index = 2 if flip else 1  # left eye <-> right eye
                expected = [(w - x if flip else x) * ratio[1], y * ratio[0], 2]
                np.testing.assert_allclose(batch["keypoints"][j, k, index], expected, rtol=1e-5)
                assert not batch["keypoints"][j, k, 3 - index].any()
                box = batch["boxes"][j, k]
                np.testing.assert_allclose(box, extents(batch["masks"][j, k]), atol=1.5)
