"""Offline CLIP tokenizers written by the project (no hub download).

A CLIP BPE tokenizer is a vocabulary plus a merge list. We write one whose merges spell out a given word
list, so every known word is a single token and anything else falls back to characters. The tiny random
test pipeline and the embedded shapes models both use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BASE_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Returns a CLIP-style vocab (token -> id) and merge list that make each word one token."""
    vocab: dict[str, int] = {}
    for char in BASE_CHARACTERS:
        vocab.setdefault(char, len(vocab))
    for char in BASE_CHARACTERS:
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[str] = []
    seen_merges: set[str] = set()
    for word in sorted({w.lower() for w in words}):
        if len(word) < 2 or any(c not in BASE_CHARACTERS for c in word):
            continue
        parts = list(word)
        parts[-1] += "</w>"
        current = parts[0]
        for part in parts[1:]:
            merge = f"{current} {part}"
            current += part
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: str | Path, words: Iterable[str], model_max_length: int) -> CLIPTokenizer:
    """Writes vocab.json / merges.txt for `words`, then saves a loadable CLIPTokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, indent=0))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer
