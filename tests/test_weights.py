"""Weight files: formats, wrappers, safety, and all-or-nothing loading with clear errors."""
import pickle
import re

import jax
import numpy as np
import pytest
import torch
import torchvision
from safetensors.numpy import save_file

import flaxbones as fb
from flaxbones.weights import read_state_dict
from torch_ref import randomize, save_state


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet18(), seed=0)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def write(tmp_path, state, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def test_pth_and_safetensors_give_the_same_variables(tmp_path, resnet18_state):
    tensors = {k: torch.from_numpy(v) for k, v in resnet18_state.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3},
               tmp_path / "wrapped.pth")
    a = fb.load_pretrained("resnet18", write(tmp_path, resnet18_state))
    b = fb.load_pretrained("resnet18", tmp_path / "wrapped.pth")
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, a, b))
    kernel = a["params"]["backbone"]["conv1"]["kernel"]
    np.testing.assert_array_equal(kernel, resnet18_state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(a["params"]["head"]["fc"]["kernel"], resnet18_state["fc.weight"].T)
    np.testing.assert_array_equal(a["batch_stats"]["backbone"]["bn1"]["var"], resnet18_state["bn1.running_var"])


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("layer2.0.conv1.weight"), "1 missing in the file:\n    params/backbone/layer2_0/conv1/kernel"),
    (lambda s: s.update({"layer5.0.conv1.weight": np.zeros(3, np.float32)}), "unexpected in the file:\n    layer5.0.conv1.weight"),
    (lambda s: s.update({"bn1.running_mean": np.zeros(65, np.float32)}), r"shape mismatch:\n    bn1.running_mean \(65,\)"),
])
def test_mismatched_files_raise_and_load_nothing(tmp_path, resnet18_state, edit, message):
    state = dict(resnet18_state)
    edit(state)
    with pytest.raises(ValueError, match="nothing was loaded") as err:
        fb.load_pretrained("resnet18", write(tmp_path, state))
    assert re.search(message, str(err.value)), str(err.value)


def test_many_mismatches_are_listed_briefly(tmp_path, resnet18_state):
    state = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing in the file:(\n    .*){10}\n    \.\.\. and \d+ more"):
        fb.load_pretrained("resnet18", write(tmp_path, state))


def test_other_head_size_needs_skip_head(tmp_path, resnet18_state):
    path = write(tmp_path, resnet18_state)
    with pytest.raises(ValueError, match=r"fc.weight \(512, 1000\) -> params/head/fc/kernel \(512, 10\)"):
        fb.load_pretrained("resnet18", path, num_classes=10)
    variables, report = fb.load_pretrained("resnet18", path, num_classes=10, skip_head=True,
                                           return_report=True)
    assert report.skipped == ["params/head/fc/bias", "params/head/fc/kernel"]
    assert len(report.ignored_keys) == 2 and all(k.startswith("fc.") for k in report.ignored_keys)
    assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 10)
    np.testing.assert_array_equal(variables["params"]["backbone"]["conv1"]["kernel"],
                                  resnet18_state["conv1.weight"].transpose(2, 3, 1, 0))


def test_timm_resnet_keys_load(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet50")
    variables = fb.load_pretrained("resnet50", save_state(model, tmp_path / "timm.safetensors"))
    np.testing.assert_array_equal(variables["params"]["backbone"]["layer1_0"]["downsample_conv"]["kernel"],
                                  model.layer1[0].downsample[0].weight.detach().numpy().transpose(2, 3, 1, 0))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pth_files_cannot_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("name,content,error,message", [
    ("missing.safetensors", None, FileNotFoundError, "does not exist"),
    ("broken.safetensors", b"\x00garbage", ValueError, "not a readable safetensors"),
    ("weights.npz", b"", ValueError, "unknown weight file format '.npz'"),
])
def test_unreadable_files_are_clear_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        fb.load_pretrained("resnet18", path)
