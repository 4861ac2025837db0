"""Image codecs shared by the packer and the streaming loader.

Packer side: load RGB / depth / ground-truth files of any common format, validate them
(raising :class:`BadInput` with a human-readable reason) and encode shard members.
Loader side: decode shard members back to arrays (OpenCV where it is safe and faster, PIL
otherwise). Depth is always decoded into its own integer dtype (8- or 16-bit): WebDataset's
``.decode("pil")`` would silently turn a 16-bit PNG into 8-bit RGB.

Depth normalisation (:func:`normalize_depth`) is the one place that maps raw depth to the
model's convention: float32 in [0, 1], **1 = nearest**, holes (raw 0) = 0. It is a per-image
min-max over valid pixels, oriented by the sample's ``depth_convention`` (its json; the
corpus-level value for corpora packed before per-sample orientation); the packer uses the
same function and value to compute the initial labels, so pack time and train time agree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from jsm_dist import schema
from jsm_dist.data.masks import mask_from_array, mask_from_image
from jsm_dist.data.vocab import word_class

DEPTH_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadInput(ValueError):
    """An input sample that cannot be packed; ``str(exc)`` is the reason."""


class CorruptSample(ValueError):
    """A shard sample the loader cannot decode (corrupt or missing member)."""


# ---- loader side: bytes -> arrays ------------------------------------------------------
# OpenCV decodes a baseline JPEG about twice as fast as PIL here (no extra copy into a
# numpy array) and PNG a little faster; PIL is the fallback for everything else. libjpeg
# (under OpenCV) accepts a truncated JPEG with a warning, so only JPEGs that end with
# their EOI marker take the OpenCV path; PIL, which raises on truncation, takes the rest.
# Like PIL (and the packer, which checks sizes with PIL), EXIF orientation is not applied.
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _fast_path(data: bytes) -> bool:
    """Complete JPEG (SOI ... EOI) or PNG (libpng fails cleanly on a truncated one)."""
    head = data[:8]
    return (head[:2] == _JPEG_SOI and data[-2:] == _JPEG_EOI) or head == _PNG_SIG


def _cv2_decode(data: bytes, flags: int) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None:
        raise ValueError("OpenCV cannot decode the image")
    return arr


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3)."""
    if _fast_path(data):
        arr = _cv2_decode(data, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            return arr
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def decode_depth(data: bytes) -> np.ndarray:
    """8- or 16-bit PNG bytes -> uint8 or uint16 (H, W), raw values (0 = hole)."""
    if data[:8] == _PNG_SIG:
        arr = _cv2_decode(data, cv2.IMREAD_UNCHANGED)
        if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
            return arr  # other layouts (RGB, palette, ...): PIL's conversions below
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(im).astype(np.uint16, copy=False)
        if im.mode == "I":
            return np.asarray(im).clip(0, 65535).astype(np.uint16)
        if im.mode != "L":
            im = im.convert("L")
        return np.asarray(im)


def decode_gray(data: bytes) -> np.ndarray:
    """Ground-truth PNG bytes -> uint8 (H, W), 0..255 (0/1 and palette masks too, as
    :mod:`jsm_dist.data.masks` reads them: corpora packed before the packer normalised them)."""
    if data[:8] == _PNG_SIG:
        arr = _cv2_decode(data, cv2.IMREAD_UNCHANGED)
        if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
            return mask_from_array(arr)  # palette PNGs come back as colour: PIL below
    with Image.open(io.BytesIO(data)) as im:
        return mask_from_image(im)


def normalize_depth(raw: np.ndarray, convention: str = schema.NEAR_IS_LARGE) -> np.ndarray:
    """Raw depth (any numeric dtype, 0 = hole) -> float32 (H, W) in [0, 1], 1 = nearest.

    Per-image min-max over the valid (non-zero) pixels; holes stay 0 (as does the farthest
    valid pixel, which the schema allows: 0 = far or missing). A constant image maps
    its valid pixels to 0.5. ``far_is_large`` depth is flipped so near is large.
    Accepts a batch (B, H, W) too: normalised per image.
    """
    if convention not in schema.DEPTH_CONVENTIONS:
        raise ValueError(
            f"depth convention must be one of {schema.DEPTH_CONVENTIONS}, got {convention!r}"
        )
    d = np.asarray(raw)
    if d.ndim == 3:
        return np.stack([normalize_depth(x, convention) for x in d])
    if d.dtype in (np.uint8, np.uint16):
        lo, hi = depth_range(d)
    else:
        valid = d > 0
        hi = float(d[valid].max()) if valid.any() else 0.0
        lo = float(d[valid].min()) if valid.any() else 0.0
    if hi <= 0:
        return np.zeros(d.shape, np.float32)
    out = d.astype(np.float32)
    if hi <= lo:
        return np.where(d > 0, np.float32(0.5), np.float32(0.0))
    scale = np.float32(1.0 / (hi - lo))
    if convention == schema.NEAR_IS_LARGE:
        out -= np.float32(lo)
        out *= scale
        np.maximum(out, 0.0, out=out)  # holes: (0 - lo) * scale < 0 -> 0
    else:
        out = (np.float32(hi) - out) * scale
        out[d <= 0] = 0.0
    return out


def depth_range(d: np.ndarray) -> tuple[int, int]:
    """(lowest, highest) valid (non-zero) value of an integer depth map; (0, 0) if none."""
    hi = int(d.max())
    # unsigned wrap-around: holes (0) become the dtype's maximum, so min() skips them
    lo = int((d - d.dtype.type(1)).min()) + 1 if hi > 0 else 0
    return lo, hi


def normalize_depth_u16(raw: np.ndarray, convention: str = schema.NEAR_IS_LARGE) -> np.ndarray:
    """Raw uint8/uint16 depth (H, W) -> :func:`normalize_depth` as uint16 (x 65535, rounded).

    The loader's form (two saturating OpenCV passes, no float image): it is how depth
    travels in a batch anyway, and equals ``round(normalize_depth(raw) * 65535)`` within one
    unit of the last place (float rounding at exact halves).
    """
    if convention not in schema.DEPTH_CONVENTIONS:
        raise ValueError(
            f"depth convention must be one of {schema.DEPTH_CONVENTIONS}, got {convention!r}"
        )
    d = np.asarray(raw)
    if d.dtype not in (np.uint8, np.uint16):
        return np.rint(normalize_depth(d, convention) * np.float32(65535.0)).astype(np.uint16)
    if d.dtype == np.uint8:
        d = d.astype(np.uint16)  # so the output is uint16 (8-bit depth maps are rare)
    lo, hi = depth_range(d)
    if hi <= 0:
        return np.zeros(d.shape, np.uint16)
    if hi <= lo:  # constant: valid pixels at 0.5
        return np.where(d > 0, np.uint16(32768), np.uint16(0))
    s = 65535.0 / (hi - lo)
    if convention == schema.NEAR_IS_LARGE:
        # saturating d - lo (holes, 0 -> 0; valid pixels are >= lo): raise the holes to lo,
        # then an exact subtraction (OpenCV's subtract of a scalar is ~4x slower)
        x = cv2.max(d, lo)
        np.subtract(x, x.dtype.type(lo), out=x)
    else:
        x = np.uint16(hi) - d  # d <= hi: no wrap-around; holes are zeroed below
    out = cv2.addWeighted(x, s, x, 0.0, 0.0, dst=x)  # round(x * s), no cancellation (<= 65535)
    if convention != schema.NEAR_IS_LARGE:
        out[d == 0] = 0
    return out


# ---- loader side: one shard sample ---------------------------------------------------------
class CorruptMember(CorruptSample):
    """A corrupt shard sample; ``reason`` is a short category for counters."""

    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


class SampleDecoder:
    """Raw WebDataset sample (tar members) -> numpy sample (+ its label from the store).

    ``depth`` comes out normalised as uint16 (:func:`normalize_depth_u16`, x 65535).
    With ``read_gt=False`` the ground-truth member is neither decoded nor checked and
    ``gt`` is None (training that never uses it: model modes other than ``full``).

    Raises :class:`CorruptMember` for anything unusable: a missing member, bad json, an
    undecodable image, sizes that disagree, an index outside its shard.
    """

    def __init__(self, corpus, store, url_to_shard: dict[str, int], read_gt: bool = True) -> None:
        self.corpus = corpus
        self.store = store
        self.url_to_shard = url_to_shard
        self.read_gt = read_gt
        self.word_to_class = corpus.word_to_class
        self.sizes = corpus.shard_sizes

    def __call__(self, raw: dict) -> dict:
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        where = f"{url}:{key}"
        shard = self.url_to_shard.get(url)
        if shard is None:
            raise CorruptMember("unknown shard url", where)
        for member in (schema.MEMBER_META, schema.MEMBER_DEPTH):
            if member not in raw:
                raise CorruptMember(f"missing member {member}", where)
        rgb_bytes = raw.get(schema.MEMBER_RGB_JPG, raw.get(schema.MEMBER_RGB_PNG))
        if rgb_bytes is None:
            raise CorruptMember("missing member rgb", where)
        try:
            meta = json.loads(raw[schema.MEMBER_META])
            index = int(meta[schema.INDEX])
        except Exception as exc:  # noqa: BLE001 - any malformed json is a corrupt sample
            raise CorruptMember("bad json", where, repr(exc)[:200]) from None
        if not 0 <= index < self.sizes[shard]:
            raise CorruptMember(
                "index out of range", where, f"{index} not in [0, {self.sizes[shard]})"
            )
        parts = {}
        for name, fn, data in (
            ("rgb", decode_rgb, rgb_bytes),
            ("depth", decode_depth, raw[schema.MEMBER_DEPTH]),
            ("gt", decode_gray, raw.get(schema.MEMBER_GT) if self.read_gt else None),
        ):
            if data is None:
                continue
            try:
                parts[name] = fn(data)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
                raise CorruptMember(f"undecodable {name}", where, repr(exc)[:200]) from None
        hw = parts[schema.RGB].shape[:2]
        if parts[schema.DEPTH].shape != hw or (schema.GT in parts and parts[schema.GT].shape != hw):
            raise CorruptMember("size mismatch", where)
        # per-sample orientation (packer's decision); older corpora: the corpus-level one
        convention = meta.get("depth_convention", self.corpus.depth_convention)
        if convention not in schema.DEPTH_CONVENTIONS:
            raise CorruptMember("bad depth_convention", where, repr(convention)[:200])
        label = self.store.read(shard, index) if self.store is not None else None
        has_text = self.corpus.has_text
        return {
            schema.RGB: parts[schema.RGB],
            schema.DEPTH: normalize_depth_u16(parts[schema.DEPTH], convention),
            schema.GT: parts.get(schema.GT),
            schema.LABEL: label,
            schema.SHARD: shard,
            schema.INDEX: index,
            schema.KEY: key,
            schema.CAPTION: str(meta.get(schema.CAPTION, "")) if has_text else "",
            schema.WORD: word_class(self.word_to_class, meta.get(schema.WORD)) if has_text else 0,
            schema.WORD_POS: int(meta.get(schema.WORD_POS, 0) or 0) if has_text else 0,
        }


# ---- packer side: files -> validated arrays ---------------------------------------------
def _open_fully(path: Path, what: str) -> Image.Image:
    """Open and decode an image completely (a truncated file raises here, not later)."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise BadInput(f"missing {what} file") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadInput(f"undecodable {what}: {type(exc).__name__}: {exc}") from None


def load_rgb_file(path: str | Path) -> tuple[np.ndarray, bytes | None]:
    """-> (uint8 (H, W, 3), the file's bytes when they are a baseline RGB JPEG else None).

    The JPEG bytes let the packer store the original file untouched (no re-encoding).
    """
    path = Path(path)
    im = _open_fully(path, "rgb")
    fmt, mode = im.format, im.mode
    arr = np.asarray(im.convert("RGB") if mode != "RGB" else im)
    if arr.ndim != 3 or min(arr.shape[:2]) < 2:
        raise BadInput(f"rgb has unusable shape {arr.shape}")
    raw = path.read_bytes() if fmt == "JPEG" and mode == "RGB" else None
    return arr, raw


def load_gray_file(path: str | Path, what: str = "gt") -> np.ndarray:
    """Ground-truth mask file -> uint8 (H, W), 0..255 (:mod:`jsm_dist.data.masks`: 0/1, 16-bit
    and palette masks are scaled to 0..255; an ambiguous palette mask is a BadInput)."""
    im = _open_fully(Path(path), what)
    try:
        return mask_from_image(im, what)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from None


def load_depth_file(path: str | Path) -> np.ndarray:
    """Any depth file (PNG/BMP/JPEG 8/16-bit, float TIFF, .npy) -> validated uint8/uint16.

    Float depth (metres, disparity, ...) is scaled by its maximum to 16 bits with its
    orientation kept; 0 stays a hole. NaN/inf, negative or all-hole depth is a BadInput.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise BadInput("missing depth file") from None
        except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
            raise BadInput(f"undecodable depth: {type(exc).__name__}: {exc}") from None
    else:
        im = _open_fully(path, "depth")
        if im.mode in ("RGB", "RGBA", "P", "LA", "1", "CMYK", "YCbCr"):
            im = im.convert("L")  # 3-channel depth exports: channels are copies
        arr = np.asarray(im)
    return to_storable_depth(arr)


def to_storable_depth(arr: np.ndarray) -> np.ndarray:
    """Validate a raw depth array and turn it into uint8 / uint16 (H, W)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise BadInput(f"depth must be single-channel (H, W), got shape {arr.shape}")
    if arr.dtype == np.bool_ or arr.size == 0:
        raise BadInput(f"depth has unusable dtype/size {arr.dtype} {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise BadInput(f"depth has {int((~finite).sum())} NaN/inf values")
        if float(arr.min()) < 0:
            raise BadInput(f"depth has negative values (min {float(arr.min()):.3g})")
        top = float(arr.max())
        if top <= 0:
            raise BadInput("depth has no valid pixels (all zero)")
        return np.round(arr.astype(np.float64) * (65535.0 / top)).astype(np.uint16)
    if arr.dtype in (np.uint8, np.uint16):
        out = arr
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise BadInput(f"depth values outside 16-bit range [{lo}, {hi}]")
        out = arr.astype(np.uint16)
    if not out.any():
        raise BadInput("depth has no valid pixels (all zero)")
    return np.ascontiguousarray(out)


def check_sizes(rgb: np.ndarray, depth: np.ndarray, gt: np.ndarray | None) -> None:
    """RGB, depth and ground truth must share (H, W)."""
    h, w = rgb.shape[:2]
    if depth.shape[:2] != (h, w):
        raise BadInput(f"size mismatch: rgb {w}x{h}, depth {depth.shape[1]}x{depth.shape[0]}")
    if gt is not None and gt.shape[:2] != (h, w):
        raise BadInput(f"size mismatch: rgb {w}x{h}, gt {gt.shape[1]}x{gt.shape[0]}")


# ---- packer side: arrays -> member bytes ------------------------------------------------
def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(arr: np.ndarray, compress_level: int = 3) -> bytes:
    """uint8 (H,W) / (H,W,3) or uint16 (H,W) -> PNG bytes (16-bit kept)."""
    buf = io.BytesIO()
    if arr.dtype == np.uint16:
        im = Image.fromarray(np.ascontiguousarray(arr))  # mode I;16: a 16-bit PNG
    else:
        im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
