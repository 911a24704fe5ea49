"""Fuzzing: seeded mutations of a factorized checkpoint's header and manifest never crash, hang or load other weights."""

import random
from collections import Counter

import pytest
import timm
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS
from header_fuzz import mutate, outcome
from safetensors.torch import save_file

from lowrank_cli.models import load
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe


@pytest.fixture(scope="module")
def factorized(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_file(timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).state_dict(), str(d / "vit.safetensors"))
    out = factorize_checkpoint(d / "vit.safetensors", load_recipe("deit"), d / "f.safetensors", TINY_VIT, TINY_VIT_KWARGS).out
    return out, {k: v.clone() for k, v in load(out).state_dict().items()}


def test_three_hundred_mutations_through_read_header_and_load(factorized, tmp_path):
    path, reference = factorized
    data = path.read_bytes()
    rng = random.Random(20261122)
    counts, bad = Counter(), []
    for i in range(300):
        mutated, label = mutate(data, rng)
        case = tmp_path / "case.safetensors"
        case.write_bytes(mutated)
        result, detail = outcome(case, reference)
        counts[result] += 1
        if result in ("crash", "hang", "different"):
            bad.append(f"case {i} ({label}): {result} {detail}")
    assert not bad, "\n".join(bad[:20])
    assert counts["error"] >= 200 and counts["error"] + counts["same"] == 300  # most mutations are caught; the rest change nothing


def test_a_sample_through_the_command_line(factorized, tmp_path, cli):
    path, _ = factorized
    data = path.read_bytes()
    rng = random.Random(7)
    codes = Counter()
    for i in range(40):
        mutated, label = mutate(data, rng)
        case = tmp_path / f"case{i}.safetensors"
        case.write_bytes(mutated)
        for args in (("inspect", case, "--json"), ("export", case, "--format", "dense", "--out", tmp_path / f"d{i}.safetensors")):
            r = cli(*args)
            codes[r.code] += 1
            assert "Traceback" not in r.err, (label, r.err[-2000:])
            assert r.code in (0, 1), (label, r.code, r.err)
            if r.code:
                assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("error: "), (label, r.err)
    assert codes[1] >= 40
