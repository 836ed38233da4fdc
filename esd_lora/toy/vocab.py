"""The toy world's fixed vocabulary, its captions and its tokenizer.

Later benchmarks name concepts by these exact words, so nothing here may change
without rebuilding the shipped toy model.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import ConceptError

COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("amber", "tangerine"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"),
    "cyan": ("teal", "aqua"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "lilac"),
    "white": ("ivory", "snowy"),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("disk", "disc"),
    "square": ("box", "block"),
    "triangle": ("wedge", "pyramid"),
    "star": ("pentagram", "starburst"),
    "cross": ("plus", "crucifix"),
    "heart": ("valentine", "love"),
    "ring": ("donut", "hoop"),
    "diamond": ("rhombus", "lozenge"),
}
TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("plain", "flat"),
    "striped": ("stripy", "lined"),
    "dotted": ("spotted", "polka"),
    "checkered": ("chequered", "checkerboard"),
}
FILLER: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "with", "and", "picture", "photo", "image", "drawing", "painting",
    "shape", "style", "colored", "coloured", "pattern", "texture", "on", "black", "background",
    "that", "is", "made", "one", "single", "big", "small",
)
KINDS: dict[str, dict[str, tuple[str, ...]]] = {"colour": COLOURS, "shape": SHAPES, "texture": TEXTURES}
CONCEPTS: tuple[str, ...] = (*COLOURS, *SHAPES, *TEXTURES)
UNK_TOKEN = "<|unk|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 32


WORD_TO_CONCEPT: dict[str, str] = {w: c for table in KINDS.values() for c, syn in table.items() for w in (c, *syn)}


def kind_of(concept: str) -> str:
    """Which attribute ('colour', 'shape' or 'texture') a concept name belongs to."""
    for kind, table in KINDS.items():
        if concept in table:
            return kind
    raise ConceptError(f"unknown toy concept {concept!r}; known: {', '.join(CONCEPTS)}")


def named_concepts(prompt: str) -> list[str]:
    """Toy concepts a prompt names, by name or synonym, in the order they appear."""
    found = []
    for word in prompt.lower().replace(",", " ").split():
        if word in WORD_TO_CONCEPT and WORD_TO_CONCEPT[word] not in found:
            found.append(WORD_TO_CONCEPT[word])
    return found


def concept_prompt(word: str, concept: str) -> str:
    """The plain prompt for one concept, said with `word` (its name or a synonym)."""
    desc = word if kind_of(concept) == "shape" else f"{word} shape"
    return f"{article(desc)} {desc}"


def words() -> list[str]:
    """Every word the tokenizer knows, in a fixed order (token ids depend on it)."""
    out: list[str] = []
    for table in KINDS.values():
        for name, synonyms in table.items():
            out += [name, *synonyms]
    return out + list(FILLER)


# Templates fill {d} with a description such as "crimson striped star" and {a} with its article.
TEMPLATES: tuple[str, ...] = (
    "{a} {d}",
    "a picture of {a} {d}",
    "a photo of {a} {d}",
    "a drawing of {a} {d}",
    "an image of {a} {d}",
    "{a} {d} on a black background",
    "one single {d}",
    "a painting of {a} {d}",
)


def describe(colour: str | None, shape: str | None, texture: str | None, rng: random.Random) -> str:
    """A noun phrase naming the given attributes, with synonyms and varied word order."""
    c = _word(COLOURS, colour, rng)
    s = _word(SHAPES, shape, rng) or "shape"
    t = _word(TEXTURES, texture, rng)
    style = rng.random()
    if t and style < 0.25:
        head = " ".join(w for w in (c, s) if w)
        return f"{head} with a {t} pattern"
    if c and style < 0.4:
        head = " ".join(w for w in (t, s) if w)
        return f"{head} colored {c}"
    return " ".join(w for w in (c, t, s) if w)


def _word(table: dict[str, tuple[str, ...]], name: str | None, rng: random.Random) -> str:
    if name is None:
        return ""
    roll = rng.random()
    if roll < 0.5:
        return name
    return table[name][0 if roll < 0.75 else 1]


def random_caption(colour: str, shape: str, texture: str, rng: random.Random) -> str:
    """A training caption for a render: 10 % empty, otherwise a template naming a non-empty subset."""
    if rng.random() < 0.1:
        return ""
    while True:
        keep = [rng.random() < 0.65 for _ in range(3)]
        if any(keep):
            break
    desc = describe(colour if keep[0] else None, shape if keep[1] else None, texture if keep[2] else None, rng)
    return rng.choice(TEMPLATES).format(a=article(desc), d=desc)


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows."""
    return "an" if phrase[:1] in "aeiou" else "a"


def build_tokenizer(out_dir: str | Path):
    """Save a CLIPTokenizer whose tokens are the toy words.

    Each word is an added token matched as a whole word, so a word outside the vocabulary
    is never split into known pieces: its characters map to the unknown token.
    """
    import json
    import tempfile

    from tokenizers import AddedToken
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer.from_pretrained(
            tmp, unk_token=UNK_TOKEN, pad_token=EOS_TOKEN, model_max_length=MAX_TOKENS
        )
    tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words()])
    tok.save_pretrained(str(out_dir))
    return tok
