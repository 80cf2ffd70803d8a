"""Image classification batches from TFDS: {'image': float32 (N, S, S, 3), 'label': int32 (N,),
'valid': bool (N,)}.

Train: random-resized-crop (area `crop_scale`, aspect 3/4-4/3) to S, random flip.
Eval: resize the shorter side to S / crop_fraction, central S x S crop.
Images are normalised with the model's weight-source mean/std or explicit ones.
"""
from collections.abc import Sequence

import tensorflow as tf
from jax.sharding import Mesh

from flaxbones.data import pipeline, sources, transforms


def classification_pipeline(name: str = "flaxbones_shapes", split: str | None = None, *,
                            batch_size: int, train: bool, image_size: int = 224,
                            data_dir: str | None = None, model: str | None = None,
                            mean: Sequence[float] | None = None,
                            std: Sequence[float] | None = None,
                            crop_scale: tuple[float, float] = (0.08, 1.0),
                            crop_fraction: float = 0.875, mesh: Mesh | None = None,
                            seed: int = 0, cache: bool = False,
                            shuffle_buffer: int = 10_000, process_index: int | None = None,
                            process_count: int | None = None, start_batch: int = 0,
                            spec: sources.DatasetSpec | None = None) -> pipeline.Pipeline:
    """A `Pipeline` of classification batches of TFDS dataset `name`.

    Batches: 'image' float32 (N, S, S, 3) normalised, 'label' int32 (N,), 'valid' bool
    (N,). Train: random-resized-crop (area `crop_scale`, aspect 3/4-4/3) to S, random
    flip; an endless, exactly resumable stream. Eval: the shorter side resized to
    S / crop_fraction, the central S x S crop; one pass over the split, every example
    once, padding `valid=False`.

    Args:
        name: The TFDS dataset ('flaxbones_shapes', 'cifar10', 'imagenet2012', ...).
        split: The TFDS split; None: the dataset's train or eval split.
        batch_size: The global batch size (all hosts).
        train: A shuffled, augmented, endless training stream, else one eval pass.
        image_size: The side S of the square images.
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
        crop_scale: The area range of the random-resized crop.
        crop_fraction: The eval crop's fraction of the resized shorter side.
        spec: Feature keys and splits of a dataset flaxbones does not list.

    Returns:
        The `Pipeline` (iterate it; `len()` in eval, `steps_per_epoch` in training).

    Raises:
        DatasetNotPreparedError: The dataset is not prepared in `data_dir` (the message
            says how to prepare it; only the built-in dataset is generated).
        ValueError: Normalisation not given (neither `model` nor mean and std), a
            `batch_size` not divisible by the hosts or the mesh's devices, or an unknown
            dataset name (TFDS's).
            Also a dataset without image-level labels.
    """
    spec = spec or sources.dataset_spec(name)
    if spec.label_key is None:
        raise ValueError(f"dataset {name!r} has no image-level labels; "
                         "use segmentation_pipeline")
    mean, std = pipeline.normalization(model, mean, std)
    builder = sources.load_builder(name, data_dir)
    split = split or (spec.train_split if train else spec.eval_split)

    def preprocess(example, seed):
        image = example[spec.image_key]
        if train:
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            image = transforms.random_resized_crop(image, image_size, crop_seed, crop_scale)
            (image,) = transforms.random_flip(flip_seed, image)
        else:
            image = transforms.resize_center_crop(image, image_size, crop_fraction)
        image = tf.ensure_shape(transforms.normalize(image, mean, std), (image_size, image_size, 3))
        return {"image": image, "label": tf.cast(example[spec.label_key], tf.int32)}

    num_classes = builder.info.features[spec.label_key].num_classes
    return pipeline.build(builder, split, (spec.image_key, spec.label_key), preprocess,
                          batch_size=batch_size, train=train, pad_values={},
                          num_classes=num_classes, mesh=mesh, seed=seed, cache=cache,
                          shuffle_buffer=shuffle_buffer, process_index=process_index,
                          process_count=process_count, start_batch=start_batch)
