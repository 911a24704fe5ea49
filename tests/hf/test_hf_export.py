"""A tied causal LM (grouped-query attention, chat template) through factorize: its table stored once, its tie
restored on load, its side files carried."""

import json

import pytest
import torch
from hf_models import hub_model

from lowrank_cli.factorize.model import factorize_model
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models import build_model, load
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

SIDE = ("chat_template.jinja", "generation_config.json", "tokenizer_config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    source = hub_model(root, "llama-tied")
    return source, factorize_checkpoint(source, load_recipe("causal-lm"), root / "llama-tied.lowrank").out


def test_a_tied_table_is_stored_once_and_tied_again_on_load(tied):
    source, fact = tied
    config = json.loads((fact / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    in_memory = build_model(source)
    factorize_model(in_memory.model, load_recipe("causal-lm"), family=in_memory.family)
    expected = in_memory.model.state_dict()
    stored = read_header(fact / "model.safetensors").tensors
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # one copy of the tied table
    assert set(stored) == set(expected) - {"lm_head.weight"}
    model = load(fact)  # strict
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie, restored
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    for name in SIDE:  # the chat template and the usage files come along
        assert (fact / name).read_bytes() == (source / name).read_bytes(), name
