"""Self-contained HTML reports: tables, notes and matplotlib plots embedded as PNG data URIs.

A report is one file that opens anywhere (offline, attached to an email, archived with a run): no
external stylesheets, scripts, fonts or image files. Every text that reaches the page is
HTML-escaped, because teacher names, prompts and responses come from models and users.

Plots are drawn on plain ``matplotlib.figure.Figure`` objects and saved as PNG, which matplotlib
always renders with its Agg backend: nothing here opens a window, needs a display, or changes the
caller's pyplot backend.
"""

import base64
import html
import io
import json
import numbers
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from teacherfit.metrics import POSITIVE_REWARD_FLOOR, car, car_variant_for, positive_rewards
from teacherfit.store import flatten

PNG_DATA_URI_PREFIX = "data:image/png;base64,"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2433;
       margin: 0; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { margin-bottom: 4px; }
.subtitle { color: #5b6475; margin-top: 0; }
h2 { margin-top: 32px; border-bottom: 1px solid #d8dce3; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 16px 0; font-size: 14px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 6px; }
th, td { border: 1px solid #d8dce3; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
table.kv th { width: 14em; }
figure { margin: 16px 0; }
img { max-width: 100%; height: auto; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 14px; margin: 16px 0; }
.verdict { font-size: 17px; padding: 10px 16px; margin: 16px 0; border-left: 5px solid; }
.verdict.good { background: #e8f5e9; border-color: #2e7d32; }
.verdict.unsure { background: #fff3e0; border-color: #ef6c00; }
pre.code { background: #f3f4f7; padding: 10px 14px; overflow-x: auto; font-size: 13px; white-space: pre-wrap; }
table.wide td { max-width: 28em; overflow-wrap: anywhere; }
table.prov td.role { font-weight: 600; background: #eef1f5; }
"""


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _as_float(value) -> float:
    """Missing values (None) become nan, which every plot below skips rather than drawing as 0."""
    return float("nan") if value is None else float(value)


def _new_figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def figure_to_data_uri(fig: Figure, *, dpi: int = 110) -> str:
    """Render ``fig`` as a PNG data URI and close it.

    Figures made by this module are plain ``Figure`` objects and are freed with their last
    reference; a figure made with pyplot is also removed from pyplot's registry, where it would
    otherwise stay alive.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return PNG_DATA_URI_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_metric_with_ci(rows: list[dict], metric: str, *, title: str, ylabel: str) -> str:
    """One point per teacher with its ``{metric}_low`` .. ``{metric}_high`` interval drawn as a bar.

    The interval is drawn from its own ends, not as +/- offsets from the point, so an interval
    that does not contain the point (possible with percentile bootstraps) is shown as it is.
    """
    names = [str(row["teacher"]) for row in rows]
    x = np.arange(len(rows))
    values = np.array([_as_float(row.get(metric)) for row in rows])
    low = np.array([_as_float(row.get(f"{metric}_low")) for row in rows])
    high = np.array([_as_float(row.get(f"{metric}_high")) for row in rows])
    fig, ax = _new_figure(max(6.0, 0.6 * len(rows) + 2.0), 4.0)
    ax.vlines(x, low, high, color="#4c72b0", linewidth=2, alpha=0.6, label="interval")
    ax.plot(x, values, "o", color="#1f3b73", label=metric)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return figure_to_data_uri(fig)


def plot_reward_vs_loss(
    rows: list[dict],
    beta: float,
    *,
    reward_key: str = "reward",
    loss_key: str = "loss_student",
    title: str = "Teachers: reward vs student loss, with iso-CAR curves",
) -> str:
    """Scatter of teachers (labelled) over curves of equal CAR, ``reward = c * (1 + beta * loss)``.

    The curves follow the CAR variant the rank pipeline uses for these rewards
    (``car_variant_for``): with a non-positive reward the curves are those of the sign-safe CAR,
    drawn back on the raw reward axis, and the title says so. Levels c span the teachers' CARs.
    """
    names = [str(row["teacher"]) for row in rows]
    rewards = np.array([_as_float(row[reward_key]) for row in rows])
    losses = np.array([_as_float(row[loss_key]) for row in rows])
    variant = car_variant_for(rewards)
    scores = positive_rewards(rewards) if variant == "sign_safe" else rewards
    cars = np.asarray(car(scores, losses, beta))

    fig, ax = _new_figure(7.5, 5.0)
    loss_pad = 0.1 * (np.ptp(losses) or 1.0)
    loss_grid = np.linspace(max(0.0, losses.min() - loss_pad), losses.max() + loss_pad, 200)
    reward_span = np.ptp(rewards)
    # Identical rewards under the sign-safe map leave no reward scale to draw curves on: CAR then
    # ranks by loss alone, which the scatter already shows.
    draw_curves = variant == "plain" or reward_span > 0
    if draw_curves:
        for level in np.unique(np.linspace(cars.min(), cars.max(), 5)):
            curve = level * (1.0 + beta * loss_grid)
            if variant == "sign_safe":  # invert positive_rewards' map (r - min) / span + floor
                curve = rewards.min() + (curve - POSITIVE_REWARD_FLOOR) * reward_span
            ax.plot(loss_grid, curve, "--", linewidth=1, alpha=0.6, label=f"CAR = {level:.3g}")
        ax.legend(loc="best", fontsize=8)
    ax.scatter(losses, rewards, color="#1f3b73", zorder=3)
    for name, loss, reward in zip(names, losses, rewards):
        ax.annotate(name, (loss, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
    reward_pad = 0.15 * (reward_span or abs(rewards.mean()) or 1.0)
    ax.set_ylim(rewards.min() - reward_pad, rewards.max() + reward_pad)
    ax.set_xlim(loss_grid[0], loss_grid[-1])
    ax.set_title(f"{title}\n(beta = {beta:.3g}, {variant} CAR)")
    ax.set_xlabel(f"{loss_key} (lower = more compatible)")
    ax.set_ylabel(reward_key)
    ax.grid(alpha=0.3)
    return figure_to_data_uri(fig)


def plot_correlations(
    corr_rows: list[dict], *, title: str = "Spearman rho of each metric with the outcome (95% bootstrap CI)"
) -> str:
    """Horizontal bars of ``spearman`` per metric, with ``spearman_low`` .. ``spearman_high`` whiskers.

    Takes the rows of ``metrics.correlate_metrics``; a metric whose correlation is undefined is
    marked "undefined" instead of being drawn as 0.
    """
    labels = [f"{row['metric']} (n={row['n']})" if "n" in row else str(row["metric"]) for row in corr_rows]
    rho = np.array([_as_float(row["spearman"]) for row in corr_rows])
    low = np.array([_as_float(row.get("spearman_low")) for row in corr_rows])
    high = np.array([_as_float(row.get("spearman_high")) for row in corr_rows])
    y = np.arange(len(corr_rows))
    fig, ax = _new_figure(7.0, max(2.5, 0.45 * len(corr_rows) + 1.2))
    ax.barh(y, rho, color=np.where(rho >= 0, "#4c72b0", "#c44e52"), alpha=0.8)
    ax.hlines(y, low, high, color="#1d2433", linewidth=1.5)
    for yi, value in zip(y, rho):
        if np.isnan(value):
            ax.text(0.02, yi, "undefined", va="center", fontsize=8, color="#5b6475")
    ax.axvline(0.0, color="#1d2433", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.set_ylim(len(corr_rows) - 0.5, -0.5)  # first metric on top, as in the table
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return figure_to_data_uri(fig)


def plot_lines(series: dict[str, tuple[list, list]], *, title: str, xlabel: str, ylabel: str) -> str:
    """One line per named ``(x, y)`` series, e.g. training and validation loss curves."""
    fig, ax = _new_figure()
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    return figure_to_data_uri(fig)


def plot_grouped_bars(labels: list[str], series: dict[str, list], *, title: str, ylabel: str,
                      ylim: tuple[float, float] | None = None) -> str:
    """Bars per label, one colour per named series (e.g. MT-Bench score per category and turn).

    A missing value (None or nan) leaves its bar out rather than drawing it as 0.
    """
    fig, ax = _new_figure(max(6.0, 0.9 * len(labels) + 2.0), 4.0)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        heights = np.array([_as_float(v) for v in values])
        positions = x + (k - (len(series) - 1) / 2) * width
        ok = np.isfinite(heights)
        ax.bar(positions[ok], heights[ok], width, label=name, alpha=0.85)
        for xi in positions[~ok]:
            ax.text(xi, 0.05, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="#5b6475")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    return figure_to_data_uri(fig)


def _format_cell(value, float_fmt: str) -> tuple[str, bool]:
    """``(escaped text, is_numeric)`` for one table cell; None shows as an empty cell."""
    if value is None:
        return "", False
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        text = json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else str(value)
        return _escape(text), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    return _escape(float_fmt.format(float(value))), True


class Report:
    """An HTML report built block by block, in the order the ``add_*`` calls are made."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self._blocks: list[str] = []

    def add_heading(self, text: str) -> None:
        self._blocks.append(f"<h2>{_escape(text)}</h2>")

    def add_paragraph(self, text: str) -> None:
        self._blocks.append(f"<p>{_escape(text)}</p>")

    def add_table(
        self,
        rows: list[dict],
        columns: list[str] | None = None,
        *,
        caption: str = "",
        float_fmt: str = "{:.4g}",
        wide: bool = False,
    ) -> None:
        """A table of ``rows``; columns default to every key, in order of first appearance. ``wide``: long text
        cells wrap within a bounded width (instruction and response text)."""
        if columns is None:
            columns = list(dict.fromkeys(key for row in rows for key in row))
        parts = ['<table class="wide">' if wide else "<table>"]
        if caption:
            parts.append(f"<caption>{_escape(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_escape(c)}</th>" for c in columns) + "</tr></thead>")
        parts.append("<tbody>")
        for row in rows:
            cells = []
            for column in columns:
                text, numeric = _format_cell(row.get(column), float_fmt)
                cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._blocks.append("".join(parts))

    def add_image(self, data_uri: str, alt: str) -> None:
        """Embed a PNG data URI (from the ``plot_*`` functions); anything else would not be self-contained."""
        if not data_uri.startswith(PNG_DATA_URI_PREFIX):
            raise ValueError(f"add_image takes a PNG data URI starting with {PNG_DATA_URI_PREFIX!r}")
        self._blocks.append(f'<figure><img src="{_escape(data_uri)}" alt="{_escape(alt)}"></figure>')

    def add_kv(self, items: dict) -> None:
        """A two-column key/value table for configuration and provenance; values keep full precision."""
        rows = "".join(
            f"<tr><th>{_escape(key)}</th><td>{_format_cell(value, '{}')[0]}</td></tr>"
            for key, value in items.items()
        )
        self._blocks.append(f'<table class="kv"><tbody>{rows}</tbody></table>')

    def add_verdict(self, text: str, *, good: bool) -> None:
        """The report's answer, first and large: green when the data support it, orange when they do not."""
        self._blocks.append(f'<div class="verdict {"good" if good else "unsure"}">{_escape(text)}</div>')

    def add_code(self, text: str) -> None:
        """Commands to copy (the next step)."""
        self._blocks.append(f'<pre class="code">{_escape(text)}</pre>')

    def add_provenance(self, items: dict[str, Any]) -> None:
        """What produced the numbers, readable: one row per (what, field), nested fields dotted, hashes whole."""
        rows = []
        for role, value in items.items():
            flat = ([(k, v) for k, v in flatten(value).items() if v not in (None, "", [], {})]
                    if isinstance(value, dict) else [("", value)])
            for k, (key, item) in enumerate(flat or [("", "")]):
                cell = f'<td class="role" rowspan="{len(flat)}">{_escape(role)}</td>' if k == 0 else ""
                text = ", ".join(map(str, item)) if isinstance(item, (list, tuple)) else item
                rows.append(f"<tr>{cell}<td>{_escape(key)}</td><td>{_format_cell(text, '{}')[0]}</td></tr>")
        self._blocks.append('<table class="prov"><caption>Provenance</caption><thead><tr><th>what</th><th>field</th>'
                            f'<th>value</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')

    def add_note(self, text: str) -> None:
        """A highlighted box for things a reader must not miss (e.g. which CAR variant was used)."""
        self._blocks.append(f'<div class="note">{_escape(text)}</div>')

    def html(self) -> str:
        """The whole report as one HTML document with inline CSS and no external references."""
        subtitle = f'<p class="subtitle">{_escape(self.subtitle)}</p>' if self.subtitle else ""
        body = "\n".join(self._blocks)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n<main>\n<header><h1>{_escape(self.title)}</h1>{subtitle}</header>\n"
            f"{body}\n</main>\n</body>\n</html>\n"
        )

    def write(self, path) -> Path:
        """Write the report atomically: readers never see a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.html())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def plot_metric_scatter(rows: list[dict], metrics: list[str], outcome: str, *, title: str,
                        label_key: str = "teacher") -> str:
    """One small scatter per metric: each teacher's metric value (x) against its outcome (y), labelled.

    Values are drawn raw (not oriented); a panel whose metric was not measured says so instead of drawing.
    """
    n = max(1, len(metrics))
    cols = min(4, n)
    grid_rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.8 * grid_rows + 0.4), layout="constrained")
    y = np.array([_as_float(row.get(outcome)) for row in rows])
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(grid_rows, cols, k + 1)
        x = np.array([_as_float(row.get(metric)) for row in rows])
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#5b6475")
        ax.plot(x[ok], y[ok], "o", color="#4c72b0")
        for xi, yi, row in zip(x[ok], y[ok], [r for r, keep in zip(rows, ok) if keep]):
            ax.annotate(str(row[label_key]), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(metric, fontsize=8)
        ax.set_ylabel(outcome, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return figure_to_data_uri(fig)
