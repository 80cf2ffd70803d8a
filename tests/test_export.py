"""jax.export of models built with lax's kernels (`cpu_kernels=False`): one serialised
StableHLO program, a symbolic batch size, lowered for CPU, CUDA and TPU from this CPU
host, that gives `apply`'s outputs after a round trip. `fb.export` makes such programs from
any model (CPU-kernel ones as their lax clones), which a process with only jax runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import flaxbones as fb
from torch_ref import random_variables

X = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
MODELS = {
    "classifier": lambda cpu: fb.create_model("mobilenet_v2_050", num_classes=5,
                                              cpu_kernels=cpu),
    "segmenter": lambda cpu: fb.create_model("deeplabv3plus", backbone="resnet18",
                                             num_classes=3, cpu_kernels=cpu),
}


def _exported(model, variables, platforms=("cpu",)):
    batch = export.symbolic_shape("b, 32, 32, 3")
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    spec = jax.ShapeDtypeStruct(batch, jnp.float32)
    return export.export(fn, platforms=platforms)(variables, spec)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_backend_neutral_export_round_trips(kind):
    model = MODELS[kind](False)
    variables = random_variables(model, X[:1], scale=None)
    exported = _exported(model, variables, ("cpu", "cuda", "tpu"))
    assert exported.platforms == ("cpu", "cuda", "tpu")
    restored = export.deserialize(exported.serialize())
    want = model.apply(variables, X)
    for n in (1, 3):  # one program for every batch size
        got = restored.call(variables, X[:n])
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key][:n], rtol=1e-5, atol=1e-5)


def test_the_kernel_choice_is_what_gets_exported():
    """With lax's kernels the program holds the depthwise convolutions and max-pooling as
    such; with the CPU rewrites (the default on a CPU host) it holds neither."""
    texts = {}
    for cpu in (False, True):
        model = fb.create_model("mobilenet_v2_050", num_classes=5, cpu_kernels=cpu)
        variables = random_variables(model, X[:1], scale=None)
        texts[cpu] = _exported(model, variables).mlir_module()
    assert "feature_group_count = 16" in texts[False]
    assert "feature_group_count = 16" not in texts[True]
    assert fb.create_model("resnet18").backbone.cpu_kernels == (jax.default_backend() == "cpu")


# --- fb.export: the public API ------------------------------------------------------------
# SqueezeNet has no dense layer, so any dot_general in its program is a CPU rewrite of a conv.
SMALL = (3, 32, 32, 3)


def _classifier():
    return fb.create_model("squeezenet1_1", num_classes=5)


def _segmenter():
    return fb.create_model("lraspp", backbone="regnet_y_400mf", num_classes=3,
                           inter_channels=16, depths=(1, 1, 1, 1), widths=(8, 16, 24, 32),
                           group_widths=(8, 8, 8, 8))


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    """Two artifacts run by tests/export_worker.py in a process without flax or flaxbones:
    the classifier (CPU kernels, as built by default here) with a symbolic batch and its
    weights embedded, called at batch 1 and 3; the segmenter with a fixed batch of 2 and
    its variables as an argument, called at 2 and 3."""
    folder = tmp_path_factory.mktemp("export")
    images = np.random.default_rng(1).normal(size=SMALL).astype(np.float32)
    models = {"classifier": _classifier(), "segmenter": _segmenter()}
    variables = {k: random_variables(m, images[:1], scale=None) for k, m in models.items()}
    fb.export(models["classifier"], variables["classifier"], SMALL[1:],
              path=folder / "classifier.jax")
    np.savez(folder / "classifier.npz", images=images, sizes=[1, 3])
    data = fb.export(models["segmenter"], variables["segmenter"], SMALL[1:], batch=2,
                     embed_weights=False)
    (folder / "segmenter.jax").write_bytes(data)
    leaves = {f"weight_{i}": a for i, a in enumerate(jax.tree.leaves(variables["segmenter"]))}
    np.savez(folder / "segmenter.npz", images=images, sizes=[2, 3], **leaves)
    worker = Path(__file__).with_name("export_worker.py")
    subprocess.run([sys.executable, str(worker), str(folder)], check=True, cwd=folder)
    outputs = {k: dict(np.load(folder / f"{k}.out.npz")) for k in models}
    return models, variables, images, outputs, folder


def _apply(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def test_export_runs_with_only_jax_for_every_batch_size(worker_run):
    models, variables, images, outputs, folder = worker_run
    assert models["classifier"].backbone.cpu_kernels  # what it was built with stays as it was
    want = _apply(models["classifier"], variables["classifier"], images)
    for n in (1, 3):
        np.testing.assert_allclose(outputs["classifier"][f"{n}/out"], want["out"][:n],
                                   rtol=1e-5, atol=1e-5)
    assert not [f for f in folder.iterdir() if f.name.startswith(".export-")]  # atomic write


def test_exported_program_holds_lax_kernels_for_a_cpu_kernel_model(worker_run):
    text = fb.load_exported(worker_run[4] / "classifier.jax").mlir_module()
    assert "stablehlo.convolution" in text and "dot_general" not in text


def test_fixed_batch_export_takes_variables_and_rejects_other_batch_sizes(worker_run):
    models, variables, images, outputs, _ = worker_run
    want = _apply(models["segmenter"], variables["segmenter"], images[:2])
    assert outputs["segmenter"]["2/out"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(outputs["segmenter"]["2/out"], want["out"], rtol=1e-5, atol=1e-5)
    error = str(outputs["segmenter"]["3/error"])
    assert "Shape mismatch" in error and "(2, 32, 32, 3)" in error and "(3, 32, 32, 3)" in error


@pytest.mark.parametrize("shape, batch, message", [
    ((2, 32, 32, 3), "dynamic", "give the batch size as batch="),
    ((32, 32), "dynamic", "(height, width, channels)"),
    ((32, 0, 3), "dynamic", "positive ints"),
    ((32, 32, 3), 0, "positive int"),
    ((32, 32, 3), True, "positive int"),
    ((32, 32, 3), "auto", "'dynamic'"),
])
def test_export_rejects_bad_shapes_and_batches(shape, batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fb.export(_classifier(), {"params": {}}, shape, batch=batch)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from flaxbones import exporting

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(exporting.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        exporting._write_atomic(str(tmp_path / "model.jax"), b"0" * 1000)
    assert not list(tmp_path.iterdir())


def test_load_exported_rejects_foreign_bytes():
    with pytest.raises(ValueError, match="not a jax.export artifact"):
        fb.load_exported(b"PK\x03\x04 not an artifact")


@pytest.mark.skipif(not os.environ.get("FLAXBONES_TEST_JAX2TF"),
                    reason="the README's jax2tf SavedModel recipe: importing TensorFlow costs "
                           "~5 s of the CI budget; set FLAXBONES_TEST_JAX2TF=1 to run it")
def test_jax2tf_saved_model_recipe(tmp_path):
    import tensorflow as tf
    from jax.experimental import jax2tf

    from flaxbones.exporting import lax_kernels

    model = _classifier()
    images = np.random.default_rng(2).normal(size=SMALL).astype(np.float32)
    variables = random_variables(model, images[:1], scale=None)
    lax_model = lax_kernels(model)
    serve = jax2tf.convert(lambda v, x: lax_model.apply(v, x, train=False),
                           polymorphic_shapes=[None, "(b, ...)"], with_gradient=False,
                           native_serialization_platforms=("cpu", "cuda", "tpu"))
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, variables)
    module.serve = tf.function(lambda x: serve(module.params, x), autograph=False,
                               input_signature=[tf.TensorSpec((None, *SMALL[1:]), tf.float32)])
    tf.saved_model.save(module, str(tmp_path))
    restored = tf.saved_model.load(str(tmp_path))
    want = _apply(model, variables, images)["out"]
    for n in (1, 3):
        got = restored.serve(tf.constant(images[:n]))["out"].numpy()
        np.testing.assert_allclose(got, want[:n], rtol=1e-5, atol=1e-5)


def test_detector_exports_with_image_sizes_and_padded_detections():
    """A detector's program takes (images, image_sizes) and returns its fixed-size padded
    detections (lowered only: tests/test_detection_* check what they hold)."""
    model = fb.create_model("retinanet", backbone="resnet18", layers=(1, 1, 1, 1),
                            num_classes=3, fpn_channels=16, detections_per_img=10)
    variables = random_variables(model, X[:1])
    program = fb.load_exported(fb.export(model, variables, (32, 32, 3)))
    images, sizes = program.in_avals
    assert str(images.shape) == "(batch, 32, 32, 3)" and str(sizes.shape) == "(batch, 2)"
    out = jax.tree.unflatten(program.out_tree, [str(a.shape) for a in program.out_avals])
    assert out == {"boxes": "(batch, 10, 4)", "labels": "(batch, 10)", "scores": "(batch, 10)",
                   "valid": "(batch, 10)"}
