"""Tokens/s and peak memory of streamed text (`data/stream.py`) against the in-memory loader, on one generated corpus.

A `.txt` corpus of `--mb` megabytes is written (CPython's help topics, each paragraph a document,
repeated with a counter so that no two are equal), and a byte-level BPE tokenizer of `--vocab`
tokens is trained on the help topics and saved as a checkpoint folder's tokenizer. Each loader
then runs in a fresh process, over one whole pass of the training part:

- `memory`: `load_text_data` as a small source loads (every document read and tokenized up front,
  a seeded split), batches from `train_loader` with an `EpochSampler`, as `distill.train` builds them;
- `stream`: `load_text_data` with `data.streaming: true` (`--pack`: a causal LM's packed sequences;
  else a document per example), batches from `TextStream.batches`, as `distill.train` takes them.

Tokens/s counts the real tokens of the batches (attention mask), from the call to
`load_text_data` to the pass's last batch; peak RSS is the process's (`ru_maxrss`), also shown
over its value once torch and transformers are imported (what the loader itself adds). Printed as
stream ÷ memory ratios, both measured in this run. Documents are shorter than `--length` tokens
(not cut by the in-memory loader's truncation), so both deliver the same text.

    python tests/benchmarks/bench_text_stream.py --mb 200
    python tests/benchmarks/bench_text_stream.py --mb 20 --pack
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: float) -> int:
    """Help-topic paragraphs, one per line with a counter, up to `megabytes` MB; returns the number of documents."""
    from lowrank_cli.data.text import pydoc_documents

    docs = [d for d in pydoc_documents().texts if len(d) < 600]  # well under --length tokens each
    target, n, size = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            line = f"{docs[n % len(docs)]} ({n})\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            n += 1
    return n


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lowrank_cli.data.text import pydoc_documents

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_documents().texts, vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>",
                            unk_token="<|endoftext|>").save_pretrained(str(folder))


def measure(mode: str, corpus: str, tokenizer: str, length: int, batch: int, pack: bool) -> dict:
    """One pass of the training part with `mode`'s loader, in this process: tokens, seconds, peak RSS."""
    from lowrank_cli.data.loaders import EpochSampler, train_loader
    from lowrank_cli.data.text import StreamOptions, load_text_data

    import transformers  # noqa: F401 - imported before the baseline: its memory is no loader's

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    data = load_text_data(corpus, Path(tokenizer), length, stream=StreamOptions(streaming=mode == "stream", pack=pack))
    loaded = time.perf_counter() - t0
    if mode == "stream":
        batches = (b for b, _ in data.train.batches(0, None, batch))
    else:
        batches = iter(train_loader(data.train, EpochSampler(len(data.train), batch), num_workers=0, pin_memory=False))
    tokens = n = 0
    for inputs, _ in batches:
        tokens += int(inputs["attention_mask"].sum())
        n += 1
    seconds = time.perf_counter() - t0
    return {"mode": mode, "tokens": tokens, "batches": n, "seconds": seconds, "load_seconds": loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="corpus size in MB")
    ap.add_argument("--length", type=int, default=512, help="tokens per sequence (data.max_length)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--pack", action="store_true", help="stream packed sequences (a causal LM) instead of a document per example")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, corpus, tokenizer, length, batch = args.child
        print(json.dumps(measure(mode, corpus, tokenizer, int(length), int(batch), args.pack)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tokenizer = Path(tmp) / "corpus.txt", Path(tmp) / "tok"
        docs = write_corpus(corpus, args.mb)
        write_tokenizer(tokenizer, args.vocab)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {docs} documents; length {args.length}, batch {args.batch}, "
              f"{'packed' if args.pack else 'a document per example'}")
        rows = {}
        for mode in ("memory", "stream"):
            cmd = [sys.executable, __file__, "--child", mode, str(corpus), str(tokenizer), str(args.length), str(args.batch)] + (["--pack"] if args.pack else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[mode] = r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:>6}: {r['tokens'] / 1e6:8.2f} M tokens in {r['batches']} batches, {r['seconds']:7.1f} s "
                  f"(load {r['load_seconds']:.1f} s), {r['tokens'] / r['seconds'] / 1e3:8.1f} k tokens/s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"({r['peak_rss_mb'] - r['base_rss_mb']:+.0f} MB over the imports)")
        m, s = rows["memory"], rows["stream"]
        print(f"stream / memory: tokens/s {s['tokens'] / s['seconds'] / (m['tokens'] / m['seconds']):.2f}×, "
              f"peak RSS {s['peak_rss_mb'] / m['peak_rss_mb']:.2f}× (over the imports "
              f"{(s['peak_rss_mb'] - s['base_rss_mb']) / max(m['peak_rss_mb'] - m['base_rss_mb'], 1):.3f}×), set-up (load_text_data) {s['load_seconds'] / m['load_seconds']:.3f}×")


if __name__ == "__main__":
    main()
