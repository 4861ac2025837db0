"""Ground-truth masks as uint8 (H, W) on the 0..255 scale, however they are stored.

Benchmarks store masks as 1-bit PNG, 8-bit 0/255, anti-aliased 8-bit, 16-bit 0/65535,
and now and then as 0/1 values or as palette ("P") PNGs. Metrics binarise the GT at half
the 0..255 scale, so a 0/1 mask read as is would be all background (maxF 0, silently).
Every place that reads a GT mask goes through this module: ``jsm-eval`` (folders and
label-store generations), the array API (``evaluate_arrays``), ``jsm-labels diff
--gt-dir``, the packer, and the loader's decoder.

The rules:

* Values are scaled by the range they occupy: a maximum of at most 1 is a 0/1 mask (or a
  float map in [0, 1]) and is multiplied by 255; at most 255, the values are kept; at most
  65535 (16-bit), they are divided by 257. An all-zero mask stays all zero (an image
  without a salient object). Negative values, NaN and larger values are errors.
* A palette image whose used colours are all grey is read through its palette (the grey
  levels; then the rule above). With exactly two used colours of which one is not grey
  (a black background and a coloured object, as in VOC-style masks) the brighter colour
  (luminance) is the foreground (255), the other the background (0). Any other palette
  image is an error: which colour is the object cannot be told, and a guess would put
  wrong numbers in a report.
* Other modes: 1-bit and greyscale as stored; colour converted to luminance (ITU-R 601).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114])


def mask_from_array(arr, what: str = "gt") -> np.ndarray:
    """A decoded mask (H, W) or (H, W, 1), bool or numeric -> uint8 (H, W), 0..255."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) mask, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{what} must be a bool or numeric mask, got dtype {arr.dtype}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    top = arr.max()
    if arr.dtype == np.uint8 and top > 1:  # the common case: 0/255 or soft 8-bit, no copy
        return arr
    if np.isnan(top) or arr.min() < 0 or top > 65535:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        raise ValueError(
            f"{what} values must lie in [0, 1], [0, 255] or [0, 65535] without NaN, got "
            f"range [{lo}, {hi}]" + (" with NaN" if np.isnan(arr).any() else "")
        )
    if top <= 1:  # a 0/1 mask or a float map in [0, 1]
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    else:  # 16-bit
        scale = 1.0 / 257.0
    if scale == 1.0 and np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.uint8)
    return np.rint(arr.astype(np.float64) * scale).astype(np.uint8)


def mask_from_image(im, what: str = "gt") -> np.ndarray:
    """A PIL image of a mask -> uint8 (H, W), 0..255 (see the module rules)."""
    if im.mode == "P":
        return _palette_mask(im, what)
    if im.mode in ("1", "L") or im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im)
    else:  # LA, RGB, RGBA, CMYK, YCbCr, ...: luminance
        arr = np.asarray(im.convert("L"))
    return mask_from_array(arr, what)


def read_mask(source: str | os.PathLike | bytes | BinaryIO, what: str = "gt") -> np.ndarray:
    """A mask file (path, encoded bytes or binary file object) -> uint8 (H, W), 0..255.

    Decoding errors are PIL's (``OSError`` and kin); a mask that cannot be read without
    guessing raises ``ValueError`` (``what`` names the mask in the message).
    """
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im.load()
        return mask_from_image(im, what)


def _palette_mask(im, what: str) -> np.ndarray:
    """A palette ("P") mask through its palette (module rules)."""
    idx = np.asarray(im)
    palette = np.asarray(im.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    palette = np.vstack([palette, np.zeros((256 - len(palette), 3), np.uint8)])
    used = np.flatnonzero(np.bincount(idx.ravel(), minlength=256))
    colours = palette[used].astype(np.int64)
    if (colours == colours[:, :1]).all():  # grey levels: read through the palette
        return mask_from_array(palette[:, 0][idx], what)
    if len(used) == 2:
        luma = colours @ _LUMA
        if luma[0] != luma[1]:
            return np.where(idx == used[int(np.argmax(luma))], 255, 0).astype(np.uint8)
    shown = ", ".join(f"{i}: {tuple(int(v) for v in palette[i])}" for i in used[:6])
    raise ValueError(
        f"{what} is a palette image with {len(used)} used colours ({shown}"
        f"{', ...' if len(used) > 6 else ''}) that are not grey levels: the object's colour "
        "cannot be told; save the mask as 8-bit greyscale (object 255, background 0)"
    )
