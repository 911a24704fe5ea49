"""Building a model from a checkpoint on the meta device: the file's tensors become its parameters (in the dtype the
model is built in, ties kept), buffers are copied as before, and a model that computes state from its parameters while
it is built (Swin's shifted-window masks) is built as usual."""

import json
import shutil

import pytest
import timm
import torch
from hf_models import hub_model
from safetensors.torch import save_file

from lowrank_cli.io.manifest import read_checkpoint
from lowrank_cli.models import load
from lowrank_cli.models.build import build_model

SWINS = {
    "swin_tiny_patch4_window7_224": {"img_size": 56, "depths": [2, 2], "num_heads": [2, 4], "embed_dim": 32, "num_classes": 10},
    "swinv2_tiny_window8_256": {"img_size": 64, "depths": [2, 2], "num_heads": [2, 4], "embed_dim": 32, "window_size": 4, "num_classes": 10},
}


@pytest.mark.parametrize("arch", sorted(SWINS))
def test_shifted_window_swins_load_and_run(tmp_path, arch):
    kwargs = SWINS[arch]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    loaded = load(tmp_path / "m.safetensors", arch, **kwargs)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    assert torch.equal(loaded(x), model(x))
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_a_bf16_tied_checkpoint_loads_in_fp32_with_one_head_parameter(tmp_path):
    folder = hub_model(tmp_path, "llama-tied", dtype=torch.bfloat16)
    alone = tmp_path / "alone"  # the file without its folder: lowrank's own load, not transformers' from_pretrained
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    model = build_model(alone / "model.safetensors", "LlamaForCausalLM", config, family="transformers").model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = read_checkpoint(folder / "model.safetensors")[2]
    assert torch.equal(model.model.embed_tokens.weight, stored["model.embed_tokens.weight"].float())
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad  # one parameter, one gradient


def test_buffers_are_copied_in_their_own_dtype(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["bn1.num_batches_tracked"] = torch.tensor(7, dtype=torch.int32)
    save_file(sd, str(tmp_path / "r.safetensors"))
    loaded = load(tmp_path / "r.safetensors", "resnet18", num_classes=5)
    assert loaded.bn1.num_batches_tracked.dtype == torch.int64 and int(loaded.bn1.num_batches_tracked) == 7
    assert torch.equal(loaded.bn1.running_var, model.bn1.running_var)
