"""`fb.detection.predict` as a user calls it (a list of HWC images of any sizes in, detections
in each image's own frame out) against torchvision's whole eval call on the same weights:
its transform, network and postprocess, masks pasted at the original size."""
import numpy as np
import pytest

pytest.importorskip("torchvision")

import rcnn_ref  # noqa: E402
import torch  # noqa: E402
import torch_ref  # noqa: E402
from test_detection_rcnn import match_detections  # noqa: E402

import flaxbones as fb  # noqa: E402

NAME = "maskrcnn_resnet50_fpn"


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    ref = rcnn_ref.build(NAME, 5)
    path = torch_ref.save_state(ref, tmp_path_factory.mktemp("predict") / f"{NAME}.pth")
    kwargs = dict(num_classes=5, **rcnn_ref.settings(NAME)[1])
    variables = fb.load_pretrained(NAME, path, **kwargs)
    imgs = rcnn_ref.images()
    with torch.no_grad():
        want = [{k: v.numpy() for k, v in d.items()} for d in ref(imgs)]
    hwc = [im.numpy().transpose(1, 2, 0) for im in imgs]
    got = fb.detection.predict(NAME, variables, hwc, model_kwargs=kwargs,
                               **rcnn_ref.sizes(NAME))
    return imgs, want, got


def test_predict_equals_torchvisions_eval_output(both):
    imgs, want, got = both
    assert len(got) == len(imgs)
    total = 0
    for i, (w, g, im) in enumerate(zip(want, got, imgs)):
        h, wd = im.shape[1:]
        assert g["masks"].shape[1:] == (h, wd) and g["boxes"].shape[1] == 4
        as_batch = {k: g[k][None] for k in ("boxes", "scores", "labels")}
        as_batch["valid"] = np.ones((1, len(g["scores"])), bool)
        pairs = match_detections(w, as_batch, 0, limit=rcnn_ref.settings(NAME)[1].get(
            "detections_per_img", 100))
        r, c = (np.asarray(p) for p in zip(*pairs))
        agree = np.mean((w["masks"][r, 0] > 0.5) == (g["masks"][c] > 0.5))
        assert agree >= 0.99, f"image {i}: pasted masks agree on {agree:.4f} of pixels"
        total += len(pairs)
    assert total > 10


def test_predict_rejects_model_kwargs_with_a_module():
    model = fb.create_model("fasterrcnn", backbone="resnet18", num_classes=3)
    with pytest.raises(ValueError, match="model_kwargs"):
        fb.detection.predict(model, {}, [np.zeros((40, 50, 3), np.uint8)],
                             model_kwargs={"num_classes": 3})
    with pytest.raises(ValueError, match="unknown transform options"):
        fb.detection.predict(model, {}, [np.zeros((40, 50, 3), np.uint8)], min_sise=64)
