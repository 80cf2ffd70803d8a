"""TFDS pipelines: the built-in dataset, mock-data pipelines, host splitting, eval masking,
batches on a data x fsdp mesh through the train steps, exact and cheap resumption."""
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import flaxbones.data as fbd
from flaxbones.data import builtin, pipeline, transforms
from flaxbones.train.sharding import batch_sharding

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LO = (0 - np.array(MEAN)) / np.array(STD)
HI = (1 - np.array(MEAN)) / np.array(STD)
TINY = "flaxbones_shapes/tiny"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    fbd.load_builder(TINY, data_dir)
    return data_dir


def examples(builder, split):
    return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def in_range(images):
    return np.all(images >= LO - 1e-5) and np.all(images <= HI + 1e-5)


def test_builtin_builds_offline_and_deterministically(tmp_path, offline):
    first, second = (fbd.load_builder(TINY, str(tmp_path / d)) for d in "ab")
    assert first.is_prepared() and first.info.splits["train"].num_examples == 24
    for split in ("train", "test"):
        a, b = examples(first, split), examples(second, split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert all(np.array_equal(x[k], y[k]) for k in x)
    for ex in examples(first, "train"):
        mask = ex["segmentation_mask"][..., 0]
        area = np.bincount(mask.ravel(), minlength=4)
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and area[0] > 0
        assert ex["label"] == np.argmax(area[1:]) + 1
        assert sorted(ex["labels"]) == [k for k in (1, 2, 3) if area[k]]


def test_builtin_size_and_count_are_configurable(tmp_path, offline):
    config = builtin.ShapesConfig(name="t", image_size=20, num_train=3, num_test=2, rotate=True)
    builder = tfds.builder("flaxbones_shapes", config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.info.features["image"].shape == (20, 20, 3)
    assert [builder.info.splits[s].num_examples for s in ("train", "test")] == [3, 2]


def test_builtin_segmentation_train_batches(shapes_dir):
    def first(seed):
        pipe = fbd.segmentation_pipeline(TINY, batch_size=4, train=True, crop_size=(24, 28),
                                         data_dir=shapes_dir, mean=MEAN, std=STD, seed=seed)
        return next(iter(pipe)), pipe
    batch, pipe = first(0)
    assert pipe.num_classes == 4 and pipe.steps_per_epoch == 6 and pipe.num_batches is None
    assert batch["image"].shape == (4, 24, 28, 3) and batch["image"].dtype == np.float32
    assert batch["segmentation"].shape == (4, 24, 28) and batch["segmentation"].dtype == np.int32
    assert batch["valid"].dtype == bool and batch["valid"].all()
    assert in_range(batch["image"])
    assert set(np.unique(batch["segmentation"])) <= {0, 1, 2, 3, 255}
    again, _ = first(0)
    other, _ = first(1)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["image"], other["image"])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_eval_counts_every_example_once_over_two_hosts(shapes_dir, task):
    split = "test[:7]"  # 4 + 3 examples on two hosts; local batch 2 -> 2 batches each
    raw = examples(fbd.load_builder(TINY, shapes_dir), split)
    if task == "classification":
        make = fbd.classification_pipeline
        kwargs = dict(image_size=32, crop_fraction=1.0)
        raw_targets = [ex["label"] for ex in raw]
    else:
        make = fbd.segmentation_pipeline
        kwargs = {}
        raw_targets = [ex["segmentation_mask"][..., 0] for ex in raw]
    seen_images, seen_targets = [], []
    for host in range(2):
        pipe = make(TINY, split, batch_size=4, train=False, data_dir=shapes_dir, mean=MEAN,
                    std=STD, process_index=host, process_count=2, **kwargs)
        batches = list(pipe)
        assert len(batches) == len(pipe) == 2 and pipe.num_examples == 7
        valid = np.concatenate([b["valid"] for b in batches])
        assert valid.tolist() == [True] * (4 - host) + [False] * host
        target = "label" if task == "classification" else "segmentation"
        for b in batches:
            assert b["image"].shape[0] == 2 and not b["image"][~b["valid"]].any()
            if task == "segmentation":
                assert (b[target][~b["valid"]] == 255).all()
            seen_images += list(b["image"][b["valid"]])
            seen_targets += list(b[target][b["valid"]])
    expected = [(ex["image"] / 255.0 - MEAN) / STD for ex in raw]
    assert len(seen_images) == len(expected) == 7
    for img, tgt, exp, exp_tgt in zip(seen_images, seen_targets, expected, raw_targets):
        np.testing.assert_allclose(img, exp, atol=1e-4)
        np.testing.assert_array_equal(tgt, exp_tgt)


def test_host_split_is_explicitly_parameterised():
    parts = [fbd.host_split("train", i, 2) for i in range(2)]
    assert parts == [tfds.split_for_jax_process("train", process_index=i, process_count=2)
                     for i in range(2)]
    assert parts[0] != parts[1]


def test_global_arrays_on_a_mesh(shapes_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    n = 2 * len(jax.devices())
    pipe = fbd.classification_pipeline(TINY, batch_size=n, train=True, image_size=16,
                                       data_dir=shapes_dir, model="resnet18", mesh=mesh)
    batch = next(iter(pipe))
    assert set(batch) == {"image", "label", "valid"}
    for value in batch.values():
        assert isinstance(value, jax.Array) and value.shape[0] == n
        assert value.sharding == batch_sharding(mesh)
    with pytest.raises(ValueError, match=r"batch_size 6 is not divisible by the 4 devices"):
        fbd.classification_pipeline(TINY, batch_size=6, train=True, data_dir=shapes_dir,
                                    model="resnet18", mesh=jax.sharding.AbstractMesh(
                                        (2, 2), ("data", "fsdp")))


def test_pipelines_feed_fsdp_train_and_eval_steps(shapes_dir):
    """Train and eval batches on a data x fsdp mesh of 8 devices go through the jitted steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "data_worker.py"), shapes_dir],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["specs"] == [out["expected_spec"]] and out["fsdp_params"] > 0
    assert len(out["losses"]) == 2 and np.isfinite(out["losses"]).all()
    assert out["eval_pixels"] == 10 * 32 * 32  # the 10 test images, padding left out


def train_batches(shapes_dir, hosts, batch_size, start, n, **kwargs):
    """`n` global training batches from batch `start`: the hosts' parts concatenated."""
    parts = [list(itertools.islice(fbd.segmentation_pipeline(
        TINY, batch_size=batch_size, train=True, data_dir=shapes_dir, mean=MEAN, std=STD,
        shuffle_buffer=5, process_index=host, process_count=hosts, start_batch=start,
        **kwargs), n)) for host in range(hosts)]
    return [{k: np.concatenate([part[i][k] for part in parts]) for k in parts[0][i]}
            for i in range(n)]


@pytest.mark.parametrize("hosts, cache", [(1, False), (2, True)])
def test_resumed_stream_equals_uninterrupted(shapes_dir, hosts, cache):
    """From the start, mid-epoch, an epoch boundary and epochs in: bit-identical batches.
    24 examples, split over the hosts, in pieces of <= 5; local batches of 5 span epochs."""
    batch_size = 5 * hosts
    local, per_host = batch_size // hosts, 24 // hosts
    boundary = next(s for s in range(1, 100) if s * local % per_host == 0)
    starts = [0, 1, boundary, 3 * per_host // local + 1]
    reference = train_batches(shapes_dir, hosts, batch_size, 0, max(starts) + 2)
    for start in starts:
        resumed = train_batches(shapes_dir, hosts, batch_size, start, 2, cache=cache)
        for got, want in zip(resumed, reference[start:]):
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{start=} {k=}")


def test_train_stream_is_epochs_of_shuffled_pieces(shapes_dir):
    """Each host's epoch is its split part, in pieces of consecutive records (shuffled
    inside, in a new order every epoch); the example at position p gets seed (key, p)."""
    builder = fbd.load_builder(TINY, shapes_dir)
    raw = [ex["image"].tobytes() for ex in examples(builder, "train")]
    keys = set()
    for host in range(2):
        pipe = pipeline.build(builder, "train", ("image",),
                              lambda ex, seed: {"image": ex["image"], "seed": seed},
                              batch_size=8, train=True, pad_values={}, num_classes=None,
                              shuffle_buffer=5, process_index=host, process_count=2)
        batches = list(itertools.islice(pipe, 9))  # 3 epochs of 12 examples, 4 per batch
        seeds = np.concatenate([b["seed"] for b in batches])
        np.testing.assert_array_equal(seeds[:, 1], np.arange(36))
        keys |= set(seeds[:, 0])
        index = [raw.index(img.tobytes()) for b in batches for img in b["image"]]
        epochs = [index[i:i + 12] for i in (0, 12, 24)]
        for epoch in epochs:
            assert sorted(epoch) == list(range(12 * host, 12 * host + 12))
            pieces = [sorted(epoch[i:i + 4]) for i in (0, 4, 8)]
            assert all(p == list(range(p[0], p[0] + 4)) and p[0] % 4 == 0 for p in pieces)
        assert len({tuple(e) for e in epochs}) == 3
    assert len(keys) == 2


def test_resume_does_not_preprocess_what_it_skips(shapes_dir, monkeypatch):
    """Resuming 2000 batches (8000 examples) in decodes and augments a few batches only."""
    import tensorflow as tf  # only after flaxbones.data, which loads triton before it

    calls = tf.Variable(0, dtype=tf.int64)
    normalize = transforms.normalize

    def counted(image, mean, std):
        with tf.control_dependencies([calls.assign_add(1)]):
            return normalize(image, mean, std)

    monkeypatch.setattr(transforms, "normalize", counted)
    pipe = fbd.classification_pipeline(TINY, batch_size=4, train=True, image_size=16,
                                       data_dir=shapes_dir, mean=MEAN, std=STD,
                                       shuffle_buffer=5, start_batch=2000)
    batches = iter(pipe)
    next(batches), next(batches)
    assert 8 <= calls.numpy() <= 100, calls.numpy()  # skipping batches after the map: > 8000


@pytest.fixture
def mocked():
    """TFDS mock data, with the builder reporting itself prepared (mock data has no files)."""
    with contextlib.ExitStack() as stack:
        def use(**kwargs):
            stack.enter_context(
                mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True))
            stack.enter_context(tfds.testing.mock_data(**kwargs))
        yield use


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_mock_classification(mocked, name):
    mocked(num_examples=5)
    train = fbd.classification_pipeline(name, batch_size=4, train=True, image_size=24,
                                        model="resnet50", process_index=1, process_count=2)
    batch = next(iter(train))
    assert batch["image"].shape == (2, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
    assert train.num_classes == {"cifar10": 10, "imagenet2012": 1000}[name]
    assert ((batch["label"] >= 0) & (batch["label"] < train.num_classes)).all()
    mean, std = map(np.array, fbd.normalization("resnet50"))
    assert (batch["image"] >= -mean / std - 1e-5).all()
    assert (batch["image"] <= (1 - mean) / std + 1e-5).all()
    evaluation = fbd.classification_pipeline(name, batch_size=4, train=False, image_size=24,
                                             model="resnet50", process_index=0, process_count=2)
    batches = list(evaluation)  # mock data ignores the split: 5 examples per host
    assert len(batches) == 3 and evaluation.num_examples == 10
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 5 + [False]
    assert not batches[-1]["image"][1].any() and batches[-1]["label"][1] == 0


def test_mock_oxford_pet_segmentation(mocked):
    mocked(num_examples=3, max_value=4)  # trimap values 0..3: 1 pet, 2 background, 3 border
    train = fbd.segmentation_pipeline("oxford_iiit_pet", batch_size=2, train=True,
                                      crop_size=20, model="resnet50")
    batch = next(iter(train))
    assert batch["image"].shape == (2, 20, 20, 3) and batch["segmentation"].shape == (2, 20, 20)
    assert set(np.unique(batch["segmentation"])) <= {0, 1, 2, 255} and train.num_classes == 3
    evaluation = fbd.segmentation_pipeline("oxford_iiit_pet", batch_size=2, train=False,
                                           eval_size=(40, 48), model="resnet50")
    batches = list(evaluation)
    assert len(batches) == 2 and batches[1]["valid"].tolist() == [True, False]
    seg = np.concatenate([b["segmentation"] for b in batches])
    assert seg.shape == (4, 40, 48) and seg.dtype == np.int32
    assert (seg[3] == 255).all() and set(np.unique(seg[:3])) - {255} == {0, 1, 2}
    pets = fbd.classification_pipeline("oxford_iiit_pet", batch_size=2, train=True,
                                       image_size=16, model="resnet50")
    assert pets.num_classes == 37


def test_mock_cityscapes_maps_label_ids_to_train_ids(mocked):
    mocked(num_examples=1)  # 1024x2048 images of every raw id 0..255
    evaluation = fbd.segmentation_pipeline("cityscapes", batch_size=1, train=False,
                                           eval_size=(64, 128), model="resnet50")
    (batch,) = list(evaluation)
    assert batch["image"].shape == (1, 64, 128, 3) and evaluation.num_classes == 19
    assert set(np.unique(batch["segmentation"])) == set(range(19)) | {255}


def test_missing_dataset_says_how_to_prepare(tmp_path, offline):
    with pytest.raises(fbd.DatasetNotPreparedError,
                       match=r"(?s)'cifar10' is not prepared.*tfds build cifar10 --data_dir="):
        fbd.classification_pipeline("cifar10", batch_size=2, train=True, model="resnet50",
                                    data_dir=str(tmp_path))
    with pytest.raises(fbd.DatasetNotPreparedError,
                       match=r"(?s)downloads/manual.*ILSVRC2012_img_train.tar"):
        fbd.load_builder("imagenet2012", str(tmp_path))
    with pytest.raises(ValueError, match="no_such_dataset"):
        fbd.load_builder("no_such_dataset", str(tmp_path))


def test_bad_arguments(shapes_dir):
    with pytest.raises(ValueError, match="model=<name>"):
        fbd.classification_pipeline(TINY, batch_size=2, train=True, data_dir=shapes_dir)
    with pytest.raises(ValueError, match="both mean and std"):
        fbd.normalization(mean=MEAN)
    with pytest.raises(ValueError, match="not divisible by 2 hosts"):
        fbd.segmentation_pipeline(TINY, batch_size=3, train=True, data_dir=shapes_dir,
                                  model="resnet50", process_index=0, process_count=2)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1"):
        fbd.segmentation_pipeline(TINY, batch_size=2, train=True, data_dir=shapes_dir,
                                  model="resnet50", shuffle_buffer=0)
    with pytest.raises(ValueError, match="no image-level labels"):
        fbd.classification_pipeline("cityscapes", batch_size=2, train=True, model="resnet50")
