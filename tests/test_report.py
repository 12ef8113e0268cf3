"""lvm_ray.report: one self-contained HTML file whose figures are real, non-blank PNGs.

Rendered twice: parsed (every expected <img> present, decodes as a PNG, not blank) and, where a
Chromium is installed, drawn by headless Chromium to a screenshot that must not be blank.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvm_ray.evaluate import evaluate
from lvm_ray.outcomes import outcomes
from lvm_ray.report import render_report
from tests.browser import assert_not_blank, screenshot
from tests.test_evaluate import make_predictions, with_intervals
from tests.test_outcomes import simulate_cohort

#: Prediction intervals (coverage), subgroups (forest plot) and calibration plots.
CALIBRATION_FIGURES = {"fig-interval-coverage", "fig-subgroups", "fig-calibration"}
EVAL_FIGURES = {"fig-scatter", "fig-bland-altman", "fig-roc", *CALIBRATION_FIGURES}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(attributes)
        for key in ("src", "href"):
            if key in attributes:
                self.urls.append(attributes[key])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def result_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report_inputs")
    evaluate(with_intervals(make_predictions(n=800, seed=3)), str(root / "eval"))
    predictions, followup = simulate_cohort(n=2000, seed=9)
    outcomes(predictions, followup, str(root / "outcomes"))
    return root / "eval", root / "outcomes"


@pytest.fixture(scope="module")
def report(result_dirs, tmp_path_factory) -> Path:
    eval_dir, outcomes_dir = result_dirs
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert render_report(str(eval_dir), str(outcomes_dir), str(out)) == str(out)
    return out


def test_every_figure_is_an_embedded_non_blank_png(report, result_dirs) -> None:
    _, outcomes_dir = result_dirs
    outcome_names = list(json.loads((outcomes_dir / "outcomes.json").read_text()))
    expected = EVAL_FIGURES | {"fig-forest"} | {f"fig-cuminc-{name}" for name in outcome_names}
    parsed = _parse(report)
    ids = [img.get("id") for img in parsed.images]
    assert len(ids) == len(set(ids)), "figure ids must be distinct"
    assert set(ids) == expected
    alts = [img.get("alt", "") for img in parsed.images]
    assert all(alts) and len(set(alts)) == len(alts)
    for img in parsed.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["id"]
        payload = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert len(payload) > 5000, img["id"]
        image = Image.open(io.BytesIO(payload))
        assert image.format == "PNG" and min(image.size) > 200, img["id"]
        assert_not_blank(image, img["id"])


def test_report_is_self_contained_with_header_and_tables(report) -> None:
    parsed = _parse(report)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert all(url.startswith("data:") for url in parsed.urls), "no external resources"
    text = " ".join(parsed.text)
    for needle in ("lvm-ai-2021", "test-1", "c-statistic (95% CI)", "Any ECG rule", "Heart failure", "Person-years"):
        assert needle in text, needle
    for needle in ("Prediction intervals", "Performance by subgroup", "Women", "Age 55-65", "BMI >=30", "ECE"):
        assert needle in text, needle
    assert "<style>" in report.read_text()


def test_report_without_outcomes_and_to_fsspec_url(result_dirs) -> None:
    import fsspec

    eval_dir, _ = result_dirs
    url = "memory://lvm-ray-report-test/report.html"
    render_report(str(eval_dir), None, url)
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        document = f.read()
    parser = _Collector()
    parser.feed(document)
    assert {img["id"] for img in parser.images} == EVAL_FIGURES
    assert "No outcome analysis" in document


def test_report_of_an_uncalibrated_model_says_it_has_no_intervals(tmp_path) -> None:
    evaluate(make_predictions(n=400, seed=4), str(tmp_path / "eval"))
    out = tmp_path / "report.html"
    render_report(str(tmp_path / "eval"), None, str(out))
    parsed = _parse(out)
    ids = {img["id"] for img in parsed.images}
    assert ids == EVAL_FIGURES - {"fig-interval-coverage"}
    assert "uncalibrated checkpoint" in " ".join(parsed.text)


def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    image = screenshot(report, tmp_path / "report.png", (1200, 4000), tmp_path / "chromium-profile")
    assert image.size == (1200, 4000)
    assert_not_blank(image, "Chromium screenshot")
    # The figures were drawn, not just the text: a good share of the page is non-white.
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert (pixels < 240).mean() > 0.03
    # The lower part of the page (outcome figures) is rendered too.
    assert_not_blank(image.crop((0, 2000, 1200, 4000)), "lower half of the screenshot")


def test_calibration_figures_render_in_headless_chromium(report, tmp_path) -> None:
    """Only the new figures, one page each: Chromium draws each of them (not a blank or broken image)."""
    images = {img["id"]: img for img in _parse(report).images}
    for fig_id in sorted(CALIBRATION_FIGURES):
        page = tmp_path / f"{fig_id}.html"
        page.write_text(f'<html><body style="margin:0"><img id="{fig_id}" src="{images[fig_id]["src"]}"></body></html>')
        image = screenshot(page, tmp_path / f"{fig_id}.png", (1200, 900), tmp_path / "chromium-profile")
        assert_not_blank(image.crop((0, 0, 600, 400)), f"{fig_id} drawn by Chromium")
