"""The registry and public API names."""
import pytest

import flaxbones as fb


def test_listing_and_glob_filters():
    assert "resnet50" in fb.list_backbones()
    assert fb.list_backbones("resnext*") == ["resnext101_32x8d", "resnext50_32x4d"]
    assert set(fb.list_backbones()) <= set(fb.list_models())


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="unknown model name 'resnet05'; did you mean resnet50"):
        fb.create_model("resnet05")
    with pytest.raises(ValueError, match="unknown model name 'zzz'"):
        fb.create_backbone("zzz")


def test_negative_num_classes_is_an_error():
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        fb.create_model("resnet18", num_classes=-1)


def test_feature_info_is_known_before_init():
    bb = fb.create_backbone("resnet50", output_stride=16)
    assert bb.feature_info == (
        fb.FeatureInfo("C1", 2, 64), fb.FeatureInfo("C2", 4, 256), fb.FeatureInfo("C3", 8, 512),
        fb.FeatureInfo("C4", 16, 1024), fb.FeatureInfo("C5", 16, 2048))
    assert fb.create_model("resnet50").feature_info[-1].stride == 32


def test_weight_source_metadata_is_exposed():
    source = fb.get_spec("resnet50").weights
    assert source.mean == (0.485, 0.456, 0.406) and source.std == (0.229, 0.224, 0.225)


def test_models_compose_inside_a_users_own_module():
    """Flax's `name=` reaches the module (the registry's name is positional-only), and a
    composed model keeps its own variable tree inside the user's module, in `setup` and in
    a compact method alike, so its weights load into that sub-tree."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    class Compact(nn.Module):
        @nn.compact
        def __call__(self, x):
            feats = fb.create_backbone("mobilenet_v2_050", out_features=("C3", "C5"), name="bb")(x)
            seg = fb.create_model("deeplabv3plus", backbone="mobilenet_v2_050", num_classes=3,
                                  name="seg")(x)
            return nn.Dense(2, name="probe")(feats["C5"].mean((1, 2))), seg["out"]

    class Setup(nn.Module):
        def setup(self):
            self.clf = fb.create_model("resnet18", num_classes=3)

        def __call__(self, x):
            return self.clf(x)["out"]

    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(Compact().init, jax.random.PRNGKey(0), x)["params"]
    assert sorted(params) == ["bb", "probe", "seg"]
    assert sorted(params["seg"]) == ["backbone", "head"]
    alone = jax.eval_shape(fb.create_backbone("mobilenet_v2_050").init, jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: a.shape, params["bb"]) == \
        jax.tree.map(lambda a: a.shape, alone["params"])
    params = jax.eval_shape(Setup().init, jax.random.PRNGKey(0), x)["params"]
    assert sorted(params) == ["clf"] and sorted(params["clf"]) == ["backbone", "head"]
    assert fb.create_model("resnet18", name="top").name == "top"
