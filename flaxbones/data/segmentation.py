"""Semantic segmentation batches from TFDS: {'image': float32 (N, H, W, 3),
'segmentation': int32 (N, H, W) with IGNORE_LABEL (255) where there is no label,
'valid': bool (N,)}.

Train: random scale in `scale_range` (0.5-2.0), pad to at least the crop (image with 0
= the mean colour after normalisation, labels with 255), random `crop_size` crop, flip.
Eval: the full image, shrunk only if larger than `eval_size`, padded to it with 255
labels, so padding never counts in a metric that skips 255.
"""
import tensorflow as tf

from flaxbones.data import pipeline, sources, transforms


def segmentation_pipeline(name: str = "flaxbones_shapes", split: str | None = None, *,
                          batch_size: int, train: bool, crop_size=None, eval_size=None,
                          scale_range=(0.5, 2.0), data_dir: str | None = None,
                          model: str | None = None, mean=None, std=None, mesh=None,
                          seed: int = 0, cache: bool = False, shuffle_buffer: int = 1_000,
                          process_index: int | None = None, process_count: int | None = None,
                          start_batch: int = 0,
                          spec: sources.DatasetSpec | None = None) -> pipeline.Pipeline:
    """A `Pipeline` of segmentation batches of TFDS dataset `name` (see module docstring).

    `crop_size` / `eval_size` are ints or (h, w); both default to the dataset's image
    size when it is fixed (the built-in dataset, Cityscapes), `eval_size` else to
    `crop_size`. `batch_size` is global. Training shuffles within pieces of
    `shuffle_buffer` records and resumes exactly at `start_batch` (`pipeline.build`).
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
