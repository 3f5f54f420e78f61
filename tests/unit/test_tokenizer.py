"""The project's offline CLIP tokenizer: one token per known word, characters for anything else."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from diffusionx.models.tokenizer import EOS_TOKEN, write_clip_tokenizer
from diffusionx.shapes import data


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(directory, data.vocabulary(), model_max_length=24)
    return CLIPTokenizer.from_pretrained(directory)  # a real CLIPTokenizer, loaded as pipelines load it


@pytest.mark.parametrize("word", data.vocabulary())
def test_every_shapes_word_is_one_token(shapes_tokenizer: CLIPTokenizer, word: str) -> None:
    ids = shapes_tokenizer(word, add_special_tokens=False).input_ids
    assert shapes_tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_a_full_caption_is_one_token_per_word_plus_bos_and_eos(shapes_tokenizer: CLIPTokenizer) -> None:
    caption = "a small purple triangle at the bottom and a large yellow circle on the right, white background"
    tokens = shapes_tokenizer.convert_ids_to_tokens(shapes_tokenizer(caption).input_ids)
    words = caption.replace(",", " ,").split()
    assert tokens == [shapes_tokenizer.bos_token, *(w + "</w>" for w in words), EOS_TOKEN]
    assert len(tokens) == 20  # the longest caption the grammar makes fits model_max_length=24


def test_training_captions_fit_the_model_length(shapes_tokenizer: CLIPTokenizer) -> None:
    captions = [data.caption(s) for s in data.training_scenes(500, two_shape_probability=1.0)]
    assert max(len(shapes_tokenizer(c).input_ids) for c in captions) <= shapes_tokenizer.model_max_length


def test_unknown_words_fall_back_to_characters(shapes_tokenizer: CLIPTokenizer) -> None:
    ids = shapes_tokenizer("zq red", add_special_tokens=False).input_ids
    tokens = shapes_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["z", "q</w>", "red</w>"]
