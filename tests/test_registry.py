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


def test_a_name_registered_again_by_its_own_definition_is_replaced_by_another_refused():
    """A notebook cell run twice (the same function, or the same partial) re-registers its
    name; a different builder under a taken name, or a built-in name, is refused."""
    import functools

    from flaxbones import registry
    from flaxbones.backbones.resnet import BasicBlock, ResNet

    source = ("def shadow_net(**kw):\n"
              "    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), **kw)\n")
    try:
        for _ in range(2):  # the cell, run twice: two distinct function objects
            namespace = {"ResNet": ResNet, "BasicBlock": BasicBlock, "__name__": "__main__"}
            exec(source, namespace)
            registry.register_backbone("test_family")(namespace["shadow_net"])
        assert fb.create_backbone("shadow_net").layers == (1, 1, 1, 1)
        for _ in range(2):
            registry.register_variants("test_family", {
                "shadow_net_2": functools.partial(ResNet, block=BasicBlock, layers=(2, 1, 1, 1))})
        with pytest.raises(ValueError, match=r"'shadow_net_2' is already registered "
                                             r"\(family 'test_family'"):
            registry.register_variants("test_family", {
                "shadow_net_2": functools.partial(ResNet, block=BasicBlock, layers=(1, 2, 1, 1))})
        with pytest.raises(ValueError, match="'resnet18' is already registered"):
            registry.register_variants("test_family", {"resnet18": ResNet})
        assert fb.create_backbone("resnet18").layers == (2, 2, 2, 2)
    finally:
        for name in ("shadow_net", "shadow_net_2"):
            registry._BACKBONES.pop(name, None)
