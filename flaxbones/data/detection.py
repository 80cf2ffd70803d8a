"""Detection and instance-segmentation batches from raw TFDS examples, in the frame the
detectors see (the batch contract of `train.Detection`).

Raw examples: 'image' uint8 (h, w, 3), 'image/id' int64, 'objects/bbox' (n, 4) normalised
(ymin, xmin, ymax, xmax), 'objects/label' (n,), optional 'objects/is_crowd' (n,),
'objects/mask' (n, h, w) uint8, 'objects/keypoints' (n, K, 3) float32 pixels; 'objects'
nested (a TFDS Sequence, as coco/2017 and flaxbones_shapes/instances) or flat keys.

Per example, as torchvision's detection references and GeneralizedRCNNTransform: crowd
instances and boxes without width or height (after clipping to the image) are dropped;
labels + `label_offset` (0 = background) or through `label_map`; in training a horizontal
flip (boxes, masks, keypoints through the flip map; keypoints of visibility 0 become 0)
and, with several `min_size`, a random one per image; normalise, then resize by the
detector's rule (`detection.transform.resized_shape`: bilinear image, torch-nearest masks,
boxes and keypoints times new / old size) or to `fixed_size`; zero-pad.

Batches (B = batch, G = max_instances, H x W a size bucket):
    'image'          float32 (B, H, W, 3)  normalised, zero beyond 'image_size'
    'image_size'     int32 (B, 2)          (h, w) after resize
    'original_size'  int32 (B, 2)          (h, w) of the raw image
    'image_id'       int64 (B,)            'image/id' (-1 for padding examples)
    'boxes'          float32 (B, G, 4)     xyxy pixels of the resized image
    'labels'         int32 (B, G)
    'instance_valid' bool (B, G)
    'masks'          uint8 (B, G, H, W)    when the dataset has masks
    'keypoints'      float32 (B, G, K, 3)  (x, y, visibility) when it has keypoints
    'valid'          bool (B,)             False for the padding of the last eval batches
H and W are `transform.padded_size`'s buckets (the ones `detection.preprocess` uses) of the
batch's largest image, so a step compiles a bounded number of times; `pad_size=(H, W)`
fixes one. More than G instances in an image is an error naming the image, never a drop.

Raw examples that are not a TFDS dataset (`flaxbones.data.coco.coco_dataset`'s tf.data
output) are written once as one with `store_detection_dataset`, then read as any other.
"""
import dataclasses
import re
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from flaxbones.data import pipeline, sources
from flaxbones.data.stored import store

# TFDS coco/2017's 80 contiguous labels -> the 91-category ids of torchvision's detectors.
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                     23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
                     46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
                     65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
                     89, 90)
"""TFDS coco/2017's 80 contiguous labels -> the 91-category ids of torchvision's detectors:
`detection_pipeline(..., label_map=COCO_CATEGORY_IDS)`."""
# COCO person keypoints: left <-> right (torchvision references' _flip_coco_person_keypoints).
COCO_PERSON_KEYPOINT_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
"""COCO person keypoints' left <-> right permutation under a horizontal flip (torchvision
references' `_flip_coco_person_keypoints`): `detection_pipeline`'s default for 17
keypoints."""

_REQUIRED = ("image", "objects/bbox", "objects/label")
_OPTIONAL = ("image/id", "objects/is_crowd", "objects/mask", "objects/keypoints")
_TOO_MANY = r"image -?\d+ has \d+ instances[^\]\"'\n]*"
# bound once: at interpreter exit an unfinished iterator is closed after TensorFlow's lazy
# attributes are torn down, and `except tf.errors...` would itself fail there
_INVALID_ARGUMENT = tf.errors.InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class DetectionPipeline(pipeline.Pipeline):
    """A `Pipeline` of detection batches.

    An image with more than `max_instances` instances surfaces as a ValueError naming it
    during iteration, never as a silent drop.
    """

    def __iter__(self):
        try:
            yield from super().__iter__()
        except _INVALID_ARGUMENT as error:
            match = re.search(_TOO_MANY, error.message)
            if match is None:
                raise
            raise ValueError(match.group(0)) from None


def detection_pipeline(name: str = "flaxbones_shapes/instances", split: str | None = None, *,
                       batch_size: int, train: bool, model: str | None = None,
                       min_size: int | Sequence[int] | None = None,
                       max_size: int | None = None, fixed_size: tuple[int, int] | None = None,
                       size_divisible: int | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       size_buckets: int | None = 8,
                       pad_size: int | tuple[int, int] | None = None,
                       max_instances: int = 100, label_offset: int = 1,
                       label_map: Sequence[int] | None = None,
                       masks: bool | None = None, keypoints: bool | None = None,
                       keypoint_flip_map: Sequence[int] | None = None, flip_prob: float = 0.5,
                       data_dir: str | None = None,
                       builder: tfds.core.DatasetBuilder | None = None,
                       mesh: Mesh | None = None, seed: int = 0,
                       cache: bool = False, shuffle_buffer: int = 1_000,
                       process_index: int | None = None, process_count: int | None = None,
                       start_batch: int = 0) -> DetectionPipeline:
    """A `DetectionPipeline` of TFDS dataset `name` (or a prepared `builder`).

    Batches (B = batch, G = max_instances, H x W a size bucket): 'image' float32
    (B, H, W, 3) normalised, zero beyond 'image_size'; 'image_size' int32 (B, 2) (h, w)
    after resize; 'original_size' int32 (B, 2); 'image_id' int64 (B,) (-1 for padding);
    'boxes' float32 (B, G, 4) xyxy pixels of the resized image; 'labels' int32 (B, G);
    'instance_valid' bool (B, G); 'masks' uint8 (B, G, H, W) and 'keypoints' float32
    (B, G, K, 3) when used; 'valid' bool (B,). H and W are the padded-size buckets of
    the batch's largest image, so a step compiles a bounded number of times. Crowd
    instances and empty boxes are dropped, as in torchvision's references.

    Args:
        name: The TFDS dataset with 'image', 'objects/bbox' and 'objects/label'
            (e.g. 'flaxbones_shapes/instances', 'coco/2017').
        split: The TFDS split; None: 'train', or the first of validation / test.
        batch_size: The global batch size (all hosts).
        train: A shuffled, flipped, endless training stream, else one eval pass.
        model: A registered detector whose resize rule and normalisation to use
            (`flaxbones.detection.transform_settings`); None: pass mean and std
            (min_size 800, max_size 1333, size_divisible 32 then).
        min_size: The shorter side's target; a tuple draws one per training image
            (multi-scale training), evaluation uses the last.
        max_size: The longer side's cap.
        fixed_size: Resize every image to this (w, h) instead (SSD's rule).
        size_divisible: Pad sides to a multiple of this.
        mean: Per-channel mean on the [0, 1] scale, overriding the model's.
        std: Per-channel standard deviation on the [0, 1] scale.
        size_buckets: The number of padded-size buckets per axis.
        pad_size: Pad every batch to this int or (H, W) instead of a bucket.
        max_instances: G, the instances per image the batch holds.
        label_offset: Added to the raw 0-based labels (1: background is 0).
        label_map: A sequence mapping raw label -> class id (e.g. `COCO_CATEGORY_IDS`),
            replacing `label_offset`.
        masks: Include instance masks; None: when the dataset has them.
        keypoints: Include keypoints; None: when the dataset has them.
        keypoint_flip_map: The keypoint permutation of a horizontal flip (default
            `COCO_PERSON_KEYPOINT_FLIP` for 17 keypoints).
        flip_prob: The training flip probability.
        data_dir: The TFDS data directory the dataset is prepared in.
        builder: A prepared TFDS builder to read instead of loading `name`.
        mesh: Yield global jax.Arrays split over every axis of this mesh; with several
            hosts every batch is padded to the largest bucket unless `pad_size` is set.
        seed: The seed of the shuffle and the augmentations.
        cache: Keep the undecoded records in memory after their first read.
        shuffle_buffer: Training shuffles within pieces of this many records.
        process_index: This host's index (None: `jax.process_index()`).
        process_count: The number of hosts (None: `jax.process_count()`).
        start_batch: Resume a training stream exactly after this many batches.

    Returns:
        The `DetectionPipeline`.

    Raises:
        DatasetNotPreparedError: The dataset is not prepared in `data_dir`.
        ValueError: A dataset without the detection features (or the masks /
            keypoints asked for), keypoints to flip without a matching flip map,
            `max_instances` < 1, missing or invalid normalisation, a `batch_size` not
            divisible by the hosts or devices; during iteration, an image with more
            than `max_instances` instances.
    """
    builder = builder or sources.load_builder(name, data_dir)
    name = builder.info.full_name
    split = split or ("train" if train else _eval_split(builder))
    raw = _raw_features(builder.info.features)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"dataset {name!r} has no {missing} features, so it is not a detection "
                         f"dataset (it has {sorted(raw)}); detection needs 'image', "
                         "'objects/bbox' and 'objects/label'")
    use_masks = "objects/mask" in raw if masks is None else masks
    use_keypoints = "objects/keypoints" in raw if keypoints is None else keypoints
    for wanted, key in ((use_masks, "objects/mask"), (use_keypoints, "objects/keypoints")):
        if wanted and key not in raw:
            raise ValueError(f"dataset {name!r} has no {key!r} feature")
    num_keypoints = raw["objects/keypoints"].shape[-2] if use_keypoints else None
    flip_map = keypoint_flip_map
    if use_keypoints and flip_map is None and num_keypoints == 17:
        flip_map = COCO_PERSON_KEYPOINT_FLIP
    if use_keypoints and train and flip_prob > 0 and (
            flip_map is None or len(flip_map) != num_keypoints):
        raise ValueError(f"flipping {num_keypoints} keypoints needs keypoint_flip_map with "
                         f"{num_keypoints} entries, got {flip_map}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")

    settings = _settings(model, min_size=min_size, max_size=max_size, fixed_size=fixed_size,
                         size_divisible=size_divisible, mean=mean, std=std)
    count = jax.process_count() if process_count is None else process_count
    buckets = _bucket_table(settings, size_buckets)
    if pad_size is not None:
        pad_size = (pad_size, pad_size) if isinstance(pad_size, int) else tuple(pad_size)
        static = pad_size
    else:
        static = (int(buckets[0][-1]), int(buckets[1][-1]))
    table = None if label_map is None else [int(v) for v in label_map]
    if table is not None:
        num_classes = max(table) + 1
    else:
        label = raw["objects/label"]
        num_classes = (label.num_classes + label_offset
                       if isinstance(label, tfds.features.ClassLabel) else None)
    preprocess = _preprocess(train, keys=[k for k in (*_REQUIRED, *_OPTIONAL) if k in raw],
                             settings=settings, static=static, max_instances=max_instances,
                             label_offset=label_offset, table=table, masks=use_masks,
                             keypoints=num_keypoints, flip_map=flip_map, flip_prob=flip_prob,
                             check_fit=pad_size is not None)
    tops = sorted({k if k in builder.info.features else k.split("/")[0]
                   for k in (*_REQUIRED, *_OPTIONAL) if k in raw})
    pipe = pipeline.build(builder, split, tops, preprocess, batch_size=batch_size, train=train,
                          pad_values={"image_id": -1}, num_classes=num_classes, mesh=mesh,
                          seed=seed, cache=cache, shuffle_buffer=shuffle_buffer,
                          process_index=process_index, process_count=process_count,
                          start_batch=start_batch)
    dataset = pipe.dataset
    if pad_size is None and count == 1:
        dataset = dataset.map(_crop_to_bucket(buckets), num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True).prefetch(tf.data.AUTOTUNE)
    fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe)}
    return DetectionPipeline(**{**fields, "dataset": dataset})


def _eval_split(builder):
    splits = builder.info.splits
    return next((s for s in ("validation", "test") if s in splits), "train")


def _raw_features(features) -> dict:
    """Flat 'a/b' paths of the top-level features and of the fields of Sequence({...})."""
    flat = {}
    for key, feature in features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, tfds.features.Sequence) and isinstance(
                inner, tfds.features.FeaturesDict):
            flat.update({f"{key}/{k}": f for k, f in inner.items()})
        else:
            flat[key] = feature
    return flat


def _flatten(example) -> dict:
    flat = {}
    for key, value in example.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _settings(model, **given) -> dict:
    """The detector's transform settings (`detection.transform_settings`) with `given`."""
    from flaxbones.detection import transform_settings

    given = {k: v for k, v in given.items() if v is not None}
    if model is None:
        pipeline.normalization(None, given.get("mean"), given.get("std"))  # both, or an error
    settings = transform_settings(model, **given)
    pipeline.normalization(mean=settings["mean"], std=settings["std"])  # validates
    sizes = settings["min_size"]
    settings["min_size"] = tuple(sizes) if isinstance(sizes, (tuple, list)) else (sizes,)
    return settings


def _bucket_table(settings, size_buckets):
    """Per axis, padded length for every resized length 0..largest (`transform.padded_size`);
    the last entry is the largest bucket."""
    from flaxbones.detection.transform import padded_size

    fixed = settings.get("fixed_size")
    d = settings.get("size_divisible", 32)
    if fixed is not None:
        return tuple(np.array([padded_size(s, 0, 0, d, None) for s in range(int(side) + 1)])
                     for side in (fixed[1], fixed[0]))
    lo, hi = settings["min_size"][-1], settings["max_size"]
    table = np.array([padded_size(s, lo, hi, d, size_buckets) for s in range(int(hi) + 1)])
    return table, table


def _crop_to_bucket(buckets):
    """Cut a batch padded to the largest bucket down to its largest image's bucket."""
    rows, cols = (tf.constant(b, tf.int32) for b in buckets)

    def crop(batch):
        hw = tf.reduce_max(batch["image_size"], 0)
        h, w = tf.gather(rows, hw[0]), tf.gather(cols, hw[1])
        batch = {**batch, "image": batch["image"][:, :h, :w]}
        if "masks" in batch:
            batch["masks"] = batch["masks"][:, :, :h, :w]
        return batch

    return crop


def _resized_shape(h, w, settings, seed):
    """`transform.resized_shape` in float64 graph ops; a random min_size of several in
    training (seed), the last in evaluation."""
    fixed = settings.get("fixed_size")
    if fixed is not None:
        return tf.constant(int(fixed[1])), tf.constant(int(fixed[0]))
    sizes = tf.constant(settings["min_size"], tf.float64)
    if seed is None:
        min_size = sizes[-1]
    else:
        index = tf.random.stateless_uniform((), seed, 0, len(settings["min_size"]), tf.int32)
        min_size = sizes[index]
    h64, w64 = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    scale = tf.minimum(min_size / tf.minimum(h64, w64),
                       tf.constant(float(settings["max_size"]), tf.float64) / tf.maximum(h64, w64))
    return (tf.cast(tf.floor(h64 * scale), tf.int32), tf.cast(tf.floor(w64 * scale), tf.int32))


def _nearest(masks, size):
    """(n, h, w) masks resized as torch's legacy 'nearest': source = floor(dst * in / out)."""
    def index(out, inp):
        scale = tf.cast(inp, tf.float32) / tf.cast(out, tf.float32)
        src = tf.cast(tf.floor(tf.cast(tf.range(out), tf.float32) * scale), tf.int32)
        return tf.minimum(src, inp - 1)

    shape = tf.shape(masks)
    masks = tf.gather(masks, index(size[0], shape[1]), axis=1)
    return tf.gather(masks, index(size[1], shape[2]), axis=2)


def flip_keypoints(keypoints, width, flip_map):
    """torchvision references' keypoint flip: reorder by `flip_map`, x -> width - x, and a
    keypoint of visibility 0 becomes (0, 0, 0)."""
    flipped = tf.gather(keypoints, list(flip_map), axis=1)
    flipped = tf.concat([width - flipped[..., :1], flipped[..., 1:]], -1)
    return tf.where(flipped[..., 2:] == 0, tf.zeros_like(flipped), flipped)


def _preprocess(train, *, keys, settings, static, max_instances, label_offset, table, masks,
                keypoints, flip_map, flip_prob, check_fit):
    mean, std = (tf.constant(settings[k], tf.float32) for k in ("mean", "std"))
    g = max_instances
    message = ("image {} has {} instances (after dropping crowd and degenerate boxes), more "
               f"than max_instances={g}; pass a larger max_instances")

    def preprocess(example, seed):
        ex = _flatten(example)
        image = ex["image"]
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        image_id = tf.cast(ex["image/id"], tf.int64) if "image/id" in keys else tf.constant(
            -1, tf.int64)
        y0, x0, y1, x1 = tf.unstack(tf.clip_by_value(
            tf.reshape(tf.cast(ex["objects/bbox"], tf.float32), (-1, 4)), 0.0, 1.0), axis=1)
        boxes = tf.stack([x0 * wf, y0 * hf, x1 * wf, y1 * hf], 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "objects/is_crowd" in keys:
            keep &= ~tf.cast(ex["objects/is_crowd"], tf.bool)
        labels = tf.cast(ex["objects/label"], tf.int32)
        labels = (tf.gather(tf.constant(table, tf.int32), labels) if table is not None
                  else labels + label_offset)
        target = {"boxes": boxes, "labels": labels}
        if masks:
            m = ex["objects/mask"]
            target["masks"] = tf.cast(m[..., 0] if m.shape.rank == 4 else m, tf.uint8)
        if keypoints:
            target["keypoints"] = tf.cast(ex["objects/keypoints"], tf.float32)
        target = {k: tf.boolean_mask(v, keep) for k, v in target.items()}
        n = tf.shape(target["labels"])[0]
        check = tf.debugging.Assert(n <= g, [tf.strings.format(message, (image_id, n))])
        with tf.control_dependencies([check]):
            n = tf.identity(n)

        if train:
            size_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            if flip_prob > 0:
                image, target = _random_flip(image, target, wf, flip_seed, flip_prob, flip_map)
        else:
            size_seed = None
        image = (tf.cast(image, tf.float32) / 255.0 - mean) / std
        rh, rw = _resized_shape(h, w, settings, size_seed)
        image = tf.image.resize(image, tf.stack([rh, rw]), method="bilinear")
        ratio_w = tf.cast(rw, tf.float32) / wf
        ratio_h = tf.cast(rh, tf.float32) / hf
        target["boxes"] = target["boxes"] * tf.stack([ratio_w, ratio_h, ratio_w, ratio_h])
        if keypoints:
            target["keypoints"] = target["keypoints"] * tf.stack([ratio_w, ratio_h, 1.0])
        if masks:
            target["masks"] = _nearest(target["masks"], (rh, rw))
        if check_fit:
            fits = tf.debugging.Assert((rh <= static[0]) & (rw <= static[1]), [tf.strings.format(
                "image {} resizes to {}x{}, larger than pad_size " + str(static),
                (image_id, rh, rw))])
            with tf.control_dependencies([fits]):
                image = tf.identity(image)

        out = {"image": tf.ensure_shape(tf.pad(image, [[0, static[0] - rh],
                                                         [0, static[1] - rw], [0, 0]]),
                                         (*static, 3)),
               "image_size": tf.stack([rh, rw]), "original_size": tf.stack([h, w]),
               "image_id": image_id, "instance_valid": tf.range(g) < n}
        for k, v in target.items():
            pads = [[0, g - n]] + [[0, 0]] * (v.shape.rank - 1)
            if k == "masks":
                pads = [[0, g - n], [0, static[0] - rh], [0, static[1] - rw]]
            out[k] = v = tf.pad(v, pads)
        out["boxes"] = tf.ensure_shape(out["boxes"], (g, 4))
        out["labels"] = tf.ensure_shape(out["labels"], (g,))
        if masks:
            out["masks"] = tf.ensure_shape(out["masks"], (g, *static))
        if keypoints:
            out["keypoints"] = tf.ensure_shape(out["keypoints"], (g, keypoints, 3))
        return out

    return preprocess


def _random_flip(image, target, width, seed, prob, flip_map):
    """Flip image and targets left-right with probability `prob` (before the resize)."""
    flip = tf.random.stateless_uniform((), seed) < prob
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    b = target["boxes"]
    flipped = {"boxes": tf.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)}
    if "masks" in target:
        flipped["masks"] = tf.reverse(target["masks"], [2])
    if "keypoints" in target:
        flipped["keypoints"] = flip_keypoints(target["keypoints"], width, flip_map)
    target = {**target, **{k: tf.cond(flip, lambda v=v: v, lambda k=k: target[k])
                           for k, v in flipped.items()}}
    return image, target


def store_detection_dataset(name: str, split_datasets: dict, data_dir: str, *,
                            masks: bool = False, keypoints: int | None = None,
                            label_names=None, version: str = "1.0.0"):
    """Write raw detection examples (e.g. `flaxbones.data.coco.coco_dataset`'s, one
    unsharded dataset per split) once as a TFDS dataset in `data_dir` (a later call finds
    it there) and return its builder for `detection_pipeline(builder=...)`: the host
    split, shuffled pieces and exact resume then work as for any TFDS dataset. Masks are
    stored zlib-compressed; `keypoints` = K per instance; `label_names` makes
    'objects/label' a ClassLabel."""
    label = (tfds.features.ClassLabel(names=list(label_names)) if label_names is not None
             else np.int64)
    objects = {"bbox": tfds.features.BBoxFeature(), "label": label, "is_crowd": np.bool_}
    if masks:
        objects["mask"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.ZLIB)
    if keypoints:
        objects["keypoints"] = tfds.features.Tensor(shape=(keypoints, 3), dtype=np.float32)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "image/id": np.int64,
        "objects": tfds.features.Sequence(objects)})
    keep = {"image", "image/id", "objects"}

    def raw(ds):
        def select(ex):
            ex = {k: v for k, v in ex.items() if k in keep}
            ex["objects"] = {k: v for k, v in ex["objects"].items() if k in objects}
            return ex
        return ds.map(select)

    return store(name, data_dir,
                 lambda: (features, {s: raw(ds) for s, ds in split_datasets.items()}),
                 version=version)
