"""report: one self-contained HTML file with every table cell, escaped text and decodable PNG plots."""

import base64
import html
import math
from html.parser import HTMLParser

import pytest

from teacherfit.metrics import correlate_metrics
from teacherfit.report import (
    Report,
    figure_to_data_uri,
    plot_correlations,
    plot_lines,
    plot_metric_with_ci,
    plot_reward_vs_loss,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_PREFIX = "data:image/png;base64,"

TEACHERS = [
    {"teacher": "gemma-2-9b", "reward": 0.81, "reward_low": 0.78, "reward_high": 0.84, "loss_student": 0.92},
    {"teacher": "qwen2-72b", "reward": 0.86, "reward_low": 0.83, "reward_high": 0.90, "loss_student": 1.41},
    {"teacher": "llama-3-8b", "reward": 0.74, "reward_low": 0.70, "reward_high": 0.77, "loss_student": 1.05},
    {"teacher": "phi-3-mini", "reward": 0.69, "reward_low": 0.66, "reward_high": 0.73, "loss_student": 0.88},
]
OUTCOMES = [0.55, 0.42, 0.47, 0.30]


class _Collector(HTMLParser):
    """Every tag and every src/href attribute of a document."""

    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.hrefs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "src":
                self.srcs.append(value)
            elif name == "href":
                self.hrefs.append(value)


def _parse(document: str) -> _Collector:
    collector = _Collector()
    collector.feed(document)
    return collector


def _assert_png_uri(uri: str) -> None:
    assert uri.startswith(DATA_PREFIX)
    assert base64.b64decode(uri[len(DATA_PREFIX) :], validate=True).startswith(PNG_SIGNATURE)


def test_report_with_tables_and_plots_is_one_self_contained_file(tmp_path):
    corr_rows = correlate_metrics(
        {
            "reward": [t["reward"] for t in TEACHERS],
            "loss_student": [t["loss_student"] for t in TEACHERS],
        },
        OUTCOMES,
        n_resamples=100,
    )
    report = Report("Teacher ranking", subtitle="student: tiny-llama")
    report.add_note("plain chat template used for student")
    report.add_kv({"beta": 1.0, "seed": 0, "student": "tiny-llama", "grid": [0.0, 1.0]})
    report.add_table(TEACHERS, caption="Per-teacher metrics")
    report.add_table(corr_rows, ["metric", "spearman", "kendall", "n"], caption="Correlation with outcome")
    report.add_image(plot_metric_with_ci(TEACHERS, "reward", title="Reward", ylabel="reward"), alt="reward")
    report.add_image(plot_reward_vs_loss(TEACHERS, beta=1.0), alt="reward vs loss")
    report.add_image(plot_correlations(corr_rows), alt="correlations")
    out = report.write(tmp_path / "reports" / "rank.html")

    assert out == tmp_path / "reports" / "rank.html"
    assert sorted(p.name for p in out.parent.iterdir()) == ["rank.html"]  # no temp file left behind
    document = out.read_text(encoding="utf-8")
    assert document == report.html()

    parsed = _parse(document)
    assert "http://" not in document and "https://" not in document
    assert parsed.hrefs == [] and "script" not in parsed.tags and "link" not in parsed.tags
    assert len(parsed.srcs) == 3
    for src in parsed.srcs:
        _assert_png_uri(src)

    assert "<caption>Per-teacher metrics</caption>" in document
    assert "<caption>Correlation with outcome</caption>" in document
    for row in TEACHERS:
        for value in row.values():
            expected = value if isinstance(value, str) else f"{value:.4g}"
            assert f">{expected}</td>" in document
    for row in corr_rows:
        assert f">{row['metric']}</td>" in document
        assert f">{row['spearman']:.4g}</td>" in document
        assert f">{row['n']}</td>" in document
    assert "plain chat template used for student" in document
    assert "<h1>Teacher ranking</h1>" in document and "student: tiny-llama" in document


def test_cells_and_texts_are_html_escaped():
    report = Report("A <b>title</b>")
    report.add_heading("R&D <heading>")
    report.add_paragraph('say "<script>alert(1)</script>"')
    report.add_table([{"teacher": "<script>alert(1)</script>", "note": None}], caption="<i>caption</i>")
    report.add_kv({"<key>": "<value>"})
    report.add_note("<note>")
    document = report.html()
    assert "<script" not in document and "<i>" not in document and "<b>" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "<caption>&lt;i&gt;caption&lt;/i&gt;</caption>" in document
    assert "<h2>R&amp;D &lt;heading&gt;</h2>" in document
    assert "&lt;key&gt;" in document and "&lt;value&gt;" in document and "&lt;note&gt;" in document


def test_table_formatting_and_column_choice():
    report = Report("t")
    rows = [{"teacher": "a", "rho": 0.123456, "n": 19, "ok": True}, {"teacher": "b", "extra": "x"}]
    report.add_table(rows, caption="c")
    document = report.html()
    header = "".join(f"<th>{c}</th>" for c in ["teacher", "rho", "n", "ok", "extra"])
    assert header in document  # every key, in order of first appearance
    assert '<td class="num">0.1235</td>' in document
    assert '<td class="num">19</td>' in document
    assert "<td>True</td>" in document

    only = Report("t")
    only.add_table(rows, ["rho"], float_fmt="{:.2f}")
    assert '<td class="num">0.12</td>' in only.html() and "teacher" not in only.html().split("<main>")[1]


def test_add_image_accepts_only_png_data_uris():
    with pytest.raises(ValueError, match="data URI"):
        Report("t").add_image("https://example.com/plot.png", alt="remote")


def test_plot_reward_vs_loss_with_negative_rewards():
    rows = [
        {"teacher": "a", "score": -1.2, "loss": 0.9},
        {"teacher": "b", "score": -1.2, "loss": 1.6},
        {"teacher": "c", "score": 0.7, "loss": 1.1},
    ]
    _assert_png_uri(plot_reward_vs_loss(rows, beta=2.0, reward_key="score", loss_key="loss"))
    identical = [{**row, "score": -1.0} for row in rows]
    _assert_png_uri(plot_reward_vs_loss(identical, beta=2.0, reward_key="score", loss_key="loss"))


def test_plots_tolerate_missing_values():
    rows = [
        {"teacher": "a", "reward": 0.5},  # no interval measured
        {"teacher": "b", "reward": 0.7, "reward_low": 0.6, "reward_high": 0.8},
    ]
    _assert_png_uri(plot_metric_with_ci(rows, "reward", title="r", ylabel="r"))
    undefined = {"spearman": math.nan, "spearman_low": math.nan, "spearman_high": math.nan}
    corr = [
        {"metric": "length", "n": 1, **undefined},
        {"metric": "car", "spearman": -0.4, "spearman_low": -0.9, "spearman_high": 0.3, "n": 5},
    ]
    _assert_png_uri(plot_correlations(corr))


def test_plot_lines():
    series = {"train": ([0, 1, 2], [2.0, 1.5, 1.2]), "val": ([0, 2], [2.1, 1.4])}
    _assert_png_uri(plot_lines(series, title="loss", xlabel="step", ylabel="loss"))


def test_figure_to_data_uri_closes_pyplot_figures():
    pyplot = pytest.importorskip("matplotlib.pyplot")
    fig = pyplot.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    _assert_png_uri(figure_to_data_uri(fig))
    assert not pyplot.fignum_exists(fig.number)


def test_write_replaces_an_existing_report(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old", encoding="utf-8")
    report = Report("new")
    report.add_paragraph("fresh")
    report.write(path)
    assert "fresh" in path.read_text(encoding="utf-8")
    assert html.escape("new") in path.read_text(encoding="utf-8")
