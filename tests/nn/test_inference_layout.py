"""`inference_layout`: each low-rank layer's widening half stored column-major, the values, shapes, state dict and
outputs unchanged; a tied half left alone; `lowrank_cli.load` gives the layout; the writer stores the same tensors."""

import torch
from torch import nn

import lowrank_cli
from lowrank_cli.io.safetensors import load_tensors, save_checkpoint
from lowrank_cli.nn.lowrank import LowRankEmbedding, LowRankLinear, inference_layout


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = LowRankEmbedding(50, 32, 6)
        self.wide = LowRankLinear(32, 64, 8)      # up: 64 × 8, widening: re-laid
        self.narrow = LowRankLinear(64, 32, 8)    # up: 32 × 8, widening too
        self.dense = nn.Linear(32, 40)            # not a low-rank half: left alone

    def forward(self, ids):
        return self.dense(self.narrow(self.wide(self.emb(ids))))


def test_halves_become_column_major_with_the_same_values_and_outputs():
    torch.manual_seed(0)
    net = _Net().eval()
    ids = torch.randint(0, 50, (3, 9))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    want = net(ids)
    assert inference_layout(net) == 3
    for half in (net.wide.up, net.narrow.up, net.emb.proj):
        w = half.weight
        assert w.stride() == (1, w.shape[0]) and w.t().is_contiguous()
    for half in (net.wide.down, net.narrow.down, net.dense):
        assert half.weight.is_contiguous()
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(net(ids), want, rtol=1e-6, atol=1e-6)
    assert inference_layout(net) == 0  # already laid out


def test_a_tied_half_keeps_its_tie_and_a_half_that_does_not_widen_is_left():
    net = _Net()
    net.twin = LowRankLinear(32, 64, 8)
    net.twin.up.weight = net.wide.up.weight  # 64 × 8 both: one parameter, two names
    net.square = LowRankLinear(8, 4, 6)      # up: 4 × 6, does not widen
    net.frozen = LowRankLinear(16, 48, 4)
    net.frozen.up.weight.requires_grad_(False)
    assert inference_layout(net) == 3  # narrow, the embedding's proj, frozen: not the tied pair, not square
    assert net.twin.up.weight is net.wide.up.weight and net.wide.up.weight.is_contiguous()
    assert net.square.up.weight.is_contiguous()
    assert not net.frozen.up.weight.is_contiguous() and not net.frozen.up.weight.requires_grad


def test_training_still_works_on_the_laid_out_factors():
    torch.manual_seed(0)
    net = _Net()
    inference_layout(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 5))
    first = net(ids).square().mean()
    for _ in range(5):
        opt.zero_grad()
        loss = net(ids).square().mean()
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    assert net.wide.up.weight.grad.shape == net.wide.up.weight.shape


def test_load_gives_the_layout_and_the_same_tokens(tmp_path):
    from hf_models import hub_model

    from lowrank_cli.models.build import build_model
    from lowrank_cli.models.generation import CachedDecoder, greedy
    from lowrank_cli.pipelines.factorize import factorize_checkpoint
    from lowrank_cli.recipe import load_recipe

    recipe = load_recipe("causal-lm")
    recipe = recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform"})})
    path = factorize_checkpoint(hub_model(tmp_path, "llama-tied"), recipe, tmp_path / "lm.lowrank").out
    plain, laid = build_model(path).model, lowrank_cli.load(path)
    ups = [m.up.weight for m in laid.modules() if isinstance(m, LowRankLinear)]
    assert ups and all(w.stride() == (1, w.shape[0]) for w in ups)
    assert all(m.up.weight.is_contiguous() for m in plain.modules() if isinstance(m, LowRankLinear))
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(laid(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(ids)
    assert torch.equal(greedy(CachedDecoder(laid), ids, mask, 8), greedy(CachedDecoder(plain), ids, mask, 8))
    save_checkpoint(tmp_path / "again.safetensors", laid.state_dict())  # the writer stores the factors as before
    again, stored = load_tensors(tmp_path / "again.safetensors"), plain.state_dict()
    assert again.keys() == stored.keys() and all(torch.equal(again[k], v) for k, v in stored.items())
