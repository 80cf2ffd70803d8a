"""The generic `retinanet` builder on other backbone families: build, init and apply under jit
at a tiny size (ResNet-18, MobileNetV3-Large, Xception-65, VGG-16), fixed-size outputs that
respect each image's valid size; trainable_layers per family."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbones as fb
import flaxbones.detection.fcos  # noqa: F401  (registers the builders)
import flaxbones.detection.retinanet  # noqa: F401

# init's RNG is compiled per parameter shape; the rbg key keeps that compile short
KEY = jax.random.key(1, impl="unsafe_rbg")


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "xception65", "vgg16"])
def test_retinanet_on_any_backbone(backbone):
    """Compiled and run on ResNet-18 and MobileNetV3, traced (shapes) on the others."""
    model = fb.create_model("retinanet", backbone=backbone, num_classes=4, fpn_channels=64,
                            detections_per_img=50)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 96, 3))
    sizes = jnp.array([[64, 96], [50, 70]], jnp.int32)
    if backbone not in ("resnet18", "mobilenet_v3_large"):
        out = jax.eval_shape(model.apply, jax.eval_shape(model.init, KEY, images, sizes),
                             images, sizes)
        assert out["boxes"].shape == (2, 50, 4) and out["labels"].dtype == jnp.int32
        return
    variables = jax.jit(model.init)(KEY, images, sizes)
    assert set(variables) <= {"params", "batch_stats"}
    out = jax.device_get(jax.jit(model.apply)(variables, images, sizes))
    assert out["boxes"].shape == (2, 50, 4) and out["labels"].dtype == np.int32
    for i, (h, w) in enumerate(np.asarray(sizes)):
        valid = out["valid"][i]
        assert not valid[np.argmin(valid):].any(), "valid detections must come first"
        assert np.all(np.diff(out["scores"][i][valid]) <= 0)
        boxes = out["boxes"][i][valid]
        assert np.all(boxes >= 0) and np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
        assert np.all(out["labels"][i][valid] < 4)
        assert not out["scores"][i][~valid].any() and not out["boxes"][i][~valid].any()


def test_trainable_layers_per_family():
    def frozen(backbone, layers, frozen_bn=False):
        return fb.create_model("retinanet", backbone=backbone, num_classes=2, frozen_bn=frozen_bn,
                               trainable_layers=layers).frozen_param_patterns()

    assert frozen("resnet18", None) == ()
    # frozen BN (the default): every backbone BN scale/bias too, buffers in torchvision
    (bn,) = frozen("resnet18", None, frozen_bn=True)
    assert re.match(bn, "backbone/layer4_1/bn2/scale") and not re.match(bn, "backbone/conv1/kernel")
    assert frozen("resnet18", 3) == ("backbone/conv1/", "backbone/bn1/", "backbone/layer1_")
    # torchvision's MobileNetV3 stages start at features 0, 2, 4, 7, 13, 16 (6 stages)
    assert frozen("mobilenet_v3_large", 6) == ()
    assert frozen("mobilenet_v3_large", 5) == ("backbone/features_0/", "backbone/features_1/")
    assert frozen("vgg16", 4) == ("backbone/conv1_1/", "backbone/conv1_2/")
    with pytest.raises(ValueError, match="trainable_layers"):
        frozen("xception65", 2)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        frozen("resnet18", 6)


def test_retinanet_on_a_backbone_module():
    backbone = fb.create_backbone("resnet18", frozen_bn=True, out_features=("C3", "C4", "C5"))
    model = fb.create_model("retinanet", backbone=backbone, num_classes=3)
    assert model.backbone.out_features == ("C3", "C4", "C5")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert shapes["params"]["neck"]["lateral_0"]["kernel"].shape == (1, 1, 128, 256)
    with pytest.raises(ValueError, match="C2"):
        fb.create_model("fcos", backbone=backbone, fpn_levels=("C2", "C3", "C4", "C5"))


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
                                  "fcos_resnet50_fpn", "ssd300_vgg16",
                                  "ssdlite320_mobilenet_v3_large"])
def test_transform_defaults_match_torchvision(name):
    """What api.predict reads off the weight source is torchvision's transform of the preset."""
    import torchvision.models.detection as tvd


    tv = getattr(tvd, name)(weights=None, weights_backbone=None).transform
    source = fb.get_spec(name).weights
    np.testing.assert_allclose(source.mean, tv.image_mean)
    np.testing.assert_allclose(source.std, tv.image_std)
    transform = dict(source.transform)
    assert transform["size_divisible"] == tv.size_divisible
    if tv.fixed_size is not None:
        assert transform["fixed_size"] == tv.fixed_size and source.input_size == tv.fixed_size[0]
    else:
        assert (transform["min_size"], transform["max_size"]) == (tv.min_size[0], tv.max_size)
        assert source.input_size == tv.min_size[0]
    assert source.num_classes == 91
