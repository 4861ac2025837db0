"""Is the label on the right object? Component-level diagnostics of labels against GT.

A label map is binarised at 0.5 and split into 8-connected components. A component is
*off-object* when under ``OFF_OBJECT_INSIDE`` (30%) of its pixels lie inside the ground
truth (GT > 0.5). Per set of labels:

- ``main_off``: share of images whose largest component is off-object (the label's main
  object is the wrong one);
- ``any_off``: share of images with at least one off-object component;
- ``mass_out``: share of the total label mass (soft values, all images pooled) that lies
  outside the GT.

Images whose label has no component count as neither main- nor any-off (``empty`` counts
them). GT is used for diagnostics only: nothing here feeds a label decision.
"""

from __future__ import annotations

import cv2
import numpy as np

OFF_OBJECT_INSIDE = 0.3


def image_object_stats(label: np.ndarray, gt: np.ndarray) -> tuple[bool, bool, float, float, bool]:
    """One image: ``(main_off, any_off, mass, mass_outside, empty)``.

    ``label`` and ``gt``: (h, w), uint8 (0..255) or float in [0, 1], the same size.
    """
    lab, g = _unit(label, "label"), _unit(gt, "GT") > 0.5
    if lab.shape != g.shape:
        raise ValueError(f"label {lab.shape} and GT {g.shape} differ in size")
    n, comp, stats, _ = cv2.connectedComponentsWithStats(
        (lab > 0.5).astype(np.uint8), connectivity=8
    )
    mass = float(lab.sum())
    mass_out = float(lab[~g].sum())
    if n <= 1:
        return False, False, mass, mass_out, True
    areas = stats[1:, cv2.CC_STAT_AREA]
    inside = np.bincount(comp[g].ravel(), minlength=n)[1:]
    off = inside < OFF_OBJECT_INSIDE * areas
    return bool(off[int(np.argmax(areas))]), bool(off.any()), mass, mass_out, False


def _unit(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ValueError(f"{what} must be uint8 (0..255) or float in [0, 1], got {a.dtype}")


def object_diagnostics(labels: np.ndarray, gts: np.ndarray) -> dict:
    """``{"main_off", "any_off", "mass_out", "empty", "n"}`` over stacked (n, h, w) maps."""
    rows = [image_object_stats(lab, gt) for lab, gt in zip(labels, gts)]
    n = len(rows)
    if n == 0:
        return {"main_off": float("nan"), "any_off": float("nan"), "mass_out": float("nan"),
                "empty": 0, "n": 0}  # fmt: skip
    main, anyo, mass, out, empty = (np.array(c) for c in zip(*rows))
    return {
        "main_off": float(main.mean()),
        "any_off": float(anyo.mean()),
        "mass_out": float(out.sum() / mass.sum()) if mass.sum() > 0 else float("nan"),
        "empty": int(empty.sum()),
        "n": n,
    }
