"""Hub-style folders: a model's `config.json` and the files beside its weights (tokenizer, usage) that a
compressed model keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# What a Hub folder holds beside its weights that a compressed model keeps: tokenizer files, chat
# templates and the small descriptions of how it is used (generation settings, sentence-transformers' pooling).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
              "added_tokens.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "preprocessor_config.json", "processor_config.json", "modules.json", "sentence_bert_config.json",
              "config_sentence_transformers.json")
SIDE_FOLDERS = ("1_Pooling", "additional_chat_templates")  # sentence-transformers' pooling; a tokenizer's named chat templates


def copy_side_files(src: Path | None, dst: Path) -> list[str]:
    """Copy a Hub folder's tokenizer, chat-template and usage files (and `1_Pooling/`, `additional_chat_templates/`) into
    `dst`, replacing any of the same name; their names."""
    if src is None:
        return []
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    for name in SIDE_FOLDERS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
            copied.append(f"{name}/")
    return copied


def write_config(dst: Path, config: dict) -> None:
    """The model's `config.json` in a Hub folder."""
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
