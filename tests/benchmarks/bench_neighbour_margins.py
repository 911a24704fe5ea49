"""Benchmark: how much nearest-neighbour agreement a sentence-embedding student can be expected to keep.

On the 177 held-out help topics of the `minilm` quality benchmark (`bench_quality.py`), embedded by
all-MiniLM-L6-v2 (mean-pooled, 128 tokens at most): the gap in cosine between each topic's nearest and
second-nearest neighbour (quantiles), and the nearest-neighbour agreement of the teacher's own normalized
embeddings turned by a random direction to a fixed cosine (isotropic noise; median and range over 20 draws),
a yardstick for a student of that mean cosine.

    python tests/benchmarks/bench_neighbour_margins.py [--model-dir DIR] [--draws 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf_encoder import default_model_dir  # noqa: E402

from lowrank_cli.data.text import load_documents  # noqa: E402


def embed(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 16):
            b = tok(texts[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append((model(**b).last_hidden_state * m).sum(1) / m.sum(1))
    return F.normalize(torch.cat(out), dim=-1)


def neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    _, val, _ = load_documents("pydoc")
    e = embed(args.model_dir or default_model_dir(), list(val.texts))
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    top = sim.topk(2, dim=-1).values
    gap = top[:, 0] - top[:, 1]
    qs = [0.05, 0.10, 0.15, 0.20, 0.50]
    print(f"{len(e)} held-out documents; top-1 minus top-2 neighbour cosine: " +
          ", ".join(f"{q:.0%} below {float(v):.4f}" for q, v in zip(qs, gap.quantile(torch.tensor(qs)))))
    nn_t = neighbours(e)
    g = torch.Generator().manual_seed(0)
    for target in (0.95, 0.973, 0.98, 0.99):
        agree = []
        for _ in range(args.draws):
            n = torch.randn(e.shape, generator=g)
            n = F.normalize(n - (n * e).sum(-1, keepdim=True) * e, dim=-1)  # a random direction orthogonal to each embedding
            theta = torch.arccos(torch.tensor(target))
            agree.append((neighbours(e * torch.cos(theta) + n * torch.sin(theta)) == nn_t).float().mean().item())
        agree.sort()
        print(f"cosine {target}: nearest-neighbour agreement median {agree[len(agree) // 2]:.1%}, range {agree[0]:.1%}–{agree[-1]:.1%}")


if __name__ == "__main__":
    main()
