"""The training loop: schedule, resumable data order, training state without pickles, resume, NaN."""

import importlib
import json
import math
import socket

import pytest
import torch
from conftest import tiny_recipe, tiny_vit

from lowrank_cli.data import EpochSampler
from lowrank_cli.distill.distributed import DistEnv
from lowrank_cli.distill.train import create_optimizer, learning_rate, lr_at, rng_state, train
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.rundir import Position, TrainingState, load_training_state, save_training_state
from lowrank_cli.models import load
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import DistillConfig, load_recipe


def test_learning_rate_from_global_batch():
    cfg = DistillConfig(lr_base=5e-4, lr_base_size=512)
    assert learning_rate(cfg, 256) == pytest.approx(2.5e-4)
    assert learning_rate(cfg.model_copy(update={"lr_base_scale": "sqrt"}), 128) == pytest.approx(2.5e-4)
    assert learning_rate(cfg.model_copy(update={"lr": 1e-3}), 4096) == 1e-3


def test_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_sampler_shards_and_resumes_without_global_rng():
    a, b = EpochSampler(50, 4, rank=0, world=2, seed=1), EpochSampler(50, 4, rank=1, world=2, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 24 and not set(ia) & set(ib)  # 25 each, 6 whole batches of 4
    state = torch.get_rng_state()
    a.set_epoch(3, start_batch=2)
    assert list(a) == ia[8:]
    assert torch.equal(torch.get_rng_state(), state)
    a.set_epoch(4)
    assert list(a) != ia


def test_grouped_sampler_batches_similar_lengths_in_a_shuffled_order_and_shards_as_one_process():
    lengths = torch.randint(4, 129, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    one = EpochSampler(400, 16, seed=2, lengths=lengths, group=8)
    one.set_epoch(1)
    order = list(one)
    assert sorted(order) == sorted(set(order)) and len(order) == 400  # every document once (400 = 25 whole batches)
    batches = [order[i:i + 16] for i in range(0, 400, 16)]
    padded = sum(16 * max(lengths[i] for i in b) for b in batches)
    random = EpochSampler(400, 16, seed=2)
    random.set_epoch(1)
    plain = list(random)
    padded_random = sum(16 * max(lengths[i] for i in plain[k:k + 16]) for k in range(0, 400, 16))
    assert padded < 0.7 * padded_random  # far less padding than random batches of the same documents
    tops = [max(lengths[i] for i in b) for b in batches]
    assert tops != sorted(tops, reverse=True) and tops != sorted(tops)  # the batches themselves come shuffled
    # two processes: each takes every other document of the same global batches of 2 × 8
    ranks = [EpochSampler(400, 8, rank=r, world=2, seed=2, lengths=lengths, group=8) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    halves = [list(s) for s in ranks]
    for k, b in enumerate(batches):
        assert set(halves[0][k * 8:(k + 1) * 8]) | set(halves[1][k * 8:(k + 1) * 8]) == set(b)
    ranks[0].set_epoch(1, start_batch=3)  # resumes mid-epoch exactly
    assert list(ranks[0]) == halves[0][24:]
    one.set_epoch(2)
    assert list(one) != order
    with pytest.raises(ValueError, match="lengths"):
        EpochSampler(10, 2, lengths=[1, 2])


def test_evaluation_batches_are_sorted_by_length_and_bounded_in_tokens():
    from lowrank_cli.data.loaders import length_batches

    lengths = [5, 100, 30, 100, 7, 64, 1]
    batches = length_batches(lengths, max_rows=3, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [1, 3]  # 3 × 100 > 200 tokens
    assert all(len(b) <= 3 and len(b) * lengths[b[0]] <= 200 for b in batches)
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert length_batches([500], 4, 100) == [[0]]  # one document longer than the bound is a batch of its own


def test_training_state_round_trip_is_pickle_free(tmp_path):
    model = tiny_vit()
    opt = create_optimizer(model, DistillConfig(), 1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "state.safetensors"
    save_training_state(path, TrainingState(Position(5, 1, 2), opt.state_dict(), {}, rng_state()))
    assert path.read_bytes()[:2] != b"PK"  # not a torch.save zip
    back = load_training_state(path)
    assert back.position == Position(5, 1, 2)
    opt2 = create_optimizer(model, DistillConfig(), 1e-3)
    opt2.load_state_dict(back.optimizer)
    for k, v in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt2.state_dict()["state"][k][name], v[name])
    assert torch.equal(back.rng["torch"], torch.get_rng_state())


def test_no_weight_decay_on_embedding_tables_found_by_module_type():
    from lowrank_cli.nn.lowrank import LowRankEmbedding

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = torch.nn.Embedding(50, 8)  # no "embed" in the name: found by type
            self.positions = LowRankEmbedding(16, 8, rank=3)
            self.mixer = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.head = torch.nn.Linear(8, 50, bias=False)
            self.head.weight = self.tokens.weight  # tied to the table: one parameter, no decay

    model = Tiny()
    opt = create_optimizer(model, DistillConfig(weight_decay=0.05), 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, none = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert decay == ["mixer.weight"]
    assert sorted(none) == ["mixer.bias", "norm.bias", "norm.weight", "positions.lookup.weight", "positions.proj.weight", "tokens.weight"]


def test_nonfinite_loss_stops_with_a_checkpoint_of_good_weights():
    model = tiny_vit().train()
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    calls = {"n": 0}

    def objective(m, x, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(m(x), y)
        return (loss * float("nan") if calls["n"] == 3 else loss), {"ce": loss.detach()}

    saved = []
    with pytest.raises(LowrankError, match=r"the loss became nan at step 3 .*saved the weights before this step to ckpt-2"):
        train(model, objective, dataset, DistillConfig(epochs=5, batch_size=8, lr=1e-3), DistEnv(),
              checkpoint=lambda pos, opt, scaler: saved.append(pos.step) or f"ckpt-{pos.step}")
    assert saved == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, vit_ckpt):
    recipe = load_recipe(str(tiny_recipe(tmp_path)))
    full = compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "full", device="cpu")
    assert full["train"]["steps"] == 8

    def interrupt(pos):
        if pos.step == 5:  # after the checkpoint at step 3: steps 4 and 5 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "cut", device="cpu", step_hook=interrupt)
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-000003.safetensors", "checkpoint-000003.state.safetensors"]
    assert not (cut / "student.safetensors").exists() and not (cut / ".lock").exists()  # the lock goes with the process
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 5  # steps 1-5, of which 4 and 5 will be redone
    # what a kill -9 mid-write leaves: temporaries of atomic writes, and a lock whose process is gone
    (cut / ".checkpoint-000006.safetensors.k2j3h4.tmp").write_bytes(b"half a checkpoint")
    (cut / ".student.safetensors.x8y9z0.tmp").write_bytes(b"half a student")
    (cut / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "earlier", "token": "dead"}))
    resumed = compress_checkpoint(vit_ckpt, recipe, out=cut, device="cpu", resume=True)
    assert not list(cut.glob(".*.tmp")) and not (cut / ".lock").exists()
    assert [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))  # no step twice
    assert resumed["train"]["steps"] == 8
    a, b = load(tmp_path / "full" / "student.safetensors"), load(cut / "student.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    assert resumed["rank_weight_sha256"] == full["rank_weight_sha256"]
    # the metrics of the redone steps equal the uninterrupted run's
    lines = lambda p: {r["step"]: r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    full_m, cut_m = lines(tmp_path / "full"), lines(cut)
    assert set(cut_m) == set(range(1, 9))
    assert all(math.isclose(full_m[s], cut_m[s], rel_tol=1e-6) for s in range(1, 9))


def test_dropout_off_for_a_student_that_only_matches_its_teacher():
    from transformers import BertConfig, BertModel

    from lowrank_cli.distill.train import without_dropout

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).train()
    x = torch.randint(0, 100, (2, 8))
    assert not torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)  # dropout draws differ
    without_dropout(model)
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert DistillConfig().dropout is True and DistillConfig(dropout=False).dropout is False


# --- the GPU path on the CPU: per-device CUDA RNG, finiteness before each checkpoint (issue 18) ---------

def test_cuda_rng_state_is_this_process_device_only(tmp_path, monkeypatch):
    tr = importlib.import_module("lowrank_cli.distill.train")  # the package exports a function of the same name

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device, int(state[0]))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every GPU's state restored"))

    state = tr.rng_state(torch.device("cuda", 1))
    assert calls == [("get", 1)] and len(state["cuda"]) == 1
    assert "cuda" not in tr.rng_state(torch.device("cpu"))
    tr.rng_state()  # no device: the current one
    assert calls[-1] == ("get", 3)
    # through the file: one CUDA state, restored to this process's GPU whatever its index
    path = tmp_path / "state.safetensors"
    save_training_state(path, TrainingState(Position(1, 0, 1), {"state": {}, "param_groups": []}, {}, state))
    back = load_training_state(path)
    assert len(back.rng["cuda"]) == 1
    calls.clear()
    tr.set_rng_state(back.rng, torch.device("cuda", 0))
    tr.set_rng_state(back.rng, torch.device("cuda", 5))
    assert calls == [("set", 0, 7), ("set", 5, 7)]
    # a state written before (one per visible GPU): this GPU's own entry, else the first
    calls.clear()
    old = {"cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(3)]}
    tr.set_rng_state(old, torch.device("cuda", 1))
    tr.set_rng_state(old, torch.device("cuda", 4))
    tr.set_rng_state(old, torch.device("cpu"))  # a CPU run does not touch the GPUs
    assert calls == [("set", 1, 1), ("set", 4, 0)]


def test_nan_between_log_steps_writes_no_checkpoint_and_keeps_the_good_ones(tmp_path, vit_ckpt, monkeypatch):
    """The CUDA / multi-process path (loss read only at log steps): a NaN at step 3 is caught before the checkpoint of step 3."""
    tr = importlib.import_module("lowrank_cli.distill.train")  # the package exports a function of the same name
    import lowrank_cli.pipelines.common.run_loop as pc

    monkeypatch.setattr(tr, "_checks_every_step", lambda device, env: False)
    calls = {"n": 0}

    class NanAtThree(pc.DistillationObjective):
        def __call__(self, model, inputs, labels):
            calls["n"] += 1
            loss, terms = super().__call__(model, inputs, labels)
            return (loss * float("nan") if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(pc, "DistillationObjective", NanAtThree)
    recipe = load_recipe(str(tiny_recipe(tmp_path, checkpoint_every=1, keep_checkpoints=2, log_every=100)))
    out = tmp_path / "run"
    with pytest.raises(LowrankError, match=r"became NaN/inf between step 3 and step 3; no checkpoint written; the last checkpoint, .*checkpoint-000002"):
        compress_checkpoint(vit_ckpt, recipe, out=out, device="cpu")
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == [f"checkpoint-00000{s}{x}.safetensors" for s in (1, 2) for x in ("", ".state")]
    last = load(out / "checkpoint-000002.safetensors")
    assert all(torch.isfinite(v).all() for v in last.state_dict().values())


def test_resume_on_more_processes_mid_epoch_moves_to_the_next_epoch():
    """A position saved by fewer processes (batch 3 of 4) where this run's epoch has 2 batches: the next epoch, not a hang."""
    model = tiny_vit().train()
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    cfg = DistillConfig(epochs=3, batch_size=8, lr=1e-3)
    state = TrainingState(Position(3, 0, 3), create_optimizer(model, cfg, 1e-3).state_dict(), {}, rng_state())
    positions = []
    result = train(model, lambda m, x, y: (torch.nn.functional.cross_entropy(m(x), y), {}), dataset, cfg, DistEnv(), resume=state,
                   step_hook=lambda pos: positions.append((pos.step, pos.epoch, pos.batch)))
    assert result.steps == 6 and positions == [(4, 1, 1), (5, 2, 0), (6, 2, 1)]


def test_adamw_is_foreach_on_the_cpu_and_fused_on_cuda():
    from types import SimpleNamespace

    from lowrank_cli.distill.train import adamw_implementation

    opt = create_optimizer(tiny_vit(), DistillConfig(), 1e-3)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert adamw_implementation([gpu, gpu]) == {"fused": True}
    assert adamw_implementation([gpu, cpu]) == {"foreach": True} and adamw_implementation([]) == {"foreach": True}
