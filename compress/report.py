"""The compression report: JSON, Markdown and plots of accuracy vs parameters, MACs, latency.

Every model (the original, each method at each budget) gets one row with its
accuracy, parameters, multiply-accumulates, `.keras` file size and measured
CPU latency at each latency batch size; the report also says what the
model's output was taken to be (logits, probabilities, sigmoid) and why.
"""

from __future__ import annotations

import os

from keras_localrank.io import atomic_write_json, atomic_write_text
from keras_localrank.plotting import new_figure, save_figure

__all__ = ["markdown_table", "plot_tradeoff", "write_report"]

_COLUMNS = (
    ("method", "method"),
    ("budget", "budget"),
    ("param_fraction", "params / original"),
    ("mac_fraction", "MACs / original"),
    ("accuracy", "accuracy"),
    ("accuracy_finetuned", "accuracy (fine-tuned)"),
    ("params", "params"),
    ("macs", "MACs"),
    ("file_bytes", "file bytes"),
    ("latency_ms_b1", "latency ms (batch 1)"),
    ("latency_ms_b64", "latency ms (batch 64)"),
    ("load_average", "load (1 min) when timed"),
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


#: x axes of the trade-off plots: `(row key, axis label, log scale)`.
AXES = {
    "params": ("param_fraction", "parameters / original", True),
    "macs": ("mac_fraction", "MACs / original", True),
    "latency": ("latency_ms_b64", "CPU latency, batch 64 (ms)", False),
}


def plot_tradeoff(
    rows: list[dict],
    path: str,
    *,
    title: str = "",
    baseline: float | None = None,
    x: str = "params",
    original: dict | None = None,
) -> None:
    """Accuracy against a cost, one curve per method (PNG, atomic).

    Args:
        rows: the report rows.
        path: the PNG to write.
        title: plot title. Default "".
        baseline: accuracy of the original model (a horizontal line).
        x: the cost axis, a key of `AXES`. Default `"params"`.
        original: the original model's row, drawn as a point when it has
            the cost (for the latency axis). Default None.
    """
    import matplotlib.ticker

    key, label, log = AXES[x]
    fig, ax = new_figure(figsize=(6, 4), dpi=90)
    methods = sorted({row["method"] for row in rows})
    for method in methods:
        points = sorted(
            (row[key], row["accuracy"], row.get("accuracy_finetuned"))
            for row in rows
            if row["method"] == method
            and row.get("accuracy") is not None
            and row.get(key) is not None
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
    if original is not None and original.get(key) is not None and baseline is not None:
        ax.plot([original[key]], [baseline], "k*", ms=9, label="original model")
    if log:
        ax.set_xscale("log")
        ticks = sorted({row["budget"] for row in rows if row.get("budget")})
        if ticks:  # label the budgets, not every log-scale minor tick
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(
    report: dict, workdir: str, *, stem: str = "report", plots: bool = True
) -> dict[str, str]:
    """Write `report` as JSON, Markdown and PNG plots, each atomically.

    Args:
        report: `{"original": {...}, "rows": [...], "config": {...},
            "output": {"kind", "evidence"}}`.
        workdir: destination folder (created if needed).
        stem: file name stem. Default `"report"`.
        plots: also draw the PNG plots. Default True.

    Returns:
        `{"json": path, "markdown": path, "plot": path, "plot_macs": path,
        "plot_latency": path}` (`<stem>.png` is accuracy vs parameters).
    """
    paths = {
        "json": os.path.join(workdir, f"{stem}.json"),
        "markdown": os.path.join(workdir, f"{stem}.md"),
        "plot": os.path.join(workdir, f"{stem}.png"),
        "plot_macs": os.path.join(workdir, f"{stem}_macs.png"),
        "plot_latency": os.path.join(workdir, f"{stem}_latency.png"),
    }
    atomic_write_json(paths["json"], report)
    original = report.get("original", {})
    rows = report.get("rows", [])
    output = report.get("output")
    lines = [
        f"# Compression report: {report.get('model', '')}",
        "",
        (
            f"Original: {_fmt(original.get('params'))} parameters, "
            f"{_fmt(original.get('macs'))} MACs, accuracy {_fmt(original.get('accuracy'))}."
        ),
    ]
    if output:
        lines.append(f"Output taken as **{output['kind']}**: {output['evidence']}.")
    if original.get("macs_uncounted"):
        lines.append(
            "MACs leave out layers with weights that no counting rule covers: "
            + ", ".join(f"`{name}`" for name in original["macs_uncounted"])
            + "."
        )
    lines += [
        "Latency: median wall-clock time of one `predict_on_batch` on this machine's CPU.",
        "",
        markdown_table([{"method": "original", "status": "ok", **original}, *rows]),
    ]
    atomic_write_text(paths["markdown"], "\n".join(lines))
    if not plots:
        return paths
    title = str(report.get("model", ""))
    for x, path in (("params", "plot"), ("macs", "plot_macs"), ("latency", "plot_latency")):
        plot_tradeoff(
            rows,
            paths[path],
            title=title,
            baseline=original.get("accuracy"),
            x=x,
            original=original,
        )
    return paths
