"""The compression report: JSON, Markdown and a plot of accuracy vs parameters."""

from __future__ import annotations

import os

from keras_localrank.io import atomic_write_json, atomic_write_text
from keras_localrank.plotting import new_figure, save_figure

__all__ = ["markdown_table", "plot_tradeoff", "write_report"]

_COLUMNS = (
    ("method", "method"),
    ("budget", "budget"),
    ("param_fraction", "params / original"),
    ("accuracy", "accuracy"),
    ("accuracy_finetuned", "accuracy (fine-tuned)"),
    ("params", "params"),
    ("macs", "MACs"),
    ("file_bytes", "file bytes"),
    ("latency_ms", "latency ms/batch"),
    ("status", "status"),
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of the result rows (one per method and budget)."""
    head = "| " + " | ".join(title for _, title in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(row.get(key)) for key, _ in _COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def plot_tradeoff(
    rows: list[dict], path: str, *, title: str = "", baseline: float | None = None
) -> None:
    """Accuracy against parameter fraction, one curve per method (PNG, atomic)."""
    import matplotlib.ticker

    fig, ax = new_figure(figsize=(6, 4), dpi=90)
    methods = sorted({row["method"] for row in rows})
    for method in methods:
        points = sorted(
            (row["param_fraction"], row["accuracy"], row.get("accuracy_finetuned"))
            for row in rows
            if row["method"] == method and row.get("accuracy") is not None
        )
        if not points:
            continue
        line = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)[0]
        tuned = [(p[0], p[2]) for p in points if p[2] is not None]
        if tuned:
            ax.plot(
                *zip(*tuned),
                "s--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{method} (fine-tuned)",
            )
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=0.8, ls=":", label="original")
    ax.set_xscale("log")
    ticks = sorted({row["budget"] for row in rows if row.get("budget")})
    if ticks:  # label the budgets, not every log-scale minor tick
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters / original")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(report: dict, output_dir: str, *, stem: str = "report") -> dict[str, str]:
    """Write `report` as `<stem>.json`, `<stem>.md` and `<stem>.png` atomically.

    Args:
        report: `{"original": {...}, "rows": [...], "config": {...}}`.
        output_dir: destination folder (created if needed).
        stem: file name stem. Default `"report"`.

    Returns:
        `{"json": path, "markdown": path, "plot": path}`.
    """
    paths = {
        "json": os.path.join(output_dir, f"{stem}.json"),
        "markdown": os.path.join(output_dir, f"{stem}.md"),
        "plot": os.path.join(output_dir, f"{stem}.png"),
    }
    atomic_write_json(paths["json"], report)
    original = report.get("original", {})
    lines = [
        f"# Compression report: {report.get('model', '')}",
        "",
        (
            f"Original: {_fmt(original.get('params'))} parameters, "
            f"{_fmt(original.get('macs'))} MACs, accuracy {_fmt(original.get('accuracy'))}."
        ),
        "",
        markdown_table(report.get("rows", [])),
    ]
    atomic_write_text(paths["markdown"], "\n".join(lines))
    plot_tradeoff(
        report.get("rows", []),
        paths["plot"],
        title=str(report.get("model", "")),
        baseline=original.get("accuracy"),
    )
    return paths
