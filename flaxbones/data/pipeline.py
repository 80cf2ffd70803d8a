"""Assembly shared by the pipelines: host split, a resumable shuffled epoch stream or one
padded eval pass, batch, prefetch, and delivery as numpy batches or global jax.Arrays."""
import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from flaxbones.data import sources
from flaxbones.train.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """An iterable of batches (dicts of arrays, leading axis = global batch).

    With a `mesh`, iteration yields global jax.Arrays sharded as the train steps expect
    (`flaxbones.train.batch_sharding`: split over every mesh axis; two batches prefetched
    to devices); without, numpy arrays of this host's part. An eval pipeline is one pass
    (every example once, padding marked `valid=False`); a training stream is endless.

    Attributes:
        dataset: The `tf.data.Dataset` of this host's part of each batch.
        batch_size: The global batch size.
        num_examples: The examples in the split (all hosts).
        num_batches: The length of one eval pass; None for a training stream.
        num_classes: The dataset's class count, when known.
        mesh: The mesh batches are sharded over, or None for numpy batches.
    """

    dataset: tf.data.Dataset
    batch_size: int
    num_examples: int
    num_batches: int | None
    num_classes: int | None
    mesh: Mesh | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per epoch: num_examples // batch_size."""
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
            queue.append(to_global(batch, self.mesh))
            if len(queue) == 2:
                yield queue.popleft()
        yield from queue


def to_global(batch: dict, mesh: Mesh) -> dict:
    """This host's part of a batch -> global jax.Arrays with the train steps' batch sharding.

    Args:
        batch: A flat dict of this host's numpy arrays (equal leading sizes on every
            host).
        mesh: The training mesh.

    Returns:
        The dict of global `jax.Array`s, split over every mesh axis.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def normalization(model: str | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the [0, 1] scale: explicit values, else the weight source of `model`.

    Args:
        model: A registered model name whose weight source gives mean and std.
        mean: Three per-channel means (with `std`).
        std: Three per-channel standard deviations, > 0.

    Returns:
        (mean, std), tuples of three floats.

    Raises:
        ValueError: Only one of mean and std, neither them nor a model, a model without
            a weight source, or values that are not three (std > 0).
    """
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
          mesh=None, seed=0, cache=False, shuffle_buffer=10_000, process_index=None,
          process_count=None, start_batch=0) -> Pipeline:
    """Read features `keys` of this host's part of `split`, map `preprocess(example, seed)`,
    batch. Images stay encoded through cache and shuffle buffer; they are decoded in the map.

    Train: an endless stream of epochs of the host's part, a function of (`seed`, host)
    alone (and of TF's global seed, if a program sets one); batches run across epoch
    boundaries as in one continuous stream. The part is
    cut into pieces of at most `shuffle_buffer` consecutive records (TFDS stores records
    shuffled, so a piece is a random subset); each epoch visits the pieces in a new
    random order and fully shuffles each (a piece is one shuffle buffer of undecoded
    records; up to three are in memory, the next two read ahead). The example at stream
    position p is augmented with the seed (key, p). So `start_batch=n` resumes exactly
    after n batches and decodes nothing it skips: whole epochs and pieces are skipped by
    arithmetic, then at most one piece of records is read and dropped.
    `cache=True` keeps the undecoded records in memory after their first read.
    Eval: one pass in order, padded with `pad_values`-filled examples (`valid=False`) so
    that every host yields the same number of full batches and every example appears once.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} hosts")
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices "
                         f"of the mesh (batches are split over all its axes {mesh.axis_names})")
    if train and shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    local = batch_size // count
    counts = sources.host_counts(builder, split, count)
    host = sources.host_split(split, index, count)

    features = builder.info.features
    late = [k for k in keys if isinstance(features[k], tfds.features.Image)]
    decoders = tfds.decode.PartialDecoding(
        dict.fromkeys(keys, True), decoders={k: tfds.decode.SkipDecoding() for k in late})

    def read(subsplit):
        ds = builder.as_dataset(split=subsplit, shuffle_files=False, decoders=decoders)
        return ds.cache() if cache else ds

    def prepare(example, seed):
        example = {**example, **{k: features[k].decode_example(example[k]) for k in late}}
        return {**preprocess(example, seed), "valid": tf.constant(True)}

    if train:
        seeds = np.random.SeedSequence([seed, index]).generate_state(3).astype(np.int64)
        ds = _stream(read, host, counts[index], shuffle_buffer, seeds, start_batch * local)
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        num_batches = None
    else:
        ds = read(host).map(lambda ex: prepare(ex, None), num_parallel_calls=tf.data.AUTOTUNE)
        num_batches = sources.eval_batches(counts, local)
        pad = {k: tf.fill(s.shape, tf.cast(pad_values.get(k, 0), s.dtype))
               for k, s in ds.element_spec.items()}
        pad["valid"] = tf.constant(False)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(
            num_batches * local - counts[index]))
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return Pipeline(ds, batch_size, sum(counts), num_batches, num_classes, mesh)


def _stream(read, split, num_examples, piece_size, seeds, start):
    """(record, seed) pairs of `split` from stream position `start` on, epoch after epoch
    (see `build`). `seeds`: int64 keys of the piece order, the shuffles, the examples."""
    order_key, shuffle_key, example_key = seeds
    num_pieces = -(-num_examples // piece_size)
    pieces = [read(s) for s in tfds.even_splits(split, num_pieces)]
    sizes = np.array([int(p.cardinality()) for p in pieces])

    def order(epoch):
        return tf.random.experimental.stateless_shuffle(
            tf.range(num_pieces, dtype=tf.int64), tf.stack([order_key, epoch]))

    def epoch_pieces(epoch):
        tagged = [tf.data.Dataset.from_tensors((epoch, tf.constant(i, tf.int64), p))
                  for i, p in enumerate(pieces)]
        return tf.data.Dataset.choose_from_datasets(
            tagged, tf.data.Dataset.from_tensor_slices(order(epoch)))

    epoch, offset = divmod(start, num_examples)
    ends = np.cumsum(sizes[order(tf.constant(epoch, tf.int64)).numpy()])
    first = int(np.searchsorted(ends, offset, side="right"))
    skip = offset - (ends[first - 1] if first else 0)

    def shuffled(k, piece):
        epoch, i, records = piece
        records = records.shuffle(int(sizes.max()), seed=shuffle_key + epoch * num_pieces + i)
        return records.skip(tf.where(k == 0, tf.constant(skip, tf.int64), 0))

    records = (tf.data.Dataset.counter(epoch).flat_map(epoch_pieces).skip(first).enumerate()
               .interleave(shuffled, cycle_length=1, num_parallel_calls=1, deterministic=True))
    positions = tf.data.Dataset.counter(start).map(lambda p: tf.stack([example_key, p]))
    return tf.data.Dataset.zip(records, positions)
