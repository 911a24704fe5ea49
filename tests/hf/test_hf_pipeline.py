"""Text models through compress, distill, evaluate, export and bench; and every bad input of a Hub folder or of text."""

import json
import shutil

import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args, one_line_error
from hf_models import hub_model

from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models import build_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: hub_model(root, kind) for kind in ("bert", "bert-cls", "gpt2")}


def _recipe(tmp_path, base: str, **distill) -> str:
    settings = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0, "log_every": 5, **distill}
    text = (f"name: {base}-tiny\nselect:\n  exclude: [pooler, classifier, lm_head]\nfactorize:\n  kappa: 2\n"
            f"data:\n  source: pydoc\n  num_workers: 0\ndistill: {json.dumps(settings)}\n")
    path = tmp_path / f"{base}.yaml"
    path.write_text(text)
    return str(path)


def test_compress_a_sentence_encoder_on_real_text(cli, hub, tmp_path):
    out = tmp_path / "run"
    r = cli("compress", hub["bert"], "--recipe", _recipe(tmp_path, "bert", pooled_cosine=1.0, token_noise=0.2), "--out", out, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["task"] == "features" and rep["train"]["base_loss"] == "none"
    assert "pydoc_data.topics" in rep["data"]["split"] and rep["data"]["val"] == 177  # a seeded held-out split, stated
    svd, dist, teacher = (rep["accuracy"][k] for k in ("svd", "distilled", "teacher"))
    assert teacher["mean_cosine"] == pytest.approx(1.0) and teacher["neighbour_agreement"] == 1.0
    assert 0 < svd["min_cosine"] <= svd["mean_cosine"] <= 1 and dist["examples"] == 177
    assert {"config.json", "tokenizer.json", "student.safetensors"} <= {p.name for p in out.iterdir()}  # the run is a Hub folder
    r = cli("evaluate", out, "--data", "pydoc", "--teacher", hub["bert"], "--json")
    assert r.code == 0, r.err
    e = json.loads(r.out)
    assert e["mean_cosine"] == pytest.approx(dist["mean_cosine"], abs=1e-5) and e["neighbour_agreement"] == dist["neighbour_agreement"]
    one_line_error(cli("evaluate", out, "--data", "pydoc"), "judged by how close its embeddings are to its teacher's", "--teacher")


def test_compress_a_causal_lm_by_kl_and_pclora(cli, hub, tmp_path):
    r = cli("compress", hub["gpt2"], "--recipe", _recipe(tmp_path, "gpt2"), "--out", tmp_path / "kl", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["task"] == "causal-lm" and rep["train"]["base_loss"] == "kl"
    ppl = {k: rep["accuracy"][k]["perplexity"] for k in ("teacher", "svd", "distilled")}
    assert all(1 < v < 1e4 for v in ppl.values())
    pc = tmp_path / "pc.yaml"
    pc.write_text(open(_recipe(tmp_path, "gpt2")).read().replace("distill: {", 'distill: {"method": "pclora", "pclora": {"init": "svd"}, '))
    r = cli("compress", hub["gpt2"], "--recipe", pc, "--out", tmp_path / "pc", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["method"] == "pclora" and json.loads(r.out)["accuracy"]["distilled"]["perplexity"] > 1


def test_a_classifier_on_labelled_jsonl(cli, hub, tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    lines = [json.dumps({"text": f"document number {i} about {'abc'[i % 3]} things", "label": i % 3}) for i in range(60)]
    (data / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (data / "val.jsonl").write_text("\n".join(lines[48:]) + "\n")
    r = cli("compress", hub["bert-cls"], "--recipe", _recipe(tmp_path, "bert"), "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["task"] == "classification" and rep["train"]["base_loss"] == "ce"
    assert rep["data"]["split"].startswith("its train") and rep["accuracy"]["distilled"]["examples"] == 12
    assert 0 <= rep["accuracy"]["distilled"]["top1"] <= 1


def test_export_onnx_with_dynamic_batch_and_sequence_and_bench(cli, hub, tmp_path):
    fact = tmp_path / "f"
    assert cli("factorize", hub["bert"], "--recipe", "bert", "--out", fact).code == 0
    out = tmp_path / "bert.onnx"
    r = cli("export", fact, "--format", "onnx", "--out", out, "--json")
    assert r.code == 0, r.err
    v = json.loads(r.out)["verification"]
    assert v["shapes"] == ["1 × 7 tokens", "3 × 19 tokens"] and v["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    model = build_model(fact)
    ids = torch.randint(5, 300, (4, 33))
    mask = torch.ones_like(ids)
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model.family.forward(model.model, {"input_ids": ids, "attention_mask": mask})
    assert abs(got - want.numpy()).max() < 1e-4  # a shape never seen at export
    r = cli("bench", fact, "--seq-len", "16", "--batch", "2", "--repeats", "2", "--warmup", "0", "--json")
    assert r.code == 0, r.err
    b = json.loads(r.out)
    assert b["seq_len"] == 16 and b["ideal_speedup"] > 1
    one_line_error(cli("bench", fact, "--seq-len", "65"), "--seq-len 65 is above the model's maximum of 64 positions")
    one_line_error(cli("inspect", hub["bert"], "--seq-len", "500"), "above the model's maximum of 64 positions")


def test_dense_export_of_a_causal_lm_keeps_its_tied_head(cli, hub, tmp_path):
    fact = tmp_path / "g"
    assert cli("factorize", hub["gpt2"], "--recipe", "causal-lm", "--out", fact).code == 0
    r = cli("export", fact, "--format", "dense", "--out", tmp_path / "dense", "--json")
    assert r.code == 0, r.err
    model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "dense"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_bad_hub_folders_and_text(cli, hub, tmp_path, vit_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("inspect", empty), "a folder without model.safetensors")
    noconfig = tmp_path / "noconfig"
    shutil.copytree(hub["bert"], noconfig)
    (noconfig / "config.json").unlink()
    one_line_error(cli("compress", noconfig, "--recipe", "bert", "--out", tmp_path / "r1"), "no config.json", "--model")
    badjson = tmp_path / "badjson"
    shutil.copytree(hub["bert"], badjson)
    (badjson / "config.json").write_text("{nope")
    one_line_error(cli("inspect", badjson), "config.json: not a valid JSON config")
    unknown = tmp_path / "unknown"
    shutil.copytree(hub["bert"], unknown)
    (unknown / "config.json").write_text(json.dumps({**json.loads((hub["bert"] / "config.json").read_text()), "model_type": "bort"}))
    one_line_error(cli("inspect", unknown), "model_type 'bort' is not one transformers")
    other = tmp_path / "other"
    shutil.copytree(hub["bert"], other)
    (other / "config.json").write_text(json.dumps({**json.loads((hub["bert"] / "config.json").read_text()), "num_hidden_layers": 3}))
    one_line_error(cli("inspect", other), "does not match architecture 'BertModel'", "missing keys", "encoder.layer.2")
    notok = tmp_path / "notok"
    shutil.copytree(hub["bert"], notok)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (notok / f).unlink(missing_ok=True)
    one_line_error(cli("compress", notok, "--recipe", "bert", "--out", tmp_path / "r2"), "no tokenizer found beside the checkpoint")
    texts = {"empty.txt": b"\n\n", "binary.txt": b"\x00\x01\x02abc", "latin.txt": "caf\xe9\n".encode("latin-1"),
             "notext.jsonl": b'{"title": "x"}\n'}
    needles = {"empty.txt": "holds no text", "binary.txt": "is binary, not text", "latin.txt": "is not UTF-8 text",
               "notext.jsonl": "line 1 has no 'text' string"}
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"run-{name}"
        one_line_error(cli("compress", hub["bert"], "--recipe", "bert", "--data", tmp_path / name, "--out", out), name, needles[name])
        assert not out.exists()
    one_line_error(cli("compress", hub["bert"], "--recipe", "bert", "--data", "digits", "--out", tmp_path / "r3"), "is images, and this is a text model")
    one_line_error(cli("compress", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--data", "pydoc", "--out", tmp_path / "r4"),
                   "is text, and this is an image model")
    one_line_error(cli("inspect", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--seq-len", "16"), "--seq-len applies to text models")
    noisy = tmp_path / "noisy.yaml"
    noisy.write_text(f"name: noisy\nmodel: {TINY_VIT}\nmodel_kwargs: {json.dumps(TINY_VIT_KWARGS)}\ndata: {{source: digits}}\n"
                     "distill: {epochs: 1, token_noise: 0.2}\n")
    one_line_error(cli("compress", vit_ckpt, "--recipe", noisy, "--out", tmp_path / "r5"), "distill.token_noise 0.2 replaces tokens of text",
                   "this model's data is images", "set distill.token_noise to 0")
    bad = tmp_path / "bad-noise.yaml"
    bad.write_text(open(_recipe(tmp_path, "bert", token_noise=1.0)).read())
    one_line_error(cli("compress", hub["bert"], "--recipe", bad, "--out", tmp_path / "r6"), "token_noise")
    shifted = tmp_path / "shifted.yaml"
    shifted.write_text(open(_recipe(tmp_path, "bert")).read().replace("  num_workers: 0\n", "  num_workers: 0\n  max_shift: 1\n"))
    one_line_error(cli("compress", hub["bert"], "--recipe", shifted, "--out", tmp_path / "r7"), "data.max_shift 1",
                   "this model's data is text", "remove data.max_shift")
    synthetic = tmp_path / "shifted-synthetic.yaml"
    synthetic.write_text(f"name: shifted\nmodel: {TINY_VIT}\nmodel_kwargs: {json.dumps(TINY_VIT_KWARGS)}\n"
                         "data: {source: synthetic, max_shift: 0}\ndistill: {epochs: 1}\n")
    one_line_error(cli("compress", vit_ckpt, "--recipe", synthetic, "--out", tmp_path / "r8"), "data.max_shift 0",
                   "data 'synthetic' takes none", "use data.source digits")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 9))


def test_compress_from_whitened_factors_calibrated_on_the_training_text(cli, hub, tmp_path):
    recipe = tmp_path / "whitened.yaml"
    recipe.write_text(open(_recipe(tmp_path, "bert")).read().replace("  kappa: 2\n", "  kappa: 2\n  method: whitened\n  calib_samples: 32\n"))
    out = tmp_path / "run"
    r = cli("compress", hub["bert"], "--recipe", recipe, "--out", out, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert 0 < json.loads(r.out)["accuracy"]["svd"]["mean_cosine"] <= 1  # the whitened student before distillation
    manifest = Manifest.from_header(read_header(out / "student.safetensors"))
    assert {e.method for e in manifest.layers.values() if e.kind == "linear"} == {"whitened"}
    assert manifest.recipe["factorize"]["calib_data"] == "pydoc"  # the training documents, recorded
    r = cli("compress", hub["bert"], "--recipe", recipe, "--out", out, "--device", "cpu", "--resume", "--json")
    assert r.code == 0, r.err  # the defaulted calib_data is the run's recipe: it resumes


def test_pclora_factorizes_the_embedding_tables_as_asked(cli, hub, tmp_path):
    """factorize.embeddings under PC-LoRA: the word table ends as a LowRankEmbedding, as PELA's does, same size."""
    base = open(_recipe(tmp_path, "bert")).read().replace("  kappa: 2\n", "  kappa: 2\n  embeddings: {kappa: 2}\n")
    reports = {}
    for method in ("pela", "pclora"):
        path = tmp_path / f"{method}.yaml"
        path.write_text(base.replace("distill: {", f'distill: {{"method": "{method}", "pclora": {{"init": "svd"}}, '))
        r = cli("compress", hub["bert"], "--recipe", path, "--out", tmp_path / method, "--device", "cpu", "--json")
        assert r.code == 0, r.err
        reports[method] = json.loads(r.out)
    assert reports["pclora"]["params_after"] == reports["pela"]["params_after"] < reports["pela"]["params_before"]
    for method in ("pela", "pclora"):
        manifest = Manifest.from_header(read_header(tmp_path / method / "student.safetensors"))
        assert manifest.layers["embeddings.word_embeddings"].rank is not None
        student = build_model(tmp_path / method / "student.safetensors").model
        assert type(student.embeddings.word_embeddings).__name__ == "LowRankEmbedding"


@pytest.mark.slow
def test_two_processes_train_a_bert_whose_pooler_gets_no_gradient(hub, tmp_path):
    """The features loss never reads BertModel's pooler: DDP would wait for its gradient (issue 17); it is frozen, named, untouched."""
    import os
    import subprocess
    import sys

    data = tmp_path / "docs.txt"
    data.write_text("".join(f"document {i} is about {'abc'[i % 3]} things and more words\n" for i in range(80)))  # 64 train, 16 val
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "compress", str(hub["bert"]), "--recipe", _recipe(tmp_path, "bert", pooled_cosine=1.0),
                           "--data", str(data), "--out", str(out), "--device", "cpu", "--nproc", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    digests = report["rank_weight_sha256"]
    assert report["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert report["train"]["steps"] == 2 and report["train"]["untrained"] == ["pooler.dense.weight", "pooler.dense.bias"]
    assert "left untrained (no gradient reaches them from the loss): pooler.dense.weight, pooler.dense.bias" in proc.stderr + proc.stdout
    student, teacher = build_model(out / "student.safetensors").model, build_model(hub["bert"]).model
    assert torch.equal(student.pooler.dense.weight, teacher.pooler.dense.weight)  # left as it was
    assert not torch.equal(student.encoder.layer[0].output.LayerNorm.weight, teacher.encoder.layer[0].output.LayerNorm.weight)  # trained


def test_evaluate_a_lone_factorized_file_on_a_whole_text_file_beside_its_teacher(cli, hub, tmp_path):
    """Issue 17.4: the tokenizer from the teacher's folder, a file given to evaluate is all evaluated, the teacher's perplexity beside."""
    fact = tmp_path / "gpt2.k2.safetensors"  # written away from the Hub folder: no tokenizer beside it
    assert cli("factorize", hub["gpt2"], "--recipe", "causal-lm", "--out", fact).code == 0
    data = tmp_path / "docs.txt"
    data.write_text("".join(f"line {i} of the text, with some words in it\n" for i in range(10)))
    one_line_error(cli("evaluate", fact, "--data", data), f"{fact}: text data needs a tokenizer", "no folder with a tokenizer", "--teacher")
    r = cli("evaluate", fact, "--data", data, "--teacher", hub["gpt2"], "--json")
    assert r.code == 0, r.err
    e = json.loads(r.out)
    assert e["examples"] == 10 and e["split"] == "docs.txt: all 10 documents (no split: given for evaluation)"
    t = e["teacher"]
    assert t["checkpoint"] == str(hub["gpt2"]) and t["examples"] == 10 and t["logit_cosine"] == pytest.approx(1.0)
    assert 1 < t["perplexity"] < 1e4 and 1 < e["perplexity"] < 1e4 and t["perplexity"] != e["perplexity"]
    r = cli("evaluate", fact, "--data", data, "--teacher", hub["gpt2"])
    assert r.code == 0, r.err
    assert f"teacher {hub['gpt2']}" in r.out and f"{t['perplexity']:.2f}" in r.out and f"{e['perplexity']:.2f}" in r.out
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "train.txt").write_text("a training line with words\n" * 5)
    (parts / "val.txt").write_text("a held out line with words\n" * 3)
    r = cli("evaluate", fact, "--data", parts, "--teacher", hub["gpt2"], "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["examples"] == 3 and json.loads(r.out)["split"].startswith("its train")  # a folder's val part
