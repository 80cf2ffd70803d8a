"""jax.export of models built with lax's kernels (`cpu_kernels=False`): one serialised
StableHLO program, a symbolic batch size, lowered for CPU, CUDA and TPU from this CPU
host, that gives `apply`'s outputs after a round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import flaxbones as fb

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
    variables = model.init(jax.random.PRNGKey(0), X[:1])
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
        variables = model.init(jax.random.PRNGKey(0), X[:1])
        texts[cpu] = _exported(model, variables).mlir_module()
    assert "feature_group_count = 16" in texts[False]
    assert "feature_group_count = 16" not in texts[True]
    assert fb.create_model("resnet18").backbone.cpu_kernels == (jax.default_backend() == "cpu")
