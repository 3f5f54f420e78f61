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


def build_vocab_and_merges(
    words: Iterable[str], vocab_size: int | None = None
) -> tuple[dict[str, int], list[str]]:
    """Returns a CLIP-style vocab (token -> id) and merge list that make each word one token.

    With `vocab_size`, the vocab is filled up to exactly that many tokens with merges of letter n-grams
    (bigrams, then trigrams, ..., each as word-inside and word-final token), so that an embedding table
    sized like a real tokenizer's (CLIP: 49408) is indexed by it; start/end tokens stay the last two ids.
    """
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
    if vocab_size is not None:
        _fill_vocab(vocab, merges, seen_merges, vocab_size - 2)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def _fill_vocab(vocab: dict[str, int], merges: list[str], seen_merges: set[str], size: int) -> None:
    """Adds letter n-gram merges (left to right, as `build_vocab_and_merges` spells words) up to `size`."""
    if len(vocab) > size:
        raise ValueError(
            f"the words already need {len(vocab) + 2} tokens; vocab_size={size + 2} is too small"
        )
    letters = [c for c in BASE_CHARACTERS if c.isalpha()]
    prefixes = letters
    while len(vocab) < size:
        longer = []
        for prefix in prefixes:
            for char in letters:
                for part in (char, char + "</w>"):
                    merge = f"{prefix} {part}"
                    if merge in seen_merges or prefix + part in vocab:
                        continue
                    seen_merges.add(merge)
                    merges.append(merge)
                    vocab[prefix + part] = len(vocab)
                    if len(vocab) == size:
                        return
                longer.append(prefix + char)
        prefixes = longer


def write_clip_tokenizer(
    directory: str | Path, words: Iterable[str], model_max_length: int, vocab_size: int | None = None
) -> CLIPTokenizer:
    """Writes vocab.json / merges.txt for `words` (filled up to `vocab_size` tokens if given), then saves a
    loadable CLIPTokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words, vocab_size)
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
