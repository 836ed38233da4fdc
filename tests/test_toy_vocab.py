import random

from transformers import CLIPTokenizer

from esd_lora.toy.vocab import (COLOURS, CONCEPTS, FILLER, SHAPES, TEMPLATES, TEXTURES, UNK_TOKEN, WORD_TO_CONCEPT,
                                build_tokenizer, kind_of, random_caption, words)


def test_vocabulary_is_the_fixed_one():
    assert list(COLOURS) == ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"]
    assert list(SHAPES) == ["circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond"]
    assert list(TEXTURES) == ["solid", "striped", "dotted", "checkered"]
    assert COLOURS["red"] == ("crimson", "scarlet") and TEXTURES["checkered"] == ("chequered", "checkerboard")
    assert len(CONCEPTS) == 20 and len(FILLER) == 28
    assert len(set(words())) == len(words()) == 20 * 3 + 28
    assert kind_of("ring") == "shape" and kind_of("dotted") == "texture"


def test_captions_name_their_attributes_and_some_are_empty():
    rng = random.Random(0)
    captions = [random_caption("cyan", "heart", "striped", rng) for _ in range(2000)]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.07 < empty < 0.13
    for caption in captions:
        named = {WORD_TO_CONCEPT[w] for w in caption.split() if w in WORD_TO_CONCEPT}
        assert named <= {"cyan", "heart", "striped"}
        assert caption == "" or named, caption
        assert all(w in words() for w in caption.split()), caption
    used = {t.split("{")[0] for t in TEMPLATES}
    assert len(TEMPLATES) >= 6 and len(used) >= 5
    assert any("teal" in c for c in captions) and any("aqua" in c for c in captions)


def test_tokenizer_maps_each_word_to_one_token_and_unknown_words_to_unk(tmp_path):
    build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("A Crimson striped STAR").input_ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "crimson", "striped", "star"]
    unknown = tok("a zebra star").input_ids
    tokens = tok.convert_ids_to_tokens(unknown[1:-1])
    assert tokens[0] == "a" and tokens[-1] == "star"
    assert set(tokens[1:-1]) == {UNK_TOKEN}
    assert tok.convert_ids_to_tokens(tok("stars").input_ids[1:-1]) == [UNK_TOKEN] * 5  # no partial matches
    assert len(tok("word " * 100, truncation=True, max_length=tok.model_max_length).input_ids) == tok.model_max_length
