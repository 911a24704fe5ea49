"""Tiny Hugging Face models in Hub folders, built locally (random weights, no download), with real tokenizers
trained here on the text that ships with Python."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, BertTokenizerFast, PreTrainedTokenizerFast

from lowrank_cli.data.text import pydoc_documents

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"  # saved as chat_template.jinja
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


def _wordpiece(_folder: Path) -> PreTrainedTokenizerFast:
    words = Counter(w for doc in pydoc_documents().texts[:400] for w in doc.lower().split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({c for w in words for c in w if c.isprintable()})
    vocab += [w for w, _ in words.most_common(300) if w not in vocab]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})


def _byte_bpe(_folder: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_documents().texts[:400], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>", unk_token="<|endoftext|>")


KINDS = {
    "bert": ("BertModel", "bert", _wordpiece, {}),
    "bert-cls": ("BertForSequenceClassification", "bert", _wordpiece, {"num_labels": 3}),
    "distilbert": ("DistilBertModel", "distilbert", _wordpiece,
                   {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 64}),
    "roberta": ("RobertaModel", "roberta", _byte_bpe, {"max_position_embeddings": 66, "pad_token_id": 1}),
    "gpt2": ("GPT2LMHeadModel", "gpt2", _byte_bpe, {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}),
    "llama": ("LlamaForCausalLM", "llama", _byte_bpe, {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    # an LM head tied to the word embeddings, grouped-query attention (4 heads, 2 key/value heads), a chat template
    "llama-tied": ("LlamaForCausalLM", "llama", _byte_bpe, {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "vit": ("ViTForImageClassification", "vit", None, {"image_size": 32, "patch_size": 8, "num_channels": 3, "num_labels": 10}),
}


def pretrain_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int = 0) -> None:
    """A few Adam steps of next-token prediction on Python's docstrings: the causal LM's logits then prefer frequent tokens
    by clear margins, as a trained model's do (a random one's are near-ties, which any rounding reorders)."""
    docs = [d for d in pydoc_documents().texts[:200] if d.strip()]
    rows = [tokenizer.encode(d)[:32] for d in docs]
    input_ids = torch.full((len(rows), 32), tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    ids = {"input_ids": input_ids, "attention_mask": (torch.arange(32) < torch.tensor([len(r) for r in rows])[:, None]).long()}
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(docs), (16,), generator=gen)
        batch, mask = ids["input_ids"][pick], ids["attention_mask"][pick]
        loss = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def hub_model(root: Path, kind: str, seed: int = 0, dtype: torch.dtype | None = None, max_shard_size: int | None = None,
              name: str | None = None, pretrain_steps: int = 0) -> Path:
    """A Hub-style folder (config.json, model.safetensors, tokenizer files) of a tiny model of `kind`; its weights in `dtype`
    when given (as a bf16 release is saved), in shards of at most `max_shard_size` bytes with their index when given; a causal
    LM first trained `pretrain_steps` steps (`pretrain_lm`)."""
    arch, model_type, make_tokenizer, extra = KINDS[kind]
    folder = root / (name or kind)
    folder.mkdir(parents=True)
    tokenizer = make_tokenizer(folder) if make_tokenizer else None
    settings = {**({} if kind in ("distilbert", "gpt2") else TINY), **extra}
    if kind == "gpt2":
        settings.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if tokenizer is not None:
        settings["vocab_size"] = len(tokenizer)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    if pretrain_steps:
        pretrain_lm(model, tokenizer, pretrain_steps, seed)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(folder), **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if tokenizer is not None:
        if kind == "llama-tied":
            tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(str(folder))
    return folder
