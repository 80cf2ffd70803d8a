"""The official COCO layout a user already has, read into the raw detection features.

    root/annotations/instances_val2017.json   (or person_keypoints_val2017.json)
    root/val2017/000000000139.jpg ...

    ds = coco_dataset(root, "val2017", with_masks=True)      # this host's share
    # {'image': uint8 (h, w, 3), 'image/id': int64, 'objects': {'bbox': (n, 4) float32
    #  normalised (ymin, xmin, ymax, xmax), 'label': (n,) int64 COCO category id,
    #  'is_crowd': (n,) bool, 'mask': (n, h, w) uint8, 'keypoints': (n, 17, 3) float32}}

The structure is TFDS's coco builder's ('image/id' and a nested 'objects'), so one pipeline
serves both. Labels ARE the category ids (torchvision's 91-id convention: 0 is never
used, detectors have 91 classes). Every annotation is kept (crowd ones flagged, boxes
clipped to the image, degenerate ones kept): dropping crowd and empty boxes for training
is the pipeline's choice, as torchvision's ConvertCocoPolysToMask. Training splits skip
images without usable annotations as torchvision's references do.
"""
import os

import jax
import numpy as np
import tensorflow as tf

from flaxbones.detection.coco_eval import load_annotations

KINDS = ("instances", "person_keypoints")
NUM_KEYPOINTS = 17
_MIN_KEYPOINTS_PER_IMAGE = 10


def annotation_path(root: str, split: str, kind: str = "instances") -> str:
    """root/annotations/{kind}_{split}.json."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose from {KINDS}")
    return os.path.join(os.fspath(root), "annotations", f"{kind}_{split}.json")


def has_valid_annotation(anns: list[dict]) -> bool:
    """torchvision references' _coco_remove_images_without_annotations rule: some
    annotation whose box is over 1 px on both sides; for keypoint annotations also at least
    10 visible keypoints in the image."""
    if not anns or all(any(s <= 1 for s in a["bbox"][2:]) for a in anns):
        return False
    if "keypoints" not in anns[0]:
        return True
    visible = sum(sum(1 for v in a["keypoints"][2::3] if v > 0) for a in anns)
    return visible >= _MIN_KEYPOINTS_PER_IMAGE


def image_ids(coco, remove_images_without_annotations: bool) -> list[int]:
    """The split's image ids in file order, optionally without unannotated images."""
    ids = [im["id"] for im in coco.dataset["images"]]
    if remove_images_without_annotations:
        ids = [i for i in ids if has_valid_annotation(coco.imgToAnns[i])]
    return ids


def shard(ids: list, index: int, count: int) -> list:
    """Host `index` of `count`'s near-equal contiguous part (none dropped, first ones
    larger by one), as tfds.split_for_jax_process(drop_remainder=False)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside [0, {count})")
    return [ids[i] for i in np.array_split(np.arange(len(ids)), count)[index]]


def image_features(coco, image_id: int, with_masks: bool = False,
                   with_keypoints: bool = False) -> dict:
    """One image's annotations as numpy arrays (the features less the image pixels)."""
    im = coco.imgs[image_id]
    h, w = int(im["height"]), int(im["width"])
    anns = coco.imgToAnns[image_id]
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    scale = np.array([h, w, h, w], np.float64)
    yxyx = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3],
                     xywh[:, 0] + xywh[:, 2]], axis=1) / scale
    objects = {"bbox": np.clip(yxyx, 0, 1).astype(np.float32),
               "label": np.array([a["category_id"] for a in anns], np.int64),
               "is_crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)}
    if with_masks:
        masks = [coco.annToMask(a) for a in anns]
        objects["mask"] = np.array(masks, np.uint8).reshape(len(anns), h, w)
    if with_keypoints:
        kps = [a.get("keypoints") or [0.0] * (3 * NUM_KEYPOINTS) for a in anns]
        objects["keypoints"] = np.array(kps, np.float32).reshape(len(anns), NUM_KEYPOINTS, 3)
    return {"image/id": np.int64(image_id), "objects": objects,
            "image/filename": im["file_name"], "image/size": np.array([h, w], np.int32)}


def coco_dataset(root: str, split: str, *, kind: str = "instances", with_masks: bool = False,
                 with_keypoints: bool | None = None, train: bool | None = None,
                 remove_images_without_annotations: bool | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 image_dir: str | None = None, annotation_file: str | None = None,
                 num_parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """This host's images of a COCO split as raw detection features, in file order.

    `kind` 'person_keypoints' reads the keypoints file (with_keypoints defaults to True
    there). `train` (default: split starts with 'train') sets the default of
    `remove_images_without_annotations`. The shard defaults to this process's
    (jax.process_index(), jax.process_count()). `image_dir` / `annotation_file` override
    root/{split} / root/annotations/{kind}_{split}.json.
    """
    annotation_file = annotation_file or annotation_path(root, split, kind)
    image_dir = os.fspath(image_dir or os.path.join(os.fspath(root), split))
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
    coco = load_annotations(annotation_file)
    train = split.startswith("train") if train is None else train
    remove = train if remove_images_without_annotations is None else (
        remove_images_without_annotations)
    with_keypoints = kind == "person_keypoints" if with_keypoints is None else with_keypoints
    if shard_index is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    ids = shard(image_ids(coco, remove), shard_index, shard_count or 1)
    objects = {"bbox": tf.TensorSpec((None, 4), tf.float32),
               "label": tf.TensorSpec((None,), tf.int64),
               "is_crowd": tf.TensorSpec((None,), tf.bool)}
    if with_masks:
        objects["mask"] = tf.TensorSpec((None, None, None), tf.uint8)
    if with_keypoints:
        objects["keypoints"] = tf.TensorSpec((None, NUM_KEYPOINTS, 3), tf.float32)
    signature = {"image/id": tf.TensorSpec((), tf.int64), "objects": objects,
                 "image/filename": tf.TensorSpec((), tf.string),
                 "image/size": tf.TensorSpec((2,), tf.int32)}

    def generate():
        for i in ids:
            yield image_features(coco, i, with_masks, with_keypoints)

    def decode(example):
        path = tf.strings.join([image_dir, example.pop("image/filename")], os.sep)
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        size = example.pop("image/size")
        check = tf.debugging.Assert(tf.reduce_all(tf.shape(image)[:2] == size),
                                    ["image size differs from the annotation file's:", path,
                                     tf.shape(image), size])
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        return {"image": tf.ensure_shape(image, (None, None, 3)), **example}

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(ids)))
    return ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True)


def categories(root: str, split: str, kind: str = "instances") -> dict[int, str]:
    """Category id -> name of a split's annotation file."""
    coco = load_annotations(annotation_path(root, split, kind))
    return {int(c["id"]): c["name"] for c in coco.dataset["categories"]}


SPLITS = {"train": "train2017", "validation": "val2017"}


def store_coco(root: str, data_dir: str, *, kind: str = "instances", with_masks: bool = True,
               splits: dict | None = None):
    """The official layout under `root` written once as the TFDS dataset `coco_{kind}`
    (`coco_{kind}_boxes` without masks, so the two never stand in for each other; splits
    'train' and 'validation' from train2017 / val2017, or `splits`) in `data_dir`,
    so `detection_pipeline("coco_instances", data_dir=...)` and experiment configs read it
    like any prepared dataset: host splits, shuffling and exact resume included. Labels are
    the category ids (label_offset=0). A second call finds it there and returns at once."""
    from flaxbones.data.detection import store_detection_dataset

    splits = splits or SPLITS
    names = categories(root, next(iter(splits.values())), kind)
    label_names = [names.get(i, "background" if i == 0 else f"unused_{i}")
                   for i in range(max(names) + 1)]
    with_keypoints = kind == "person_keypoints"
    datasets = {name: coco_dataset(root, split, kind=kind, with_masks=with_masks,
                                   with_keypoints=with_keypoints, shard_index=0, shard_count=1,
                                   train=name == "train")
                for name, split in splits.items()}
    name = f"coco_{kind}" if with_masks else f"coco_{kind}_boxes"
    return store_detection_dataset(name, datasets, data_dir, masks=with_masks,
                                   keypoints=NUM_KEYPOINTS if with_keypoints else None,
                                   label_names=label_names)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m flaxbones.data.coco",
        description="Store an official COCO layout (root/annotations, root/train2017, "
                    "root/val2017) as the TFDS dataset coco_<kind> in data_dir, once.")
    parser.add_argument("root")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--kind", default="instances", choices=KINDS)
    parser.add_argument("--no_masks", action="store_true",
                        help="boxes only (smaller), stored as coco_<kind>_boxes")
    args = parser.parse_args(argv)
    builder = store_coco(args.root, os.path.expanduser(args.data_dir), kind=args.kind,
                         with_masks=not args.no_masks)
    print(f"{builder.info.full_name} in {builder.data_dir}: "
          + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
    main()
