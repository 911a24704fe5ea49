"""The default `data.max_length` (`data.text.default_length`) on real text, beside what the old default of 128 tokens kept.

For each checkpoint folder (its tokenizer and its positions from `config.json`) and each source, `load_text_data` runs as
a run without `data.max_length` does; printed: the length the rule picked, its rule in words, and the share of the same
training documents that 128 tokens would have held whole (their token counts with the tokenizer's special tokens).

    python tests/benchmarks/bench_default_length.py /work/assets/smollm2-135m MINILM_FOLDER \\
        --sources pydoc /work/assets/smollm2-text/train.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from transformers import AutoTokenizer

    from lowrank_cli.data.text import Reading, load_documents, load_text_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="Hub folders (config.json and tokenizer files)")
    ap.add_argument("--sources", nargs="+", default=["pydoc"])
    args = ap.parse_args()
    print("| tokenizer | source | default length | rule | whole at 128 tokens |")
    print("| --- | --- | --- | --- | --- |")
    for folder in map(Path, args.folders):
        config = json.loads((folder / "config.json").read_text())
        positions = config.get("max_position_embeddings") or config.get("n_positions")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        for source in args.sources:
            data = load_text_data(source, folder, None, reading=Reading(None, positions))
            train = load_documents(source)[0].texts
            lengths = [len(x) for x in tokenizer(train, truncation=True, max_length=129)["input_ids"]]
            whole = sum(n <= 128 for n in lengths)
            print(f"| {folder.name} ({positions} positions) | {source} | {data.max_length} | {data.length_rule} | "
                  f"{whole} of {len(lengths)} ({whole / len(lengths):.1%}) |")


if __name__ == "__main__":
    main()
