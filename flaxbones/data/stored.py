"""Examples written once as a TFDS dataset in a data_dir, read back by name like any other."""
from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath


class StoredBuilder(tfds.dataset_builders.AdhocBuilder):
    """TFDS's AdhocBuilder, without its code_path lookup (it needs `importlib_resources`)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)


def check_name(name: str) -> None:
    """Refuse a name TFDS has a builder class for: reading the stored dataset back by name
    would give that class's dataset, not the stored examples."""
    if name in tfds.list_builders(with_community_datasets=False):
        raise ValueError(f"{name!r} is the name of a TFDS dataset builder (TFDS's own or a "
                         f"class defined in this process); store these examples under another")


def store(name: str, features, split_examples: dict, data_dir: str, *,
          version: str = "1.0.0") -> tfds.core.DatasetBuilder:
    """Write {split: tf.data.Dataset or iterable of (key, example)} as the TFDS dataset
    `name` (`features` a FeaturesDict) in `data_dir` unless it is there; its builder.
    A name TFDS has a builder class for is refused (check_name)."""
    check_name(name)
    builder = StoredBuilder(name=name, version=version, features=features, data_dir=data_dir,
                            split_datasets=split_examples)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder
