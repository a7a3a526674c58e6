"""cv_report.html (issue 26, item 1): one self-contained page with the CV table, the plots and a
slice viewer per validation case, checked in a real headless Chromium (tests/browser.py)."""
from __future__ import annotations

import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image

from segplan.runner.evaluation.html_report import PALETTE, case_mosaics, pick_slices
from segplan.runner.evaluation.tables import read_rows
from segplan.runner.workspace import Workspace
from tests import browser


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of the page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _decode(uri: str) -> Image.Image:
    import base64
    head, data = uri.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_mosaics_keep_each_slice_its_classes_and_the_aspect_of_its_spacing():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 4, (7, 20, 45))
    values = [0, 2, 5, 9]                        # label values as in the files (not consecutive)
    ref = np.kron(np.array(values)[small], np.ones((1, 2, 2), int))  # constant over 2x2 blocks
    ref[0, :2, :2] = 7                           # a value the plan does not know: shown as background
    image = rng.normal(size=ref.shape).astype(np.float32)
    pred = np.roll(ref, 1, axis=0)
    m = case_mosaics(image, ref, pred, (2.0, 1.5, 0.5), values, max_side=45, max_slices=4)
    assert m["slices"] == [0, 2, 4, 6] and m["tile"] == [20, 45]
    assert m["display"] == [280, round(280 * 40 * 1.5 / (90 * 0.5))]
    h, w = m["tile"]
    for key, lab in (("reference", ref), ("prediction", pred)):
        png = _decode(m[key])
        assert png.mode == "P" and png.info["transparency"] == 0
        idx = np.asarray(png)
        rgba = np.asarray(png.convert("RGBA"))
        for k, z in enumerate(m["slices"]):
            r, c = divmod(k, m["cols"])
            tile = idx[r * h:(r + 1) * h, c * w:(c + 1) * w]
            expected = np.searchsorted(values, lab[z, 1::2, 1::2])  # class index of each 2x2 block
            expected[~np.isin(lab[z, 1::2, 1::2], values)] = 0
            assert np.array_equal(tile, expected), (key, z)
            colours = rgba[r * h:(r + 1) * h, c * w:(c + 1) * w]
            assert np.array_equal(colours[..., 3] == 0, expected == 0)  # background transparent
            for cls in range(1, len(values)):
                assert (colours[expected == cls][:, :3] == PALETTE[cls]).all()
    assert _decode(m["image"]).format == "WEBP"
    assert _decode(m["image"]).size == (m["cols"] * w, math.ceil(4 / m["cols"]) * h)
    assert list(pick_slices(300, 80)) == sorted(set(pick_slices(300, 80))) and len(pick_slices(300, 80)) == 80
    assert pick_slices(300, 80)[0] == 0 and pick_slices(300, 80)[-1] == 299
    assert case_mosaics(image, ref, None, (1, 1, 1), values)["prediction"] == ""


@pytest.mark.e2e
def test_report_is_self_contained_and_holds_the_table_the_notes_and_every_case_worst_first(trained_cv):
    ws = Workspace(trained_cv)
    page = ws.cv_report_html.read_text()
    tags = _Tags()
    tags.feed(page)
    # nothing from elsewhere: every image and link is a data: URI or an anchor in the page
    for tag, attrs in tags.tags:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        assert not (tag == "script" and "src" in attrs)
        for key in ("src", "href", "data-image", "data-reference", "data-prediction"):
            if attrs.get(key):
                assert attrs[key].startswith(("data:", "#")), (tag, key, attrs[key][:60])
    assert "url(" not in page and "@import" not in page and "http://" not in page and "https://" not in page
    # the table: cv_summary.yaml's numbers, postprocessed rows included, and the checkpoint protocol
    summary = yaml.safe_load(ws.cv_summary_yaml.read_text())
    text = " ".join(tags.text)
    rows = {**summary["folds"], **{f"{k} (postprocessed)": v for k, v in summary["folds_postprocessed"].items()}}
    assert summary["folds_postprocessed"], "the tiny CV chose a postprocessing: its rows must be shown"
    for name, row in rows.items():
        cells = "".join(f"<td>{row[c][m]:.3f}</td>" for c in row for m in ("dice", "sensitivity", "specificity"))
        assert f"<th>{name}</th>{cells}</tr>" in page, name
    for note in summary["notes"]:
        assert note.replace("'", "&#x27;").replace(">", "&gt;") in page
    assert "fold 0: predicted with the final checkpoint" in text
    assert sum(1 for tag, a in tags.tags if tag == "img" and a.get("alt", "").endswith("training curves")) == 2
    assert any(tag == "img" and a.get("alt") == "box plots" for tag, a in tags.tags)
    # one viewer per validation case, worst first by the mean Dice over the labels
    metrics = [dict(r, fold=k) for k in (0, 1) for r in read_rows(ws.fold(k).validation_metrics)]
    labels = [n for n, v in ws.plan.dataset.labels.items() if v]
    mean = {c: np.mean([r["dice"] for r in metrics if r["case"] == c and r["class"] in labels])
            for c in {r["case"] for r in metrics}}
    shown = [a["id"][len("case-"):] for tag, a in tags.tags if tag == "section" and "viewer" in a.get("class", "")]
    assert sorted(shown) == sorted(mean) and len(shown) == 8
    assert [round(mean[c], 9) for c in shown] == sorted(round(v, 9) for v in mean.values())
    assert not any(math.isnan(v) for v in mean.values())


@pytest.mark.e2e
def test_report_in_a_browser_shows_the_table_and_overlays_and_the_slider_moves_the_slice(trained_cv, tmp_path):
    ws = Workspace(trained_cv)
    report = ws.cv_report_html
    with browser.page(tmp_path / "profile", 1300, 1400) as (send, events):
        browser.open_file(send, events, report)
        browser.wait_for(send, "document.querySelector('.viewer').dataset.shown !== undefined")
        # loaded nothing but the file itself and its own data: URIs
        urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
        assert urls[0] == report.resolve().as_uri()
        assert all(u.startswith("data:") for u in urls[1:]), [u[:80] for u in urls if not u.startswith("data:")]
        rect = ("(function(el){var r=el.getBoundingClientRect();"
                "return {x:r.left+scrollX,y:r.top+scrollY,width:r.width,height:r.height};})")
        table = browser.evaluate(send, f"{rect}(document.getElementById('cv-table'))")
        first = "document.querySelector('.viewer')"
        canvases = {k: browser.evaluate(send, f"{rect}({first}.querySelector('canvas.{k}'))")
                    for k in ("reference", "prediction")}
        png, shot = browser.screenshot(send)
        (tmp_path / "report.png").write_bytes(png)

        def crop(r, shot=shot):
            return shot[round(r["y"]):round(r["y"] + r["height"]), round(r["x"]):round(r["x"] + r["width"])]
        # the table: text drawn on a light background (not a blank box)
        cells = crop(table).mean(-1)
        assert table["width"] > 400 and table["height"] > 100
        assert (cells < 100).mean() > 0.02 and (cells > 200).mean() > 0.5
        # the overlays: the CT drawn (grey levels), the reference's classes in their colours on top
        for name, r in canvases.items():
            pix = crop(r).astype(int)
            assert pix.shape[0] > 200 and pix.std() > 20, name
        colour = np.ptp(crop(canvases["reference"]).astype(int), axis=-1) > 60
        assert colour.mean() > 0.02
        # the slider: a click near its other end moves it, and the canvases show another slice
        slider = browser.evaluate(send, f"{rect}({first}.querySelector('input[type=range]'))")
        before = int(browser.evaluate(send, f"{first}.querySelector('input').value"))
        top = int(browser.evaluate(send, f"{first}.querySelector('input').max"))
        x = slider["x"] + slider["width"] * (0.95 if before < top / 2 else 0.05)
        y = slider["y"] + slider["height"] / 2
        send("Runtime.evaluate", expression=f"window.scrollTo(0, {max(0, y - 300)})")
        scroll = browser.evaluate(send, "scrollY")
        for kind in ("mousePressed", "mouseReleased"):
            send("Input.dispatchMouseEvent", type=kind, x=x, y=y - scroll, button="left", clickCount=1)
        after = int(browser.wait_for(send, f"{first}.dataset.shown !== '{before}' && {first}.dataset.shown"))
        assert after != before and int(browser.evaluate(send, f"{first}.querySelector('input').value")) == after
        slices = json.loads(browser.evaluate(send, f"{first}.dataset.geometry"))["slices"]
        label = browser.evaluate(send, f"{first}.querySelector('output').textContent")
        assert label.startswith(f"z = {slices[after]} ")
        _, shot2 = browser.screenshot(send)
        for name, r in canvases.items():
            assert np.abs(crop(r).astype(int) - crop(r, shot2)).mean() > 1, name
