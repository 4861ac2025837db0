"""Keys and conventions shared by every stage: defined once, imported everywhere.

Raw shard members (one tar member per field, same ``__key__``)::

    <key>.rgb.jpg | <key>.rgb.png   8-bit RGB
    <key>.depth.png                 8- or 16-bit single channel; 0 = hole (no measurement)
    <key>.json                      SampleMeta (below)
    <key>.gt.png                    optional 8-bit ground-truth mask (evaluation / full supervision)

Depth convention (everywhere, after decode): ``depth`` is float32 in [0, 1] with
**1 = nearest**, 0 = farthest or missing. Each sample's ``json`` records how its raw
values are oriented (``depth_convention``: ``near_is_large`` or ``far_is_large``, decided
per sample by the packer or set for all by ``--depth-convention``); corpora packed before
that field existed carry it once, in ``corpus.json``. The decoder flips when needed, so the
model only ever sees near = large.

A decoded sample (after the streaming pipeline) is a dict with the keys below; a batch is
the same dict with tensors stacked on a new leading dimension and strings in lists.
The sample id is the pair (``shard``, ``index``): the label store is addressed by it.
"""

from __future__ import annotations

from typing import Literal, TypedDict

# ---- tensors (float32 unless noted) -------------------------------------------------
RGB = "rgb"  # (3, H, W) in [0, 1], not mean/std normalised (the model normalises)
DEPTH = "depth"  # (1, H, W) in [0, 1], 1 = near, 0 = far / hole
LABEL = "label"  # (1, H, W) in [0, 1]: current pseudo-label from the label store
GT = "gt"  # (1, H, W) in {0, 1}; all zeros when the sample has none (see HAS_GT)
HAS_GT = "has_gt"  # bool
WORD = "word"  # int64 class of the salient word; 0 = negative/background
# ---- id and text -------------------------------------------------------------------
SHARD = "shard"  # int: index of the data shard (== label shard)
INDEX = "index"  # int: position of the sample inside its shard
KEY = "key"  # str: the tar __key__, unique in the corpus
CAPTION = "caption"  # str: caption containing the salient word
WORD_POS = "word_pos"  # int: position of the salient word in caption.split()

TENSOR_KEYS = (RGB, DEPTH, LABEL, GT)
INT_KEYS = (WORD, SHARD, INDEX, WORD_POS)
STR_KEYS = (KEY, CAPTION)

NEGATIVE_CLASS = 0
NEGATIVE_WORD = "<negative>"

NEAR_IS_LARGE = "near_is_large"
FAR_IS_LARGE = "far_is_large"
DepthConvention = Literal["near_is_large", "far_is_large"]
DEPTH_CONVENTIONS = (NEAR_IS_LARGE, FAR_IS_LARGE)
DEPTH_AUTO = "auto"  # jsm-pack: decide per sample (jsm_dist/data/orientation.py)
DEPTH_CONVENTION_CHOICES = (DEPTH_AUTO, *DEPTH_CONVENTIONS)


class SampleMeta(TypedDict, total=False):
    """The ``json`` member of a shard sample."""

    name: str  # original file stem (benchmark / CapS image name)
    caption: str
    word: str  # the salient word, as it appears in the caption
    word_pos: int  # index of the word in caption.split()
    tags: list[str]
    category: str
    subcategory: str
    source: str
    depth_convention: str  # orientation of this sample's raw depth (NEAR/FAR_IS_LARGE)
    depth_orientation: dict  # packer's cues when it decided: score, ground, object, uncertain
    shard: int
    index: int
