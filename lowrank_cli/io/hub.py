"""Hub-style folders: a model's `config.json` and the files beside its weights (tokenizer, usage) that a
compressed model keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# What a Hub folder holds beside its weights that a compressed model keeps: tokenizer files and
# the small descriptions of how it is used (sentence-transformers' pooling, for instance).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
              "added_tokens.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "generation_config.json",
              "preprocessor_config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_side_files(src: Path | None, dst: Path) -> list[str]:
    """Copy a Hub folder's tokenizer and usage files (and `1_Pooling/`) into `dst`; their names."""
    if src is None:
        return []
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling")
        copied.append("1_Pooling/")
    return copied


def write_config(dst: Path, config: dict) -> None:
    """The model's `config.json` in a Hub folder."""
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
