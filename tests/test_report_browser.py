"""A real `evaluate` report rendered in headless Chromium: every table there, no broken image, a screenshot.

Chromium comes from Debian's packages (``make test`` installs it when it can); where it is missing the test
skips and says so. The screenshot is written to the test's tmp dir and copied to
``build/test-artifacts/`` (or ``$TEACHERFIT_ARTIFACTS``) for the record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import HeadlessChromium, find_chromium
from teacherfit.cli import app
from teacherfit.data import Record
from test_evaluate import QUESTIONS, REFERENCE_LENGTHS, evaluate_args, scripted_judge
from test_rewards import scripted_server
from tiny import save_tiny, tiny_llama

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = find_chromium()

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (apt-get install chromium, or set TEACHERFIT_CHROMIUM); "
                             "`make test` installs it when it runs as root")

# Everything the page shows about itself, read in the browser once every image has been decoded.
PAGE_FACTS = """
Promise.all([...document.images].map(img => img.decode().catch(() => null))).then(() => ({
  title: document.title,
  tables: [...document.querySelectorAll('table')].map(t => ({
    caption: t.caption ? t.caption.textContent : null, rows: t.rows.length})),
  images: [...document.images].map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})),
  external: performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:')),
  height: document.documentElement.scrollHeight,
}))
"""


@pytest.fixture(scope="module")
def evaluate_report(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("browser")
    student = save_tiny(tiny_llama(tokenizer, seed=4), tokenizer, root / "student")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    rows = [Record.from_messages([{"role": "user", "content": q["turns"][0]}]).with_response("r" * n).to_row()
            for q, n in zip(QUESTIONS, REFERENCE_LENGTHS)]
    (root / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with scripted_server(scripted_judge) as (base_url, _):
        result = CliRunner().invoke(app, evaluate_args(root, student, base_url, root / "run"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run" / "report.html"


def check_rendered_report(report: Path, tmp_path: Path, *, title: str, captions: tuple[str, ...], images: int,
                          min_tables: int) -> None:
    """Render ``report`` in headless Chromium and check it: every table of the file (caption, header row and
    data), every embedded image decoded to real pixels, nothing fetched from anywhere; the screenshot is kept
    under build/test-artifacts (or $TEACHERFIT_ARTIFACTS)."""
    expected_tables = report.read_text().count("<table")
    name = f"{title.split()[-1]}-report.png"
    with HeadlessChromium(CHROMIUM) as browser:
        page = browser.open(report.resolve().as_uri())
        facts = browser.evaluate(page, PAGE_FACTS)
        shot = browser.screenshot(page, tmp_path / name)

    assert facts["title"] == title
    assert len(facts["tables"]) == expected_tables >= min_tables
    found = [t["caption"] for t in facts["tables"]]
    for caption in captions:
        assert caption in found
    assert all(t["rows"] >= 2 for t in facts["tables"])
    assert len(facts["images"]) == images
    for image in facts["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert facts["external"] == []  # self-contained

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    artifacts = Path(os.environ.get("TEACHERFIT_ARTIFACTS", REPO / "build" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / name)


def test_evaluate_report_renders_in_headless_chromium(evaluate_report, tmp_path):
    check_rendered_report(evaluate_report, tmp_path, title="teacherfit evaluate", min_tables=5, images=2,
                          captions=("MT-Bench score per category", "Win rates with 95% bootstrap intervals"))


from test_study import judge_server, study_workspace, studied  # noqa: E402,F401  (fixtures: a tiny study run)


def test_study_report_renders_in_headless_chromium(studied, tmp_path):
    # 3 images: outcome per teacher, correlations, metric-vs-outcome scatter
    check_rendered_report(studied[0] / "report.html", tmp_path, title="teacherfit study", min_tables=8, images=3,
                          captions=("Our correlations next to the paper's", "Larger-versus-smaller pairs",
                                    "The same teacher fine-tuned with two training seeds"))
    # it leads with the answers: a verdict naming the metric to trust, then the regret table, before any other table
    with HeadlessChromium(CHROMIUM) as browser:
        page = browser.open((studied[0] / "report.html").resolve().as_uri())
        facts = browser.evaluate(page, STUDY_FACTS)
    results = json.loads((studied[0] / "results.json").read_text())
    assert facts["verdicts"][0].lower().startswith(f"trust {results['answers'][0]['metric']}")
    assert facts["verdictTop"] < facts["firstTableTop"] and facts["firstCaption"].startswith("Per metric: Spearman")
    assert facts["regretHeader"][:5] == ["metric", "rho 0", "sig 0", "pick 0", "regret 0"]
    assert len(facts["regretRows"]) == len(results["trust"]["rows"])


STUDY_FACTS = """({
  verdicts: [...document.querySelectorAll('.verdict')].map(v => v.textContent),
  verdictTop: document.querySelector('.verdict').getBoundingClientRect().top,
  firstTableTop: document.querySelector('table').getBoundingClientRect().top,
  firstCaption: document.querySelector('table caption').textContent,
  regretHeader: [...document.querySelector('table').rows[0].cells].map(c => c.textContent),
  regretRows: [...document.querySelector('table').rows].slice(1).map(r => r.cells[0].textContent),
})"""


from test_pipelines import generated, ranked, workspace  # noqa: E402,F401  (fixtures: a tiny generate + rank run)

RANK_FACTS = """({
  verdict: (document.querySelector('.verdict') || {}).textContent || null,
  verdictTop: document.querySelector('.verdict') ? document.querySelector('.verdict').getBoundingClientRect().top : null,
  firstTableTop: document.querySelector('table').getBoundingClientRect().top,
  samples: [...document.querySelectorAll('table')].filter(t => t.caption && t.caption.textContent === 'Per-sample scores')
    .map(t => [...t.rows].slice(1).map(r => [...r.cells].map(c => c.textContent)))[0],
  next: (document.querySelector('pre.code') || {}).textContent || null,
})"""


def test_rank_report_renders_in_headless_chromium(ranked, tmp_path):
    """The rank report leads with the pick (above every table), shows each sample's instruction and response
    text, the next command, and embeds everything (3 plots, nothing fetched)."""
    report = ranked / "report.html"
    check_rendered_report(report, tmp_path, title="teacherfit rank", min_tables=3, images=3,
                          captions=("Per-sample scores", "Provenance"))
    results = json.loads((ranked / "results.json").read_text())
    with HeadlessChromium(CHROMIUM) as browser:
        page = browser.open(report.resolve().as_uri())
        facts = browser.evaluate(page, RANK_FACTS)
    pick = results["recommendation"]
    assert facts["verdict"].lower().startswith("use " if pick["supported"] else "no pick is supported")
    assert pick["teacher"] in facts["verdict"] and facts["verdictTop"] < facts["firstTableTop"]
    header = ["id", "instruction", "teacher", "response"]
    rows = facts["samples"]
    assert rows and all(len(r) >= len(header) for r in rows)
    assert "Write a short poem about the sea." in {r[1] for r in rows}
    assert any(r[3] for r in rows)  # response text shown (escaped: the browser shows the characters)
    assert facts["next"].startswith("teacherfit distill --student ")
