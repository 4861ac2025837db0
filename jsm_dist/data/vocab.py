"""Salient-word vocabulary: class ids for the words that name the salient object.

Class 0 is always ``"<negative>"`` (background; also the class of samples without text,
such as benchmark folders). The other classes are the distinct salient words of a corpus,
normalised (lower case, surrounding punctuation stripped) and sorted, so that the same set
of words always gives the same ids, whatever order the packer met them in.

The reference JSM code keeps singular and plural forms as separate classes ("car" and
"cars"); so do we: a word is a class exactly as it is written.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

from jsm_dist import schema

_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019\u3002\uff0c\uff01\uff1f"


def normalize_word(word: str) -> str:
    """Lower case, surrounding whitespace and punctuation removed (``"Dog,"`` -> ``"dog"``)."""
    return str(word).strip().strip(_STRIP).lower()


def build_vocab(words: Iterable[str]) -> list[str]:
    """``["<negative>", *sorted distinct normalised words]`` (empty words dropped)."""
    distinct = {normalize_word(w) for w in words}
    distinct.discard("")
    distinct.discard(schema.NEGATIVE_WORD)
    return [schema.NEGATIVE_WORD, *sorted(distinct)]


def word_class(word_to_class: Mapping[str, int], word: str | None) -> int:
    """Class id of ``word`` (0 = negative when it is empty or not in the vocabulary)."""
    if not word:
        return schema.NEGATIVE_CLASS
    return word_to_class.get(normalize_word(word), schema.NEGATIVE_CLASS)


def find_word(caption: str, word: str, position: int | None = None) -> int | None:
    """Position of ``word`` in ``caption.split()``, or None when the caption lacks it.

    Tokens are compared after :func:`normalize_word`. ``position`` is a hint (CapS.csv's
    ``Position`` column): it is accepted when the token there (0-based) or just before it
    (1-based files) is the word; otherwise the first occurrence is returned.
    """
    target = normalize_word(word)
    if not target:
        return None
    tokens = [normalize_word(t) for t in str(caption).split()]
    if position is not None:
        for pos in (position, position - 1):
            if 0 <= pos < len(tokens) and tokens[pos] == target:
                return pos
    for pos, tok in enumerate(tokens):
        if tok == target:
            return pos
    return None
