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

import hashlib
import re
from typing import Any, Literal, TypedDict

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

# ---- tar members of a shard sample (``<key>.<member>``; see the module docstring) --------
MEMBER_RGB_JPG = "rgb.jpg"
MEMBER_RGB_PNG = "rgb.png"
MEMBER_DEPTH = "depth.png"
MEMBER_GT = "gt.png"
MEMBER_META = "json"
MEMBERS = (MEMBER_RGB_JPG, MEMBER_RGB_PNG, MEMBER_DEPTH, MEMBER_GT, MEMBER_META)

# ---- seed streams: dist.derive_seed(base, STREAM, ...) keeps the random streams apart ---------
SEED_INIT = 0  # model initialisation (same on every rank): derive_seed(seed, SEED_INIT)
SEED_SHUFFLE = 0  # epoch e's shuffle group g: derive_seed(seed, SEED_SHUFFLE, e, g) (data/order.py)
SEED_AUGMENT = (
    1  # a sample's augmentation in epoch e: derive_seed(seed, SEED_AUGMENT, e, shard, index)
)
SEED_SHARD_ORDER = 2  # epoch e's shard order: derive_seed(seed, SEED_SHARD_ORDER, e)
SEED_TEXT_FIT = 7  # text fitting before refinement r: derive_seed(seed, SEED_TEXT_FIT, r)

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


class RefineOutput(TypedDict, total=False):
    """What ``JSMModel.refine(batch)`` returns (tensors on the model's device)."""

    label: Any  # (B, 1, H, W) in [0, 1]: the updated label L_new (post-processed)
    candidate: Any  # (B, 1, H, W): the depth-refined candidate L_d (BNS)
    conf: Any  # (B, 2) float32: the JSM weights (w_g, w_d)
    text_conf: Any  # (B,): the text network's probability of the salient word (GT-free)
    # region repair (model.label_update = "regions"), (B,) each:
    region_repaired: Any  # bool: the image's label was restricted to its chosen regions
    region_added: Any  # bool: the best region is not a component of the current label


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


# ---- sample keys ------------------------------------------------------------------------
# A plain key: ASCII letters, digits and "_", in runs joined by single "-"s.
PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*")
MAX_PLAIN_KEY = 100  # longer names are shortened (a key is part of file names: <key>.png)
KEY_PREFIX = 48  # readable part of an encoded key
KEY_HASH = 12  # hex digits of SHA-256 in an encoded key (48 bits)


def sample_key(name: str) -> str:
    """The WebDataset key of a sample name (file stem): unique, stable and safe.

    WebDataset splits a member name ``<key>.<ext>`` at the first dot of its file name and
    reads a slash as a folder, so a key holds neither; it also ends up in file names
    (``jsm-labels export`` writes ``<key>.png``), so it is short and plain ASCII. A name
    that is already such a plain key (``PLAIN_KEY``, at most 100 characters) is its own key;
    any other name becomes ``<readable prefix>--<12 hex of SHA-256(name)>``: the prefix is
    the name with every run of other characters replaced by ``_`` (cut to 48; ``name`` when
    nothing readable is left). Plain keys never contain ``--``, so an encoded key never
    equals a plain one, and the hash of the full name keeps encoded keys apart ("a b" and
    "a_b", or any two CJK names). The original name stays in the sample's json ``name``.
    """
    name = str(name)
    if len(name) <= MAX_PLAIN_KEY and PLAIN_KEY.fullmatch(name):
        return name
    prefix = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")[:KEY_PREFIX].strip("_") or "name"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HASH]
    return f"{prefix}--{digest}"
