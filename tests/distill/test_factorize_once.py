"""Several processes factorize once (issue 36): rank 0 alone calibrates, factorizes and runs the local stage; the others take
its structure and weights, and train as one process of the same global batch would."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

from lowrank_cli.models import load

WORKER = Path(__file__).with_name("_once_worker.py")


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_two_processes_factorize_and_run_the_local_stage_once(tmp_path, vit_ckpt):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    # whitened SVD with sensitivity allocation (calibration data) and a local stage, then DDP end to end
    settings = {"local": {"steps": 3, "examples": 16, "batch_size": 8}}
    for folder, batch in (("two", 8), ("one", 16)):
        path = tiny_recipe(tmp_path / folder, batch_size=batch, **settings)
        text = path.read_text().replace("factorize:\n  kappa: 3\n",
                                        "factorize:\n  kappa: 3\n  method: whitened\n  allocation: sensitivity\n  calib_samples: 16\n")
        assert "allocation: sensitivity" in text
        path.write_text(text)
    for n, folder, run in ((1, "one", "run1"), (2, "two", "run2")):  # both on one thread a process: the same sums, bit for bit
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(WORKER), str(vit_ckpt),
               str(tmp_path / folder / "tiny.yaml"), str(tmp_path / run), str(tmp_path / folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "run1" / "report.json").read_text())
    counts = [json.loads((tmp_path / "two" / f"counts-{r}.json").read_text()) for r in (0, 1)]
    assert counts == [{"calibrate": 1, "factorize": 1, "local": 1}, {"calibrate": 0, "factorize": 0, "local": 0}]
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report["world_size"] == 2 and len(set(report["rank_weight_sha256"])) == 1
    assert report["allocation"] == single["allocation"] and report["local"]["blocks"] == [
        {**b, "seconds": r["seconds"]} for b, r in zip(single["local"]["blocks"], report["local"]["blocks"])]
    a, b = losses(tmp_path / "run1"), losses(tmp_path / "run2")  # rank 1 trained from rank 0's student: the losses of one process
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(math.isclose(a[s], b[s], rel_tol=1e-5) for s in a), (a, b)
    s1, s2 = load(tmp_path / "run1" / "student.safetensors").state_dict(), load(tmp_path / "run2" / "student.safetensors").state_dict()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=1e-5, msg=k)
