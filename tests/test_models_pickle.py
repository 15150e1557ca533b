"""Model directories whose weights are only pickles (pytorch_model.bin) are refused with one line that says why and
how to convert them, never with a traceback that advises turning torch's protection off; nothing in them is
unpickled. A hostile pickle (one that would run a command when loaded) proves the last part."""
from __future__ import annotations

import os

import pytest

from imtune.model import models
from imtune.types import UsageError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model saved the ordinary way (safetensors) and its state dict."""
    d = tmp_path_factory.mktemp("safe")
    model = models.load_model("random:tiny")
    model.save_pretrained(d)
    return d, model.state_dict()


def pickled_copy(saved, tmp_path, payload=None):
    """The saved model's directory with model.safetensors replaced by a pytorch_model.bin (torch.save)."""
    import shutil

    import torch

    src, state = saved
    d = tmp_path / "pickled"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    torch.save(payload if payload is not None else state, d / "pytorch_model.bin")
    return d


def check_refusal(d):
    with pytest.raises(UsageError) as e:
        models.load_model(str(d))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "pytorch_model.bin" in msg and "can run code" in msg and "safe_serialization=True" in msg
    assert "weights_only" not in msg and "trust the source" not in msg.lower()
    return msg


def test_a_directory_with_only_pytorch_model_bin_is_refused(saved, tmp_path):
    check_refusal(pickled_copy(saved, tmp_path))


class RunsACommand:
    """Unpickling this runs a shell command (what a hostile pytorch_model.bin does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_pickle_is_refused_unopened(saved, tmp_path):
    marker = tmp_path / "ran"
    d = pickled_copy(saved, tmp_path, payload={"model.embed_tokens.weight": RunsACommand(marker)})
    check_refusal(d)
    assert not marker.exists()


def test_a_lora_adapter_whose_base_is_pickled_is_refused(saved, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    base = pickled_copy(saved, tmp_path)
    adapter = tmp_path / "adapter"
    lora = get_peft_model(models.load_model("random:tiny"), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    with pytest.raises(UsageError, match="can run code.*safe_serialization=True") as e:
        models.load_model(str(adapter))
    assert len(str(e.value).splitlines()) == 1


def test_the_same_model_in_safetensors_still_loads(saved):
    d, state = saved
    model = models.load_model(str(d))
    assert all((model.state_dict()[k] == v).all() for k, v in state.items())
