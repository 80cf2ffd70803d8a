"""Folders of image files stored as TFDS datasets: what the pipelines read is what PIL reads
from the files (RGB for grayscale and RGBA, palette indices for VOC-style masks)."""
import numpy as np
import pytest
from PIL import Image

fbd = pytest.importorskip("flaxbones.data")
tfds = pytest.importorskip("tensorflow_datasets")

CLASSES = ["daisy", "rose", "tulip"]  # rose: train only


def _noise(rng, h, w, c):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """train/ and test/ class folders: PNG in RGB, L and RGBA, a JPEG, and a stray file."""
    root = tmp_path_factory.mktemp("flowers")
    rng = np.random.default_rng(0)
    files = {"train/daisy/a.png": "RGB", "train/daisy/b.jpg": "RGB", "train/rose/c.png": "L",
             "train/tulip/d.png": "RGBA", "test/daisy/e.png": "RGB", "test/tulip/f.PNG": "L"}
    for rel, mode in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng, 9 + len(rel), 13, len(mode)), mode).save(
            root / rel, format="PNG" if rel.lower().endswith(".png") else "JPEG")
    (root / "train" / "daisy" / "notes.txt").write_text("not an image")
    return root, files


def _read(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_classification_folder_reads_back_as_pil_sees_the_files(flowers, tmp_path):
    root, files = flowers
    builder = fbd.store_image_folder(root, "folder_test_flowers", str(tmp_path))
    assert builder.info.features["label"].names == CLASSES
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == \
        {"train": 4, "test": 2}
    again = fbd.load_builder("folder_test_flowers", str(tmp_path))  # by name
    decoded = {}
    for split in ("train", "test"):
        for ex in _read(again, split):
            decoded[f"{split}/{CLASSES[ex['label']]}"] = decoded.get(
                f"{split}/{CLASSES[ex['label']]}", []) + [ex["image"]]
    for rel, mode in files.items():
        if not rel.endswith("png") and not rel.endswith("PNG"):
            continue
        expected = np.asarray(Image.open(root / rel).convert("RGB"))
        assert any(np.array_equal(expected, got) for got in decoded["/".join(
            rel.split("/")[:2])]), rel
    batch = next(iter(fbd.classification_pipeline("folder_test_flowers", data_dir=str(tmp_path),
                                                  batch_size=2, train=False, image_size=16,
                                                  model="resnet18")))
    assert batch["image"].shape == (2, 16, 16, 3)
    assert fbd.store_image_folder(root, "folder_test_flowers", str(tmp_path)).is_prepared()
    # stored: a second call reads no source files (the folder could be gone)
    again = fbd.store_image_folder(tmp_path / "gone", "folder_test_flowers", str(tmp_path))
    assert again.info.features["label"].names == CLASSES


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """VOC-style: a palette mask (index = class), a grayscale mask with 255 void."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(1)
    masks = {}
    for split, stem, palette in (("train", "x1", True), ("train", "x2", False),
                                 ("val", "y1", True)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng, 20, 30, 3)).save(root / split / "images" / f"{stem}.jpg")
        ids = rng.integers(0, 3, (20, 30)).astype(np.uint8)
        ids[:, :3] = 255
        mask = Image.fromarray(ids, "L")
        if palette:  # class 1 drawn red, 2 green: the stored ids must stay 1 and 2
            mask = Image.fromarray(ids, "P")
            mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
        mask.save(root / split / "masks" / f"{stem}.png")
        masks[f"{split}/{stem}"] = ids
    return root, masks


def test_segmentation_folder_keeps_class_ids_exact(scenes, tmp_path):
    root, masks = scenes
    builder = fbd.store_segmentation_folder(root, "folder_test_scenes", str(tmp_path),
                                            splits={"train": "train", "validation": "val"})
    assert {s: builder.info.splits[s].num_examples for s in ("train", "validation")} == \
        {"train": 2, "validation": 1}
    stored = sorted(ex["segmentation_mask"][..., 0].tobytes() for s in ("train", "validation")
                    for ex in _read(builder, s))
    assert stored == sorted(m.tobytes() for m in masks.values())
    spec = fbd.DatasetSpec(segmentation_key="segmentation_mask",
                           segmentation_classes=("background", "a", "b"), eval_split="validation")
    batch = next(iter(fbd.segmentation_pipeline("folder_test_scenes", data_dir=str(tmp_path),
                                                spec=spec, batch_size=2, train=True,
                                                crop_size=16, model="resnet18")))
    assert batch["segmentation"].shape == (2, 16, 16)
    assert set(np.unique(batch["segmentation"])) <= {0, 1, 2, 255}


def test_bad_folders_are_named(scenes, tmp_path):
    root, _ = scenes
    with pytest.raises(ValueError, match="'cifar10' is the name of a TFDS dataset builder"):
        fbd.store_image_folder(root.parent, "cifar10", str(tmp_path))  # it would read as CIFAR
    with pytest.raises(FileNotFoundError, match="no folder"):
        fbd.store_image_folder(tmp_path / "nowhere", "x", str(tmp_path))
    (tmp_path / "empty" / "train" / "cats").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no image files"):
        fbd.store_image_folder(tmp_path / "empty", "x", str(tmp_path))
    bad = tmp_path / "bad" / "train"
    for sub in ("images", "masks"):
        (bad / sub).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(bad / "images" / "a.png")
    Image.new("RGB", (8, 6)).save(bad / "images" / "lonely.png")
    Image.new("RGB", (8, 6)).save(bad / "masks" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"unmatched: \['lonely'\]"):
        fbd.store_segmentation_folder(bad.parent, "x", str(tmp_path))
    (bad / "images" / "lonely.png").unlink()
    with pytest.raises(ValueError, match=r"masks/a\.png' is RGB: a mask holds one class id"):
        fbd.store_segmentation_folder(bad.parent, "x", str(tmp_path))
    Image.new("L", (8, 5)).save(bad / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"is 8x5 but its image .*a\.png' is 8x6"):
        fbd.store_segmentation_folder(bad.parent, "x", str(tmp_path))
    assert not (tmp_path / "x").exists()  # nothing half-written
