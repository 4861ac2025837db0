"""Evaluation reports: terminal tables, markdown, JSON and PNG curve plots.

``results`` everywhere is ``{method: {dataset: metrics}}`` where ``metrics`` is what
``jsm_dist.eval.evaluate`` returns (``SODMetrics.get_results()``, optionally with ``issues``
{kind: [names]}). A (method, dataset) with nothing evaluated has no metric keys and shows
"-" in the tables. ``write_report`` is the one call the demo report and ``jsm-eval`` use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jsm_dist.eval.inputs import ISSUE_HELP
from jsm_dist.eval.metrics import METRIC_KEYS, METRICS

# Columns of the compact, paper-style summary (one group per dataset).
SUMMARY_KEYS = ("Sm", "maxF", "maxE", "MAE")
DIGITS = 4


def _fmt(value) -> str:
    return "-" if value is None else f"{float(value):.{DIGITS}f}"


def _datasets(results: Mapping[str, Mapping[str, dict]]) -> list[str]:
    seen: list[str] = []
    for per_method in results.values():
        for d in per_method:
            if d not in seen:
                seen.append(d)
    return seen


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def to_jsonable(obj):
    """numpy arrays/scalars -> lists/floats, recursively (for json.dump)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------- tables
def dataset_rows(results: Mapping[str, Mapping[str, dict]], dataset: str) -> list[list[str]]:
    """Rows [method, N, metric...] of one dataset's table (strings, as printed)."""
    rows = []
    for method, per_dataset in results.items():
        m = per_dataset.get(dataset)
        if m is None:
            continue
        rows.append([method, str(m.get("num_images", 0))] + [_fmt(m.get(k)) for k in METRIC_KEYS])
    return rows


def format_text_tables(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Aligned plain-text tables, one per dataset, then a count of input problems."""
    header = ["Method", "N", *METRIC_KEYS]
    blocks = []
    for dataset in _datasets(results):
        rows = [header] + dataset_rows(results, dataset)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"== {dataset} =="]
        for j, r in enumerate(rows):
            lines.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
                )
            )
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    problems = issue_rows(results)
    if problems:
        blocks.append(
            "input problems: "
            + "; ".join(f"{m}/{d}: {n} {k}" for m, d, k, n, _ in problems)
            + " (details in the report)"
        )
    return "\n\n".join(blocks)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def issue_rows(
    results: Mapping[str, Mapping[str, dict]],
) -> list[tuple[str, str, str, int, list[str]]]:
    """(method, dataset, kind, count, names) for every counted input problem."""
    out = []
    for method, per_dataset in results.items():
        for dataset, m in per_dataset.items():
            for kind, names in (m.get("issues") or {}).items():
                out.append((method, dataset, kind, len(names), list(names)))
    return out


def format_markdown(
    results: Mapping[str, Mapping[str, dict]],
    title: str,
    plots: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """The markdown report: legend, paper-style summary, one full table per dataset
    (with its plots when ``plots[dataset]`` = {"pr": file, "fm": file}), input problems."""
    datasets = _datasets(results)
    parts = [f"# {title}", ""]
    parts.append(
        "Metrics (PySODMetrics; higher is better except MAE): "
        + "; ".join(f"`{k}` = {desc}" for k, desc in METRICS)
        + ". `N` = images evaluated."
    )
    parts += ["", "## Summary", ""]
    header = ["Method"] + [f"{d} {k}" for d in datasets for k in SUMMARY_KEYS]
    rows = []
    for method, per_dataset in results.items():
        row = [method]
        for d in datasets:
            m = per_dataset.get(d, {})
            row += [_fmt(m.get(k)) for k in SUMMARY_KEYS]
        rows.append(row)
    parts.append(_md_table(header, rows))
    for d in datasets:
        parts += [
            "",
            f"## {d}",
            "",
            _md_table(["Method", "N", *METRIC_KEYS], dataset_rows(results, d)),
        ]
        if plots and d in plots:
            parts += [
                "",
                f"![PR curves on {d}]({plots[d]['pr']}) ![F-measure vs threshold on {d}]({plots[d]['fm']})",
            ]
    problems = issue_rows(results)
    parts += ["", "## Input problems", ""]
    if problems:
        rows = [
            [m, d, k, str(n), ", ".join(names[:5]) + (" ..." if n > 5 else "")]
            for m, d, k, n, names in problems
        ]
        parts.append(_md_table(["Method", "Dataset", "Problem", "Count", "Examples"], rows))
        parts += ["", "Problems: " + "; ".join(f"`{k}`: {v}" for k, v in ISSUE_HELP.items()) + "."]
    else:
        parts.append("None: every prediction had a ground truth of the same size and vice versa.")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots
def plot_curves(
    results: Mapping[str, Mapping[str, dict]], dataset: str, out_dir: Path
) -> dict[str, str]:
    """PR curve and F-measure-vs-threshold curve of every method on ``dataset`` (PNG files).

    Uses matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = {"pr": f"pr_{_safe(dataset)}.png", "fm": f"fm_{_safe(dataset)}.png"}
    figs = {}
    for kind in files:
        fig = Figure(figsize=(5, 4), dpi=100)
        FigureCanvasAgg(fig)
        figs[kind] = (fig, fig.add_subplot())
    for method, per_dataset in results.items():
        curves = (per_dataset.get(dataset) or {}).get("curves")
        if not curves:
            continue
        figs["pr"][1].plot(curves["recall"], curves["precision"], label=method)
        figs["fm"][1].plot(np.asarray(curves["threshold"]), curves["fmeasure"], label=method)
    labels = {"pr": ("Recall", "Precision"), "fm": ("Threshold", "F-measure")}
    for kind, (fig, ax) in figs.items():
        ax.set_xlabel(labels[kind][0])
        ax.set_ylabel(labels[kind][1])
        ax.set_title(f"{dataset}: {'PR curve' if kind == 'pr' else 'F-measure vs threshold'}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="lower left" if kind == "pr" else "lower center", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / files[kind])
    return files


def write_report(
    results: Mapping[str, Mapping[str, dict]],
    out_dir: str | Path,
    title: str,
    *,
    plots: bool = True,
) -> dict:
    """Write ``results.json``, ``report.md`` and per-dataset ``pr_*.png``/``fm_*.png``.

    Returns {"json": path, "markdown": path, "plots": [paths]}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files: dict[str, dict[str, str]] = {}
    if plots:
        for d in _datasets(results):
            plot_files[d] = plot_curves(results, d, out_dir)
    json_path = out_dir / "results.json"
    payload = {"title": title, "metrics": dict(METRICS), "results": to_jsonable(results)}
    json_path.write_text(json.dumps(payload, indent=1))
    md_path = out_dir / "report.md"
    md_path.write_text(format_markdown(results, title, plot_files))
    return {
        "json": json_path,
        "markdown": md_path,
        "plots": [out_dir / f for d in plot_files.values() for f in d.values()],
    }
