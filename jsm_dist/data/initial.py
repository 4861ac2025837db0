"""Handcrafted initial pseudo-labels: CDCP, the center-dark channel prior RGB-D method.

Reference: C. Zhu, G. Li, W. Wang, R. Wang, "An Innovative Salient Object Detection Using
Center-Dark Channel Prior", ICCV Workshops (ACVR) 2017, pp. 1509-1515; authors' MATLAB
code github.com/ChunbiaoZhu/ACVR2017 (CDCP_iccv17.zip). JSM's follow-up (DSU) names CDCP
as the source of its initial labels. This is a vectorised numpy/OpenCV transcription of
that code's three maps and their product::

    S = clip(gain * Dark * Init * Center, 0, 1)         (main.m: dark .* sal .* center .* 10)

- ``Init`` (DES_SaliencyCue, after Cheng et al., "Depth enhanced saliency detection",
  ICIMCS 2014): k-means (K=40) over per-pixel [Lab/max, xy in [-0.5,0.5], depth in
  [-1,1]]; per cluster a colour contrast cue ``sum_j |c_i - c_j| n_j exp(-|p_i - p_j| /
  0.4)`` and a centre cue ``exp(-dist_to_centre^2 / W^2)``, each "Gauss-normalised"
  ``exp(-(v - max)^2 / ((max - min)/2)^2)``, multiplied, Gauss-normalised again, painted
  and smoothed with a 3x3 Gaussian. Depth enters through the clustering, as in the
  reference; ``depth_contrast=True`` also multiplies in the DES depth-contrast cue that the
  reference computes but leaves unused.
- ``Dark`` (dark channel prior, He et al. CVPR 2009): ``1 - 0.95 * darkchannel(I / A)``
  with the atmospheric light ``A`` found by the reference's quad-tree search.
- ``Center`` (the reference's "center prior" is BSCA, Qin et al., "Saliency detection via
  cellular automata", CVPR 2015): SLIC superpixels; boundary superpixels clustered in Lab
  (K=3); a background-contrast map ``sum_k w_k(i) s_k(i)`` (colour distinctness ``s_k``
  times spatial closeness ``w_k`` to each boundary cluster); then single-layer cellular
  automata over a 2-ring superpixel graph (20 synchronous updates, three stages).

Documented deviations (all to make it deterministic, fast and resolution-independent):
everything runs at ``work_size`` (64 px) and the result is resized back bilinearly;
k-means starts from a spatial grid instead of k-means++; one SLIC segmentation (our own
vectorised one, ``superpixels`` at work size, no connectivity pass) serves both BSCA
stages; superpixel colours are mean Lab, not Lab of mean RGB; superpixel positions are
normalised by the image size in both GSD terms; the 15 px dark-channel patch (at ~500 px)
becomes ``dark_patch`` px at work size; depth holes (0) are filled by normalised
convolution before clustering; the frame-removal step is skipped.

Check against the reference: on the sample image shipped with the authors' code (640x480),
the Pearson correlation with their outputs is 0.99999 for the dark map (full size, 15 px
patch), 0.985 for the center map and 0.95 for the final map at the default settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class CDCPConfig:
    """CDCP settings; defaults are the reference's, rescaled to ``work_size``."""

    work_size: int = 64  # internal square resolution, pixels
    clusters: int = 40  # DES k-means clusters (reference 40; a grid of ~this many)
    kmeans_iters: int = 6  # Lloyd iterations (on every 3rd pixel)
    contrast_sigma: float = 0.4  # spatial weighting of the DES contrast cue
    superpixels: int = 150  # SLIC superpixels for BSCA (reference: 300 at full size)
    slic_compactness: float = 20.0  # SLIC m (reference 20)
    slic_iters: int = 3  # SLIC converges in a few iterations
    boundary_clusters: int = 3  # BSCA boundary clusters
    sigma1: float = 0.2  # BSCA colour distinctness width
    sigma2: float = 1.3  # BSCA spatial width
    beta: float = 10.0
    theta: float = 10.0  # CA neighbour similarity strength
    coherence_a: float = 0.6
    coherence_b: float = 0.2
    dark_patch: int = 3  # dark-channel min-filter size at work size (odd)
    omega: float = 0.95  # haze kept in the transmission estimate
    gain: float = 10.0  # final product gain before clipping (reference 10)
    depth_contrast: bool = False  # also use the DES depth-contrast cue

    def __post_init__(self) -> None:
        if self.work_size < 16:
            raise ValueError(f"work_size must be >= 16, got {self.work_size}")
        if not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be in [2, 256], got {self.clusters}")
        if not 4 <= self.superpixels <= self.work_size**2 // 4:
            raise ValueError(f"superpixels must be in [4, work_size^2/4], got {self.superpixels}")
        for name in ("kmeans_iters", "slic_iters", "boundary_clusters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("contrast_sigma", "slic_compactness", "sigma1", "sigma2", "gain"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dark_patch < 1 or self.dark_patch % 2 == 0:
            raise ValueError(f"dark_patch must be a positive odd integer, got {self.dark_patch}")
        if not 0 < self.omega <= 1:
            raise ValueError(f"omega must be in (0, 1], got {self.omega}")


# ---- small helpers ------------------------------------------------------------------
def _minmax(v: np.ndarray) -> np.ndarray:
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def gauss_norm(v: np.ndarray) -> np.ndarray:
    """DES_GaussNorm: exp(-(v - max)^2 / ((max - min)/2)^2); ones when v is constant."""
    hi, lo = float(v.max()), float(v.min())
    half = (hi - lo) / 2
    if half <= 0:
        return np.ones_like(v)
    return np.exp(-((v - hi) ** 2) / half**2)


# Distances are summed feature by feature (few features): no BLAS call, so no BLAS thread
# pool fighting the packer's worker processes for cores on these tiny matrices.
def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)), np.float32)
    for f in range(a.shape[1]):
        diff = a[:, f, None] - b[None, :, f]
        out += diff * diff
    return out


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(_sqdist(a, b))


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return _sqdist(x, c).argmin(1)


def _kmeans(
    x: np.ndarray, init: np.ndarray, iters: int, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from given centres on every ``stride``-th row, then one assignment of
    all rows; empty clusters keep their centre."""
    c = init.copy()
    k = len(c)
    sub = x[::stride]
    for _ in range(iters):
        idx = _nearest(sub, c)
        cnt = np.bincount(idx, minlength=k)
        for f in range(x.shape[1]):  # per feature column, not per pixel
            s = np.bincount(idx, weights=sub[:, f], minlength=k)
            c[:, f] = np.where(cnt > 0, s / np.maximum(cnt, 1), c[:, f])
    return _nearest(x, c), c


_RGB2XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    np.float32,
)


def rgb_to_lab(rgb: np.ndarray, gamma: bool = True) -> np.ndarray:
    """RGB in [0,1] (H,W,3) -> CIE Lab (D65). ``gamma=True`` undoes the Rec. 709 gamma
    first, as the reference's colorspace.m does; ``gamma=False`` is its RGB2Lab.m (used by
    the BSCA features). Plain numpy: no OpenCV thread pool for a 64x64 image."""
    c = rgb.reshape(-1, 3)
    if gamma:
        c = np.where(c < 0.018 * 4.5138, c / 4.5138, ((c + 0.099) / 1.099) ** (1 / 0.45))
    xyz = c @ _RGB2XYZ.T
    xyz = xyz / np.array([0.950456, 1.0, 1.088754], np.float32)
    t = 0.008856
    f = np.where(xyz > t, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    y = xyz[:, 1]
    light = np.where(y > t, 116 * np.cbrt(y) - 16, 903.3 * y)
    lab = np.stack([light, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)
    return lab.reshape(rgb.shape).astype(np.float32)


def _fill_holes(depth: np.ndarray) -> np.ndarray:
    """Fill zeros by normalised convolution at growing scales (no hole -> unchanged)."""
    valid = (depth > 0).astype(np.float32)
    if valid.all() or not valid.any():
        return depth
    out = depth.copy()
    missing = valid == 0
    for k in (5, 11, 23, 47):
        num = cv2.blur(depth * valid, (k, k))
        den = cv2.blur(valid, (k, k))
        fill = missing & (den > 1e-3)
        out[fill] = num[fill] / den[fill]
        missing &= ~fill
        if not missing.any():
            break
    out[missing] = float(depth[valid > 0].mean())
    return out


# ---- Init: DES colour contrast x centre cue over k-means clusters --------------------
def contrast_cue(
    colour: np.ndarray, pos: np.ndarray, weight: np.ndarray, sigma: float
) -> np.ndarray:
    """DES_2DContrastCue: ``sal_i = sum_j |colour_i - colour_j| * weight_j *
    exp(-|pos_i - pos_j| / sigma)`` (weight_j = cluster j's share of the pixels)."""
    spatial = np.exp(-_pairwise(pos, pos) / sigma)
    return (_pairwise(colour, colour) * weight[:, None] * spatial).sum(0)


def depth_contrast_cue(
    near: np.ndarray, pos: np.ndarray, weight: np.ndarray, sigma: float
) -> np.ndarray:
    """DES_DepContrastCue with near = large: ``sum_j (near_i - near_j) * weight_j *
    exp(-|pos_i - pos_j| / sigma)``: positive for clusters nearer than their surround."""
    spatial = np.exp(-_pairwise(pos, pos) / sigma)
    return ((near[None, :] - near[:, None]) * weight[:, None] * spatial).sum(0)


def des_cue(lab: np.ndarray, depth: np.ndarray, cfg: CDCPConfig) -> np.ndarray:
    h, w = depth.shape
    n = h * w
    lab_v = lab.reshape(n, 3) / max(float(lab.max()), 1e-6)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x = xs + 1 - w / 2
    y = ys + 1 - h / 2
    xy = np.stack([x.ravel(), y.ravel()], 1)
    xy = xy / xy.max() * 0.5
    d = _minmax(depth).ravel() * 2 - 1
    feats = np.concatenate([lab_v, xy, d[:, None]], 1).astype(np.float32)
    gh = max(1, round(np.sqrt(cfg.clusters * h / w)))
    gw = max(1, int(np.ceil(cfg.clusters / gh)))
    gy = ((np.arange(gh) + 0.5) * h / gh).astype(int)
    gx = ((np.arange(gw) + 0.5) * w / gw).astype(int)
    init = feats[(gy[:, None] * w + gx[None, :]).ravel()]
    idx, ctr = _kmeans(feats, init, cfg.kmeans_iters, stride=3)
    k = len(ctr)
    cnt = np.bincount(idx, minlength=k).astype(np.float32)
    live = cnt > 0
    wgt = cnt / n
    pos = ctr[:, 3:5] / max(float(ctr[:, 3:5].max()), 1e-6)
    contrast = contrast_cue(ctr[:, :3], pos, wgt, cfg.contrast_sigma)
    dist_px = np.round(np.hypot(xs + 1 - w / 2, ys + 1 - h / 2)).ravel()
    mean_dist = np.bincount(idx, weights=dist_px, minlength=k) / np.maximum(cnt, 1)
    centre = np.exp(-(mean_dist**2) / w**2)
    cue = gauss_norm(contrast[live]) * gauss_norm(centre[live])
    if cfg.depth_contrast:  # DES_DepContrastCue with near = large
        md = np.bincount(idx, weights=depth.ravel(), minlength=k) / np.maximum(cnt, 1)
        dc = depth_contrast_cue(md, pos, wgt, cfg.contrast_sigma)
        cue = cue * gauss_norm(dc[live])
    per_cluster = np.zeros(k, np.float32)
    per_cluster[live] = gauss_norm(cue)
    sal = per_cluster[idx].reshape(h, w)
    return cv2.GaussianBlur(sal, (3, 3), 3)


# ---- Dark: dark channel prior transmission ----------------------------------------------
def airlight(img: np.ndarray) -> np.ndarray:
    """Quad-tree search (reference quadTree_A, window 2): descend into the quadrant with the
    largest |mean - std| until it is under 2 px, return its mean colour."""
    while img.shape[0] >= 2 and img.shape[1] >= 2:
        h2, w2 = int(np.round(img.shape[0] / 2)), int(np.round(img.shape[1] / 2))
        quads = (img[:h2, :w2], img[:h2, w2:], img[h2:, :w2], img[h2:, w2:])
        scores = [abs(float(q.mean()) - float(q.std())) if q.size else -1.0 for q in quads]
        img = quads[int(np.argmax(scores))]
    return img.reshape(-1, 3).mean(0)


def dark_map(rgb: np.ndarray, cfg: CDCPConfig) -> np.ndarray:
    a = np.maximum(airlight(rgb), 1e-3)
    dark = (rgb / a).min(axis=2).astype(np.float32)
    kernel = np.ones((cfg.dark_patch, cfg.dark_patch), np.uint8)
    dark = cv2.erode(dark, kernel, borderType=cv2.BORDER_REPLICATE)
    return np.clip(1 - cfg.omega * dark, 0, 1)


# ---- Center: BSCA on SLIC superpixels ---------------------------------------------------
def slic(lab: np.ndarray, n_segments: int, compactness: float, iters: int) -> np.ndarray:
    """Vectorised SLIC (Achanta et al. 2012): each pixel picks among the 3x3 nearest grid
    seeds; returns consecutive labels (H, W)."""
    h, w = lab.shape[:2]
    step = np.sqrt(h * w / n_segments)
    gh, gw = max(2, round(h / step)), max(2, round(w / step))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = (np.arange(gh) + 0.5) * h / gh
    cx = (np.arange(gw) + 0.5) * w / gw
    cyy, cxx = np.meshgrid(cy, cx, indexing="ij")
    lab_f = lab.reshape(-1, 3)
    seeds = [lab[cyy.astype(int), cxx.astype(int)].reshape(-1, 3)[:, f] for f in range(3)]
    seeds = [x.astype(np.float32) for x in (*seeds, cyy.ravel(), cxx.ravel())]
    pix = [lab_f[:, 0], lab_f[:, 1], lab_f[:, 2], ys.ravel(), xs.ravel()]
    ci = np.minimum((ys * gh / h).astype(int), gh - 1).ravel()
    cj = np.minimum((xs * gw / w).astype(int), gw - 1).ravel()
    cand = []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            cand.append(np.clip(ci + di, 0, gh - 1) * gw + np.clip(cj + dj, 0, gw - 1))
    cand = np.stack(cand)  # (9, N) seed ids
    scale = (compactness / step) ** 2
    k = gh * gw
    cols = np.arange(h * w)
    for it in range(iters + 1):
        dist = np.zeros(cand.shape, np.float32)
        for f in range(5):  # 5 feature planes of (9, N), not a per-pixel loop
            diff = seeds[f][cand] - pix[f][None, :]
            dist += diff * diff * (1.0 if f < 3 else scale)
        label = cand[dist.argmin(0), cols]
        if it == iters:
            break
        cnt = np.bincount(label, minlength=k)
        for f in range(5):
            sm = np.bincount(label, weights=pix[f], minlength=k)
            seeds[f] = np.where(cnt > 0, sm / np.maximum(cnt, 1), seeds[f]).astype(np.float32)
    return np.unique(label, return_inverse=True)[1].reshape(h, w)


def _region_means(label: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    flat = label.ravel()
    cnt = np.maximum(np.bincount(flat, minlength=n), 1)
    v = values.reshape(len(flat), -1)
    return np.stack(
        [np.bincount(flat, weights=v[:, f], minlength=n) / cnt for f in range(v.shape[1])], 1
    )


def _adjacency(label: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    adj = np.zeros((n, n), bool)
    pairs = (
        (label[:, :-1], label[:, 1:]),
        (label[:-1, :], label[1:, :]),
        (label[:-1, :-1], label[1:, 1:]),
        (label[1:, :-1], label[:-1, 1:]),
    )
    for a, b in pairs:
        adj[a.ravel(), b.ravel()] = True
        adj[b.ravel(), a.ravel()] = True
    border = np.unique(np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]]))
    adj[np.ix_(border, border)] = True  # boundary superpixels are all connected
    np.fill_diagonal(adj, False)
    return adj, border


def center_map(lab: np.ndarray, lab_raw: np.ndarray, cfg: CDCPConfig) -> np.ndarray:
    """BSCA; ``lab`` (gamma-corrected) for SLIC and the CA graph, ``lab_raw`` (RGB2Lab.m)
    for the boundary-contrast features, as in the reference."""
    h, w = lab.shape[:2]
    label = slic(lab, cfg.superpixels, cfg.slic_compactness, cfg.slic_iters)
    n = int(label.max()) + 1
    lab_n = np.stack([_minmax(lab_raw[..., c]) for c in range(3)], -1)
    feat = _region_means(label, lab_n, n)  # per-channel min-max Lab (extractSupfeat)
    colour = _region_means(label, lab, n)  # raw Lab, for the CA graph weights
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    pos = _region_means(label, np.stack([ys / h, xs / w], -1), n)
    adj, border = _adjacency(label, n)

    # background-based map: boundary clusters -> colour distinctness x spatial closeness
    bfeat = feat[border]
    kb = min(cfg.boundary_clusters, len(border))
    seeds = [0]  # deterministic farthest-point initialisation
    for _ in range(kb - 1):
        seeds.append(int(_pairwise(bfeat, bfeat[seeds]).min(1).argmax()))
    bidx, _ = _kmeans(bfeat, bfeat[seeds], 10)
    s_bg = np.zeros(n)
    for k in np.unique(bidx):  # <= 3 clusters
        members = border[bidx == k]
        gcd = (1 / (np.exp(-_pairwise(feat, feat[members]) / (2 * cfg.sigma1**2)) + cfg.beta)).mean(
            1
        )
        gsd = np.exp(-(_pairwise(pos, pos[members]) ** 2) / (2 * cfg.sigma2**2)).mean(1)
        s_bg += gsd * _minmax(gcd)
    s = _minmax(s_bg)

    # single-layer cellular automata on the 2-ring graph
    ring2 = adj | (adj[:, :, None] & adj[None, :, :]).any(1)  # neighbours of neighbours
    np.fill_diagonal(ring2, False)
    dist = _pairwise(colour, colour)
    edge = dist[ring2]
    lo, hi = float(edge.min()), float(edge.max())
    f = np.zeros((n, n))
    f[ring2] = np.exp(-cfg.theta * ((edge - lo) / (hi - lo) if hi > lo else 0 * edge))
    f_norm = f / np.maximum(f.sum(1, keepdims=True), 1e-12)
    c = cfg.coherence_a * _minmax(1 / np.maximum(f.max(1), 1e-12)) + cfg.coherence_b
    inner = np.setdiff1d(np.arange(n), border)

    def update(v: np.ndarray) -> np.ndarray:
        return c * v + (1 - c) * (f_norm @ v)

    for stage in (1, 2):
        for _ in range(5):
            s[border] -= 0.6
            s[s < 0] = 0.001
            if stage == 2:
                top = s > 0.93
                if top.sum() < 0.02 * n and (~top).any():
                    s[~top] = _minmax(s[~top])
            s = update(s)
            if len(inner):
                s[inner] = _minmax(s[inner])
    for _ in range(10):
        s = _minmax(update(s))
    return s[label].astype(np.float32)


# ---- the method ------------------------------------------------------------------------------
def cdcp(rgb: np.ndarray, depth: np.ndarray, cfg: CDCPConfig) -> np.ndarray:
    """One image: uint8 (H,W,3), float depth (H,W) near=1 (0 = hole) -> float32 (H,W)."""
    h, w = depth.shape
    ws = cfg.work_size
    img = cv2.resize(rgb, (ws, ws), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    dep = cv2.resize(_fill_holes(depth.astype(np.float32)), (ws, ws), interpolation=cv2.INTER_AREA)
    lab = rgb_to_lab(img)
    centre = center_map(lab, rgb_to_lab(img, gamma=False), cfg)
    sal = cfg.gain * dark_map(img, cfg) * des_cue(lab, dep, cfg) * centre
    sal = np.clip(sal, 0, 1).astype(np.float32)
    return np.clip(cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)


def initial_saliency(
    rgb: np.ndarray, depth: np.ndarray, cfg: CDCPConfig | None = None
) -> np.ndarray:
    """CDCP saliency for one image or a batch.

    Args:
        rgb: uint8 (H,W,3) or (B,H,W,3).
        depth: float (H,W) or (B,H,W) in [0,1], 1 = nearest, 0 = hole / far.
        cfg: method settings (defaults: the reference's).

    Returns:
        float32 (H,W) or (B,H,W) in [0,1].
    """
    cfg = cfg or CDCPConfig()
    rgb = np.asarray(rgb)
    depth = np.asarray(depth)
    if rgb.ndim == 3 and depth.ndim == 2:
        return initial_saliency(rgb[None], depth[None], cfg)[0]
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or depth.shape != rgb.shape[:3]:
        raise ValueError(
            f"expected rgb (B,H,W,3) with depth (B,H,W) (or unbatched), got {rgb.shape} "
            f"and {depth.shape}"
        )
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    if not np.isfinite(depth).all():
        raise ValueError("depth contains NaN or inf")
    return np.stack([cdcp(r, d, cfg) for r, d in zip(rgb, depth)]).astype(np.float32)
