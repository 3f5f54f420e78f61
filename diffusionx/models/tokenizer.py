"""Offline CLIP tokenizers written by the project (no hub download).

A CLIP BPE tokenizer is a vocabulary plus a merge list. We learn the merges with the `tokenizers` library's
BPE trainer on the word list itself, so every known word ends as a single token and anything else falls
back to characters. The tiny random test pipeline and the embedded shapes models both use it.

BPE applies merges by rank, so a hand-written chain per word breaks as soon as an earlier word's merge
fires inside a later word (the first version split "triangle" into 6 tokens after "an" and "ri" from
"and" and "right"). The trainer learns merges by applying each one to the whole corpus as it goes, so the
segmentation it ends with is the one encoding produces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
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
    known = sorted({w.lower() for w in words if len(w) >= 2 and all(c in BASE_CHARACTERS for c in w.lower())})
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no cap: merge until every word is one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=list(BASE_CHARACTERS),
        end_of_word_suffix="</w>",  # CLIP marks word ends this way
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(known, trainer)
    merges = [" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {}
    for char in BASE_CHARACTERS:
        vocab.setdefault(char, len(vocab))
    for char in BASE_CHARACTERS:
        vocab.setdefault(char + "</w>", len(vocab))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    if vocab_size is not None:
        _fill_vocab(vocab, merges, set(merges), vocab_size - 2)
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
