"""Captions of the synthetic scenes (:mod:`jsm_dist.data.synth`).

Holds the caption templates (the salient object alone, or with distractors and a spatial
relation) and :func:`caption_of`, which fills one in from a scene's objects and returns the
caption with the position of the salient word in ``caption.split()``; the salient class is
named exactly once and captions never exceed :data:`MAX_CAPTION_WORDS` words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jsm_dist.data.synth_shapes import SceneObject

MAX_CAPTION_WORDS = 20


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _phrase(rng, obj: SceneObject, salient: bool) -> list[str]:
    mods: list[str] = []
    if salient:
        if rng.random() < 0.3:
            mods.append(("big", "large")[int(rng.integers(2))])
        if rng.random() < 0.75:
            mods.append(obj.colour)
        if obj.pattern != "plain" and rng.random() < 0.5:
            mods.append(obj.pattern)
    else:
        if rng.random() < 0.4:
            mods.append("small")
        if rng.random() < 0.4:
            mods.append(obj.colour)
    words = [*mods, obj.word]
    return [_article(words[0]), *words]


def _relation(sal: SceneObject, other: SceneObject) -> list[str]:
    if sal.near > other.near + 0.05:
        return ["in", "front", "of"]
    if sal.near < other.near - 0.05:
        return ["behind"]
    return ["to", "the", "left", "of"] if sal.cx < other.cx else ["to", "the", "right", "of"]


_SOLO = (
    "S stands on the floor",
    "there is S in the room",
    "close up of S",
    "S in front of the wall",
    "a picture of S",
    "S is the main object in this scene",
)
_WITH = (
    "S REL D",
    "S REL D on the floor",
    "S next to DL",
    "DL near S",
    "in this room S stands out from DL",
    "the picture shows S and DL",
    "there is S REL D",
    "S with DL in the background",
)


def caption_of(rng: np.random.Generator, objs: Sequence[SceneObject]) -> tuple[str, int]:
    sal, others = objs[0], list(objs[1:])
    pool = _WITH if others and rng.random() < 0.8 else _SOLO
    template = pool[int(rng.integers(len(pool)))]
    if "in the background" in template and any(o.near > sal.near - 0.05 for o in others):
        template = "S REL D"
    named = others[: 1 + int(rng.integers(min(2, len(others))))] if others else []
    tokens: list[str] = []
    pos = -1
    for tok in template.split():
        if tok == "S":
            sp = _phrase(rng, sal, True)
            pos = len(tokens) + len(sp) - 1
            tokens += sp
        elif tok == "D":
            tokens += _phrase(rng, others[0], False)
        elif tok == "REL":
            tokens += _relation(sal, others[0])
        elif tok == "DL":
            for j, o in enumerate(named):
                tokens += (["and"] if j else []) + _phrase(rng, o, False)
        else:
            tokens.append(tok)
    if len(tokens) > MAX_CAPTION_WORDS:  # cannot happen with these templates; be safe
        tokens = _phrase(rng, sal, True)
        pos = len(tokens) - 1
    return " ".join(tokens), pos
