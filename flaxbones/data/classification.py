"""Image classification batches from TFDS: {'image': float32 (N, S, S, 3), 'label': int32 (N,),
'valid': bool (N,)}.

Train: random-resized-crop (area `crop_scale`, aspect 3/4-4/3) to S, random flip.
Eval: resize the shorter side to S / crop_fraction, central S x S crop.
Images are normalised with the model's weight-source mean/std or explicit ones.
"""
import tensorflow as tf

from flaxbones.data import pipeline, sources, transforms


def classification_pipeline(name: str = "flaxbones_shapes", split: str | None = None, *,
                            batch_size: int, train: bool, image_size: int = 224,
                            data_dir: str | None = None, model: str | None = None, mean=None,
                            std=None, crop_scale=(0.08, 1.0), crop_fraction: float = 0.875,
                            mesh=None, seed: int = 0, cache: bool = False,
                            shuffle_buffer: int = 10_000, process_index: int | None = None,
                            process_count: int | None = None, start_batch: int = 0,
                            spec: sources.DatasetSpec | None = None) -> pipeline.Pipeline:
    """A `Pipeline` of classification batches of TFDS dataset `name` (see module docstring).

    `batch_size` is global (all hosts); `split` defaults to the dataset's train or eval
    split; `spec` overrides the feature keys of a dataset flaxbones does not list.
    Training shuffles within pieces of `shuffle_buffer` records and resumes exactly at
    `start_batch` without decoding what it skips (`pipeline.build`).
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
