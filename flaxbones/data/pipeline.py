"""Assembly shared by the pipelines: host split, shuffle/repeat or pad-and-mask, batch,
prefetch, and delivery as numpy batches or global jax.Arrays sharded over a mesh."""
import collections
import dataclasses

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxbones.data import sources


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """An iterable of batches (dicts of arrays, leading axis = global batch).

    `dataset` holds this host's part of each batch. With a `mesh`, iteration yields
    global jax.Arrays sharded over `data_axis` (two batches prefetched to devices);
    without, numpy arrays of this host's part. `num_batches` is the length of one
    eval pass (every example once, padding marked `valid=False`); a training stream
    is endless (None). `steps_per_epoch` = examples // global batch.
    """

    dataset: tf.data.Dataset
    batch_size: int
    num_examples: int
    num_batches: int | None
    num_classes: int | None
    mesh: Mesh | None = None
    data_axis: str = "data"

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def __len__(self):
        if self.num_batches is None:
            raise TypeError("a training pipeline is endless; use steps_per_epoch")
        return self.num_batches

    def __iter__(self):
        batches = self.dataset.as_numpy_iterator()
        if self.mesh is None:
            yield from batches
            return
        queue = collections.deque()
        for batch in batches:
            queue.append(to_global(batch, self.mesh, self.data_axis))
            if len(queue) == 2:
                yield queue.popleft()
        yield from queue


def to_global(batch: dict, mesh: Mesh, data_axis: str = "data") -> dict:
    """This host's part of a batch -> global jax.Arrays split over `data_axis` of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def normalization(model=None, mean=None, std=None):
    """(mean, std) on the [0, 1] scale: explicit values, else the weight source of `model`."""
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is None:
        if model is None:
            raise ValueError("say how to normalise images: model=<name> (its weight source's "
                             "mean/std) or explicit mean=(...), std=(...)")
        from flaxbones.registry import get_spec
        source = get_spec(model).weights
        if source is None:
            raise ValueError(f"model {model!r} has no weight source; pass mean and std")
        mean, std = source.mean, source.std
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std need 3 values (std > 0), got {mean}, {std}")
    return mean, std


def build(builder, split, keys, preprocess, *, batch_size, train, pad_values, num_classes,
          mesh=None, data_axis="data", seed=0, cache=False, shuffle_buffer=10_000,
          process_index=None, process_count=None, start_batch=0) -> Pipeline:
    """Read features `keys` of this host's part of `split`, map `preprocess(example, seed)`,
    batch. Images stay encoded through cache and shuffle buffer; they are decoded in the map.

    Train: shuffled files and examples, endless repeat, full batches; the stream is a
    function of `seed` alone, so `start_batch=n` resumes exactly after n batches. Eval: one pass in
    order, padded with `pad_values`-filled examples (`valid=False`) so that every host
    yields the same number of full batches and every example appears exactly once.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} hosts")
    if mesh is not None and batch_size % mesh.shape[data_axis]:
        raise ValueError(f"batch_size {batch_size} is not divisible by the mesh's "
                         f"{data_axis!r} axis of size {mesh.shape[data_axis]}")
    local = batch_size // count
    counts = sources.host_counts(builder, split, count)
    host_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])

    features = builder.info.features
    late = [k for k in keys if isinstance(features[k], tfds.features.Image)]
    decoders = tfds.decode.PartialDecoding(
        dict.fromkeys(keys, True), decoders={k: tfds.decode.SkipDecoding() for k in late})
    ds = builder.as_dataset(split=sources.host_split(split, index, count), shuffle_files=train,
                            decoders=decoders, read_config=tfds.ReadConfig(shuffle_seed=host_seed))

    def prepare(example, seed):
        example = {**example, **{k: features[k].decode_example(example[k]) for k in late}}
        return {**preprocess(example, seed), "valid": tf.constant(True)}

    if cache:
        ds = ds.cache()
    if train:
        ds = ds.shuffle(shuffle_buffer, seed=host_seed).repeat()
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=host_seed).batch(2))
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        num_batches = None
    else:
        ds = ds.map(lambda ex: prepare(ex, None), num_parallel_calls=tf.data.AUTOTUNE)
        num_batches = sources.eval_batches(counts, local)
        pad = {k: tf.fill(s.shape, tf.cast(pad_values.get(k, 0), s.dtype))
               for k, s in ds.element_spec.items()}
        pad["valid"] = tf.constant(False)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(
            num_batches * local - counts[index]))
    ds = ds.batch(local, drop_remainder=True)
    if train and start_batch:
        ds = ds.skip(start_batch)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return Pipeline(ds, batch_size, sum(counts), num_batches, num_classes, mesh, data_axis)

