"""Semantic segmentation batches from TFDS: {'image': float32 (N, H, W, 3),
'segmentation': int32 (N, H, W) with IGNORE_LABEL (255) where there is no label,
'valid': bool (N,)}.

Train: random scale in `scale_range` (0.5-2.0), pad to at least the crop (image with 0
= the mean colour after normalisation, labels with 255), random `crop_size` crop, flip.
Eval: the full image, shrunk only if larger than `eval_size`, padded to it with 255
labels, so padding never counts in a metric that skips 255.
"""
from collections.abc import Sequence

import tensorflow as tf
from jax.sharding import Mesh

from flaxbones.data import pipeline, sources, transforms


def segmentation_pipeline(name: str = "flaxbones_shapes", split: str | None = None, *,
                          batch_size: int, train: bool,
                          crop_size: int | tuple[int, int] | None = None,
                          eval_size: int | tuple[int, int] | None = None,
                          scale_range: tuple[float, float] = (0.5, 2.0),
                          data_dir: str | None = None, model: str | None = None,
                          mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None, mesh: Mesh | None = None,
                          seed: int = 0, cache: bool = False, shuffle_buffer: int = 1_000,
                          process_index: int | None = None, process_count: int | None = None,
                          start_batch: int = 0,
                          spec: sources.DatasetSpec | None = None) -> pipeline.Pipeline:
    """A `Pipeline` of semantic segmentation batches of TFDS dataset `name`.

    Batches: 'image' float32 (N, H, W, 3) normalised, 'segmentation' int32 (N, H, W) with
    `IGNORE_LABEL` (255) where there is no label, 'valid' bool (N,). Train: random scale
    in `scale_range`, pad to at least the crop (image with 0, the mean colour after
    normalisation; labels with 255), random crop, flip. Eval: the full image, shrunk
    only if larger than `eval_size`, padded to it with 255 labels, so padding never
    counts in a metric that skips 255.

    Args:
        name: The TFDS dataset ('flaxbones_shapes', 'oxford_iiit_pet', 'cityscapes', ...).
        split: The TFDS split; None: the dataset's train or eval split.
        batch_size: The global batch size (all hosts).
        train: A shuffled, augmented, endless training stream, else one eval pass.
        crop_size: The training crop, an int or (h, w); None: the dataset's fixed image
            size.
        eval_size: The eval size, an int or (h, w); None: the dataset's fixed image
            size, else `crop_size`.
        scale_range: The training scale range.
        data_dir: The TFDS data directory the dataset is prepared in (None: TFDS's
            default).
        model: A registered model name whose weight source gives mean and std.
        mean: Per-channel mean on the [0, 1] scale (with `std`), instead of `model`'s.
        std: Per-channel standard deviation on the [0, 1] scale.
        mesh: Yield global jax.Arrays split over every axis of this mesh; None: numpy
            arrays of this host's part.
        seed: The seed of the shuffle and the augmentations (with the host index).
        cache: Keep the undecoded records in memory after their first read.
        shuffle_buffer: Training shuffles within pieces of this many records.
        process_index: This host's index (None: `jax.process_index()`).
        process_count: The number of hosts (None: `jax.process_count()`).
        start_batch: Resume a training stream exactly after this many batches, decoding
            nothing it skips.
        spec: Feature keys, classes and label map of a dataset flaxbones does not list.

    Returns:
        The `Pipeline`; its `num_classes` is the dataset's class count when known.

    Raises:
        DatasetNotPreparedError: The dataset is not prepared in `data_dir` (the message
            says how to prepare it; only the built-in dataset is generated).
        ValueError: Normalisation not given (neither `model` nor mean and std), a
            `batch_size` not divisible by the hosts or the mesh's devices, or an unknown
            dataset name (TFDS's).
            Also a dataset without known segmentation masks, or no size where the
            images vary in size.
    """
    spec = spec or sources.dataset_spec(name)
    if spec.segmentation_key is None:
        raise ValueError(f"dataset {name!r} has no segmentation masks flaxbones knows of; "
                         "pass spec=DatasetSpec(segmentation_key=...)")
    mean, std = pipeline.normalization(model, mean, std)
    builder = sources.load_builder(name, data_dir)
    split = split or (spec.train_split if train else spec.eval_split)
    native = tuple(builder.info.features[spec.image_key].shape[:2])
    native = None if None in native else native
    size = (_pair(crop_size or native, "crop_size") if train
            else _pair(eval_size or native or crop_size, "eval_size"))
    table = spec.label_table()
    ignore = sources.IGNORE_LABEL

    def preprocess(example, seed):
        image = transforms.normalize(example[spec.image_key], mean, std)
        mask = example[spec.segmentation_key]
        mask = tf.image.resize(mask, tf.shape(image)[:2], method="nearest")  # no-op on real data
        mask = transforms.map_labels(mask, table, ignore) if table else tf.cast(mask, tf.int32)
        if train:
            scale_seed, crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(seed, 3))
            image, mask = transforms.random_scale(image, mask, scale_seed, scale_range)
            image, mask = transforms.pad_to_at_least(image, mask, size, ignore)
            image, mask = transforms.random_crop(image, mask, size, crop_seed)
            image, mask = transforms.random_flip(flip_seed, image, mask)
        else:
            image, mask = transforms.fit_and_pad(image, mask, size, ignore)
        return {"image": tf.ensure_shape(image, (*size, 3)),
                "segmentation": tf.ensure_shape(mask[..., 0], size)}

    return pipeline.build(builder, split, (spec.image_key, spec.segmentation_key), preprocess,
                          batch_size=batch_size, train=train, pad_values={"segmentation": ignore},
                          num_classes=len(spec.segmentation_classes) or None, mesh=mesh,
                          seed=seed, cache=cache, shuffle_buffer=shuffle_buffer,
                          process_index=process_index, process_count=process_count,
                          start_batch=start_batch)


def _pair(size, what):
    if size is None:
        raise ValueError(f"images of this dataset vary in size; pass {what}=(h, w)")
    return (size, size) if isinstance(size, int) else tuple(size)
