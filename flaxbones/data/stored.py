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


def store(name: str, data_dir: str, make, *, version: str = "1.0.0") -> tfds.core.DatasetBuilder:
    """The TFDS dataset `name` in `data_dir`, written first from `make()` unless it is
    there: `make` returns (FeaturesDict, {split: tf.data.Dataset or iterable of (key,
    example)}) and is called only then, so a second call reads no source files. A name
    TFDS has a builder class for is refused first (check_name)."""
    check_name(name)
    probe = StoredBuilder(name=name, version=version, data_dir=data_dir, split_datasets={},
                          features=tfds.features.FeaturesDict({}))
    if probe.is_prepared():
        return tfds.builder_from_directory(probe.data_dir)
    features, split_examples = make()
    builder = StoredBuilder(name=name, version=version, features=features, data_dir=data_dir,
                            split_datasets=split_examples)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder
