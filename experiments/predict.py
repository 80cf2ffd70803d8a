"""Predict with a trained checkpoint: overlay PNGs (segmentation) or top-k labels.

    python experiments/predict.py --checkpoint=workdir/demo/checkpoints --output=preds \
        image1.png image2.jpg
The model, its kwargs and the normalisation come from the checkpoint's metadata.
"""
import os
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pictures  # noqa: E402

import flaxbones as fb  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train.py workdir's checkpoints/ directory.")
_OUTPUT = flags.DEFINE_string("output", "predictions", "Where overlay PNGs are written.")
_TOPK = flags.DEFINE_integer("topk", 5, "How many labels to print for a classifier.")


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8; a file that is not a decodable image raises a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode {path} as an image: {e}") from e


def load(checkpoint):
    """(model, variables, saved config) from a checkpoint directory."""
    from flaxbones.train.checkpoint import Checkpoints
    with Checkpoints(checkpoint) as ckpt:
        meta = ckpt.read_meta()
    variables = fb.load_pretrained(None, checkpoint)
    model = fb.create_model(meta["model"], **meta.get("model_kwargs", {}))
    return model, variables, meta.get("config", {})


def predict(checkpoint, paths, output, topk=5):
    """Overlays written to `output` (segmentation) or [(path, [(class, prob), ...])]."""
    import flaxbones.data as fbd
    model, variables, config = load(checkpoint)
    mean, std = fbd.normalization(model=config.get("normalize_like") or None)
    images = [read_image(p) for p in paths]  # decode all first: a bad file fails before any work
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    results = []
    spec = fbd.sources.dataset_spec(config.get("dataset", ""))
    for path, image in zip(paths, images):
        x = ((image / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)[None]
        out = apply(variables, x)
        if isinstance(out, dict):
            pred = np.asarray(out["out"])[0].argmax(-1)
            pathlib.Path(output).mkdir(parents=True, exist_ok=True)
            target = pathlib.Path(output) / (pathlib.Path(path).stem + "_overlay.png")
            pictures.save_overlays(target, x, None, pred[None], mean, std,
                                   list(spec.segmentation_classes) or None)
            results.append((path, target))
        else:
            probs = np.asarray(jax.nn.softmax(out[0]))
            best = np.argsort(-probs)[:topk]
            results.append((path, [(int(k), float(probs[k])) for k in best]))
    return results


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    if _CHECKPOINT.value is None:
        raise app.UsageError("--checkpoint is required")
    for path, result in predict(_CHECKPOINT.value, paths, _OUTPUT.value, _TOPK.value):
        if isinstance(result, list):
            print(path + ": " + ", ".join(f"class {k} {p:.3f}" for k, p in result))
        else:
            print(f"{path}: overlay written to {result}")


if __name__ == "__main__":
    app.run(main)
