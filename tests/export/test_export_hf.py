"""`lowrank export --format hf`: Hub folders that stock transformers (and sentence-transformers) load without lowrank.

Tiny models (a Llama-style causal LM with its head tied to its embeddings and a chat template, a GPT-2 with its
transposed Conv1D layers, a BERT sentence encoder with its word embeddings factorized and a pooling config) are
factorized and exported; one subprocess in which `import lowrank_cli` fails loads every folder with transformers'
`from_pretrained(..., trust_remote_code=True)` and reports outputs, weights, loading info and generations, which are
compared here with `lowrank_cli.load`'s model. (The file is not named test_hf_export.py: tests/hf/ has one, and the
suite's test modules are imported by their base names.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_VIT, TINY_VIT_KWARGS, one_line_error, tiny_vit
from hf_models import hub_model
from safetensors.torch import load_file, save_file

import lowrank_cli.pipelines.export as export_pipeline
from lowrank_cli.errors import LowrankError
from lowrank_cli.export.hf import LAYERS_KEY
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.measure.macs import count_params
from lowrank_cli.models import load
from lowrank_cli.pipelines.export import export_checkpoint, export_hf_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import EmbeddingsConfig, load_recipe

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
SENTENCES = ["the module returns a list of names", "an object that holds the state", "print the value"]
POOLING = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def _svd(name: str, **factorize):
    """A recipe with plain SVD and uniform ranks: what is checked here is the folder, not the factors' method."""
    recipe = load_recipe(name)
    return recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform", **factorize})})


def _sentence_encoder(root: Path) -> Path:
    """A tiny BERT Hub folder with sentence-transformers' files (mean pooling, normalized), as all-MiniLM-L6-v2's."""
    folder = hub_model(root, "bert", name="bert-st")
    (folder / "modules.json").write_text(json.dumps(MODULES))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(POOLING))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers": "2.0.0"}}))
    return folder


@pytest.fixture(scope="module")
def factorized(tmp_path_factory) -> dict[str, Path]:
    """name -> factorized folder: llama (tied head, chat template), gpt2 (Conv1D), bert-st (embeddings factorized too)."""
    root = tmp_path_factory.mktemp("hf-sources")
    out = {}
    for kind, recipe in (("llama-tied", _svd("causal-lm")), ("gpt2", _svd("causal-lm"))):
        out[kind] = factorize_checkpoint(hub_model(root, kind), recipe, root / f"{kind}.lowrank").out
    out["bert-st"] = factorize_checkpoint(_sentence_encoder(root), _svd("bert", embeddings=EmbeddingsConfig(kappa=2)), root / "bert-st.lowrank").out
    return out


@pytest.fixture(scope="module")
def exported(factorized, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (hf folder, ExportResult): each factorized model in fp32, and the Llama in bf16."""
    root = tmp_path_factory.mktemp("hf-exports")
    out = {name: (root / name, export_checkpoint(fact, "hf", root / name)) for name, fact in factorized.items()}
    out["llama-bf16"] = (root / "llama-bf16", export_checkpoint(factorized["llama-tied"], "hf", root / "llama-bf16", dtype="bfloat16"))
    return out


# Run in a fresh interpreter in which lowrank_cli cannot be imported (it is installed here): stock transformers alone.
LOADER = r'''
import json, sys

class NoLowrank:
    def find_spec(self, name, path=None, target=None):
        if name == "lowrank_cli" or name.startswith("lowrank_cli."):
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, NoLowrank())
try:
    import lowrank_cli
    blocked = False
except ImportError:
    blocked = True
import torch, transformers
from safetensors.torch import load_file, save_file

job = json.loads(sys.argv[1])
inputs = load_file(job["inputs"])
ids, mask = inputs["input_ids"], inputs["attention_mask"]
results, tensors = {"lowrank_blocked": blocked, "lowrank_loaded": "lowrank_cli" in sys.modules}, {}

def load(auto, folder):
    model, info = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    return model.eval(), {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}

for task in job["tasks"]:
    name, folder, r = task["name"], task["folder"], {}
    results[name] = r
    for i, auto in enumerate(task["autos"]):
        model, info = load(auto, folder)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        y = getattr(out, "logits", None)
        tensors[f"{name}/{auto}"] = (y if y is not None else out.last_hidden_state).float().contiguous()
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        r[auto] = {"class": type(model).__name__, "info": info, "params": params, "dtype": str(model.dtype).removeprefix("torch.")}
        if i == 0:
            tensors.update({f"{name}/state/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    if task.get("generate"):
        model = load("AutoModelForCausalLM", folder)[0]
        r["generated"] = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False).tolist()
        pipe = transformers.pipeline("text-generation", model=folder, trust_remote_code=True)
        r["pipeline"] = pipe("def read(path):", max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]["generated_text"]
        r["chat"] = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(job["messages"], tokenize=False)
        try:
            transformers.AutoModelForCausalLM.from_pretrained(folder)
            r["untrusted"] = "loaded"
        except Exception as e:
            r["untrusted"] = f"{type(e).__name__}: {e}"
    if task.get("sentences"):
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        tensors[f"{name}/st"] = st.encode(task["sentences"], convert_to_tensor=True).float().contiguous()
        r["st_modules"] = [type(m).__name__ for m in st]
        r["st_max_seq_length"] = st.max_seq_length

save_file(tensors, job["out"])
with open(job["results"], "w") as f:
    json.dump(results, f)
'''


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second example
    return {"input_ids": ids, "attention_mask": mask}


def has_sentence_transformers() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


@pytest.fixture(scope="module")
def stock(exported, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """What stock transformers made of every exported folder, in a process without lowrank: (results, tensors)."""
    work = tmp_path_factory.mktemp("stock")
    save_file(_inputs(), str(work / "inputs.safetensors"))
    tasks = [
        {"name": "llama-tied", "folder": str(exported["llama-tied"][0]), "autos": ["AutoModelForCausalLM", "AutoModel"], "generate": True},
        {"name": "llama-bf16", "folder": str(exported["llama-bf16"][0]), "autos": ["AutoModelForCausalLM"]},
        {"name": "gpt2", "folder": str(exported["gpt2"][0]), "autos": ["AutoModelForCausalLM", "AutoModel"]},
        {"name": "bert-st", "folder": str(exported["bert-st"][0]), "autos": ["AutoModel"],
         "sentences": SENTENCES if has_sentence_transformers() else None},
    ]
    job = {"inputs": str(work / "inputs.safetensors"), "out": str(work / "out.safetensors"), "results": str(work / "results.json"),
           "tasks": tasks, "messages": MESSAGES}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(job)], cwd=work, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "results.json").read_text()), load_file(str(work / "out.safetensors"))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _clean(info: dict) -> bool:
    return not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_the_folder_holds_the_factors_and_names_its_code(factorized, exported):
    folder, result = exported["llama-tied"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                                                               "model.safetensors", "modeling_lowrank.py", "tokenizer.json", "tokenizer_config.json"])
    stored = read_header(folder / "model.safetensors").tensors
    assert stored.keys() == read_header(factorized["llama-tied"] / "model.safetensors").tensors.keys()  # the same tensors, nothing dense
    config = json.loads((folder / "config.json").read_text())
    layers = config[LAYERS_KEY]
    assert len(layers) == result.factorized_layers == 14 and layers["model.layers.0.self_attn.q_proj"]["kind"] == "linear"
    for name, entry in layers.items():
        assert stored[f"{name}.down.weight"].shape == (entry["rank"], entry["d_in"]) and f"{name}.weight" not in stored
    assert "lm_head.weight" not in stored and config["tie_word_embeddings"] is True  # the tied head stored once, as transformers does
    assert config["model_type"] == "lowrank_llama" and config["architectures"] == ["LowRankLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_lowrank.LowRankLlamaConfig", "AutoModel": "modeling_lowrank.LowRankLlamaModel",
                                  "AutoModelForCausalLM": "modeling_lowrank.LowRankLlamaForCausalLM"}
    code = (folder / "modeling_lowrank.py").read_text()
    assert "lowrank_cli" not in code and "class LowRankLlamaForCausalLM(LowRankMixin, transformers.LlamaForCausalLM):" in code
    assert result.format == "hf" and result.dtype == "float32" and result.weight_files == ["model.safetensors"]
    assert result.bytes_after == (folder / "model.safetensors").stat().st_size
    assert result.params == count_params(load(factorized["llama-tied"]))
    v = result.verification
    assert v["passed"] and v["relative_diff"] <= 1e-5 and v["tolerance"] == 5e-4 and v["loaded_dtypes"] == ["float32"]


def test_stock_transformers_loads_it_without_lowrank(factorized, stock):
    results, tensors = stock
    assert results["lowrank_blocked"] and not results["lowrank_loaded"]
    r = results["llama-tied"]
    model = load(factorized["llama-tied"])
    x = _inputs()
    with torch.no_grad():
        logits = model(**x).logits
        hidden = model.model(**x).last_hidden_state
    assert r["AutoModelForCausalLM"]["class"] == "LowRankLlamaForCausalLM" and r["AutoModel"]["class"] == "LowRankLlamaModel"
    assert _clean(r["AutoModelForCausalLM"]["info"]) and _clean(r["AutoModel"]["info"])
    assert _relative(tensors["llama-tied/AutoModelForCausalLM"], logits) <= 1e-5
    assert _relative(tensors["llama-tied/AutoModel"], hidden) <= 1e-5
    assert r["AutoModelForCausalLM"]["params"] == count_params(model)
    state = model.state_dict()  # every tensor the factorized model's: nothing initialized at random
    loaded = {k.removeprefix("llama-tied/state/"): v for k, v in tensors.items() if k.startswith("llama-tied/state/")}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])


def test_generate_pipeline_and_chat_template_work(factorized, stock):
    r = stock[0]["llama-tied"]
    model = load(factorized["llama-tied"])
    x = _inputs()
    with torch.no_grad():
        want = model.generate(x["input_ids"][:1], attention_mask=x["attention_mask"][:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert r["generated"] == want.tolist() and len(r["generated"][0]) == 9 + 6
    assert r["pipeline"].startswith("def read(path):") and len(r["pipeline"]) > len("def read(path):")
    assert r["chat"] == "<|user|>hi\n<|assistant|>hello\n"
    assert r["untrusted"].startswith("ValueError") and "trust_remote_code=True" in r["untrusted"]  # never a dense model at random


def test_bf16_folder_loads_in_bf16(factorized, exported, stock):
    folder, result = exported["llama-bf16"]
    assert {t.dtype for t in read_header(folder / "model.safetensors").tensors.values()} == {"BF16"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    v = result.verification
    assert result.dtype == "bfloat16" and v["loaded_dtypes"] == ["bfloat16"] and v["tolerance"] == 3e-2 and v["top1_agreement"] >= 0.99
    r = stock[0]["llama-bf16"]["AutoModelForCausalLM"]
    assert r["dtype"] == "bfloat16" and _clean(r["info"])
    with torch.no_grad():
        logits = load(factorized["llama-tied"])(**_inputs()).logits
    assert 0 < _relative(stock[1]["llama-bf16/AutoModelForCausalLM"], logits) <= 3e-2


def test_gpt2_conv1d_layers_load_as_factors(factorized, exported, stock):
    folder, result = exported["gpt2"]
    layers = json.loads((folder / "config.json").read_text())[LAYERS_KEY]
    assert layers and {e["kind"] for e in layers.values()} == {"conv1d"}
    r = stock[0]["gpt2"]
    assert r["AutoModelForCausalLM"]["class"] == "LowRankGPT2LMHeadModel" and r["AutoModel"]["class"] == "LowRankGPT2Model"
    assert _clean(r["AutoModelForCausalLM"]["info"]) and _clean(r["AutoModel"]["info"])
    model = load(factorized["gpt2"])
    x = _inputs()
    with torch.no_grad():
        logits, hidden = model(**x).logits, model.transformer(**x).last_hidden_state
    assert _relative(stock[1]["gpt2/AutoModelForCausalLM"], logits) <= 1e-5 and _relative(stock[1]["gpt2/AutoModel"], hidden) <= 1e-5
    assert r["AutoModelForCausalLM"]["params"] == count_params(model) == result.params


def test_bert_encoder_with_factorized_embeddings(factorized, exported, stock):
    folder, _ = exported["bert-st"]
    layers = json.loads((folder / "config.json").read_text())[LAYERS_KEY]
    assert layers["embeddings.word_embeddings"]["kind"] == "embedding"
    stored = read_header(folder / "model.safetensors").tensors
    assert "embeddings.word_embeddings.lookup.weight" in stored and "embeddings.word_embeddings.weight" not in stored
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (folder / name).read_bytes() == (factorized["bert-st"] / name).read_bytes(), name
    r = stock[0]["bert-st"]["AutoModel"]
    model = load(factorized["bert-st"])
    with torch.no_grad():
        hidden = model(**_inputs()).last_hidden_state
    assert r["class"] == "LowRankBertModel" and _clean(r["info"]) and r["params"] == count_params(model)
    assert _relative(stock[1]["bert-st/AutoModel"], hidden) <= 1e-5
    state = {k.removeprefix("bert-st/state/"): v for k, v in stock[1].items() if k.startswith("bert-st/state/")}
    assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_sentence_transformers_loads_the_encoder_with_its_pooling(factorized, exported, stock):
    pytest.importorskip("sentence_transformers")
    folder, _ = exported["bert-st"]
    r = stock[0]["bert-st"]
    assert r["st_modules"] == ["Transformer", "Pooling", "Normalize"] and r["st_max_seq_length"] == 48
    model = load(factorized["bert-st"])
    batch = transformers.AutoTokenizer.from_pretrained(str(folder))(SENTENCES, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, then Normalize
    assert _relative(stock[1]["bert-st/st"], want) <= 1e-5


def test_model_card(factorized, exported, tmp_path):
    folder, result = exported["llama-tied"]
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "- lowrank\n" in front and "- low-rank\n" in front and "base_model" not in front
    assert "pipeline_tag: text-generation" in front
    model = load(factorized["llama-tied"])
    dense = count_params(load(hub_model(tmp_path, "llama-tied")))
    assert f"parameters: {dense:,} → {result.params:,}" in body and "κ = 2" in body
    assert "| `model.layers.*.self_attn.q_proj` | 2 | 32 → 32 | 8 | 50.0% |" in body  # rank 8 of 32 × 32: 8·64 / 1024
    assert "AutoModelForCausalLM.from_pretrained(" in body and "trust_remote_code=True" in body
    assert f"lowrank export {factorized['llama-tied'].name} --format hf --out {folder.name}" in body
    assert count_params(model) == result.params
    st_card = (exported["bert-st"][0] / "README.md").read_text()
    assert "- sentence-transformers\n" in st_card and "SentenceTransformer(" in st_card and "pipeline_tag: feature-extraction" in st_card


def test_card_base_model_and_the_runs_quality(factorized, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in factorized["llama-tied"].iterdir():
        (run / ("student.safetensors" if f.name == "model.safetensors" else f.name)).write_bytes(f.read_bytes())
    report = {"student": str(run / "student.safetensors"), "task": "causal-lm", "data": {"source": "/data/smollm2-text"},
              "accuracy": {"teacher": {"examples": 300, "perplexity": 25.45, "logit_cosine": 1.0},
                           "svd": {"examples": 300, "perplexity": 38.95, "logit_cosine": 0.95},
                           "distilled": {"examples": 300, "perplexity": 37.61, "logit_cosine": 0.9499}}}
    (run / "report.json").write_text(json.dumps(report))
    res = export_hf_checkpoint(run, tmp_path / "out", base_model="HuggingFaceTB/SmolLM2-135M")
    card = (tmp_path / "out" / "README.md").read_text()
    assert res.out == str(tmp_path / "out") and "base_model: HuggingFaceTB/SmolLM2-135M\n" in card.split("---\n")[1]
    assert "As the run measured it on 300 held-out examples of `smollm2-text`" in card
    assert "| distilled (the run's student, in its own dtype) | 37.61 | 0.9499 |" in card and "| dense (the teacher) | 25.45 | 1.0000 |" in card
    assert "--base-model HuggingFaceTB/SmolLM2-135M" in card
    with pytest.raises(LowrankError, match="base_model 'smollm' is not a Hub repository id; accepted: owner/name"):
        export_hf_checkpoint(run, tmp_path / "out2", base_model="smollm")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("kind,recipe,autos", [
    ("vit", "hf-vit", {"AutoModelForImageClassification": "LowRankViTForImageClassification", "AutoModel": "LowRankViTModel"}),
    ("bert-cls", "bert", {"AutoModelForSequenceClassification": "LowRankBertForSequenceClassification", "AutoModel": "LowRankBertModel"}),
])
def test_other_families_export_and_load(tmp_path, kind, recipe, autos):
    """An image classifier and a text classifier with a head on its base model: loaded by transformers in the export's check."""
    fact = factorize_checkpoint(hub_model(tmp_path, kind), _svd(recipe), tmp_path / f"{kind}.lowrank").out
    res = export_checkpoint(fact, "hf", tmp_path / f"{kind}.hf")
    auto_map = json.loads((tmp_path / f"{kind}.hf" / "config.json").read_text())["auto_map"]
    assert all(auto_map[a] == f"modeling_lowrank.{c}" for a, c in autos.items())
    assert res.verification["passed"] and res.verification["relative_diff"] <= 1e-5 and res.params == count_params(load(fact))
    assert res.usage.startswith(f"load with transformers.{next(iter(autos))}.from_pretrained(")


def test_default_output_is_the_folder_beside(factorized, tmp_path):
    src = tmp_path / "m.lowrank"
    src.mkdir()
    for f in factorized["gpt2"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    res = export_checkpoint(src, "hf")
    assert res.out == str(tmp_path / "m.lowrank.hf") and (tmp_path / "m.lowrank.hf" / "modeling_lowrank.py").is_file()


# -- refusals: one line, nothing written --------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_timm_checkpoint_is_refused(cli, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(tmp_path / "vit.safetensors"))
    fact = factorize_checkpoint(tmp_path / "vit.safetensors", load_recipe("deit"), tmp_path / "vit.k2.safetensors", TINY_VIT, TINY_VIT_KWARGS).out
    r = cli("export", fact, "--format", "hf", "--out", tmp_path / "vit.hf")
    one_line_error(r, "format hf writes a Hub folder for transformers models", "family is timm", "accepted for it: onnx, dense, safetensors")
    assert not (tmp_path / "vit.hf").exists() and not _leftovers(tmp_path)


def test_bad_options_are_refused(cli, factorized, tmp_path):
    fact = factorized["gpt2"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    one_line_error(cli("export", fact, "--format", "hf", "--out", tmp_path / "taken"), "already exists", "--force")
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]
    one_line_error(cli("export", fact, "--format", "onnx", "--out", tmp_path / "x.onnx", "--base-model", "a/b"),
                   "--base-model applies to the hf format only, not onnx")
    one_line_error(cli("export", fact, "--format", "hf", "--out", tmp_path / "y", "--max-shard-size", "1MB"),
                   "--max-shard-size applies to the dense format only, not hf")
    one_line_error(cli("export", fact, "--format", "hf", "--out", tmp_path / "y", "--base-model", "a/b", "--opset", "17"),
                   "--opset applies to the onnx format only, not hf")
    one_line_error(cli("export", fact, "--format", "hf", "--out", tmp_path / "y", "--dtype", "int8"), "'--dtype': 'int8' is not one of 'float32'", code=2)
    one_line_error(cli("export", fact, "--format", "hf", "--out", tmp_path / "y", "--base-model", "not an id"),
                   "--base-model 'not an id' is not a Hub repository id; accepted: owner/name")
    assert not (tmp_path / "y").exists() and not _leftovers(tmp_path)


def test_a_folder_that_does_not_load_cleanly_is_not_written(cli, factorized, tmp_path, monkeypatch):
    """A config that leaves a factorized layer dense: transformers reports its factors unexpected and its weight missing."""
    real = export_pipeline.hf_config

    def one_layer_short(model_kwargs, layers, classes, dtype):
        config = real(model_kwargs, layers, classes, dtype)
        del config[LAYERS_KEY]["transformer.h.0.attn.c_attn"]
        return config

    monkeypatch.setattr(export_pipeline, "hf_config", one_layer_short)
    r = cli("export", factorized["gpt2"], "--format", "hf", "--out", tmp_path / "bad")
    one_line_error(r, "the hf export of", "transformers' load reports", "2 missing keys (transformer.h.0.attn.c_attn.bias, transformer.h.0.attn.c_attn.weight)",
                   "3 unexpected keys (transformer.h.0.attn.c_attn.down.weight, transformer.h.0.attn.c_attn.up.bias, "
                   "transformer.h.0.attn.c_attn.up.weight); nothing was written")
    assert not (tmp_path / "bad").exists() and not _leftovers(tmp_path)
    assert not [m for m in sys.modules if m.startswith("transformers_modules.")]  # the verified folder's code forgotten
