"""WORK/cv_report.html: the cross-validation report as one self-contained page (issue 26).

One file that opens from a USB stick with no network: every image is a ``data:`` URI, the style and
the script are inline, nothing is loaded from elsewhere. It holds the CV table (per fold, per class,
the postprocessed rows and the notes: which checkpoint predicted, what was chosen on the validation
cases), the box plots, each fold's training curves, and for every validation case a viewer: a slider
over its axial slices, reference and prediction side by side over the image, cases worst first by
their mean Dice over the labels.

To stay light (a CV of 50 CT cases under 20 MB) each case is stored downsampled, as three mosaics
of its slices: the image (first channel) as a lossy WebP, the reference and the prediction as
palette PNGs with a transparent background. The page's script cuts one slice out of each mosaic
onto a canvas; a case's mosaics are decoded when its viewer comes into view (the worst at once).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from segplan.planner.labels import label_model
from segplan.planner.dataset import read_image, read_label
from segplan.planner.fileio import write_text
from segplan.runner.workspace import Workspace

MAX_SIDE = 160       # in-plane pixels of a stored slice (longer side), enough to judge an overlay
MAX_SLICES = 80      # axial slices stored per case (evenly spaced when a case has more)
VIEW_WIDTH = 280     # CSS pixels of each canvas
WEBP_QUALITY = 75    # a 512 x 512 x 300 CT: about 350 KB per case (benchmarks/html_report_size.py)
# one colour per class index (background transparent), matplotlib's tab10 without its grey; with
# more than 9 foreground classes the colours repeat
PALETTE = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207)]


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png_file(path: Path) -> str | None:
    return data_uri(Path(path).read_bytes(), "image/png") if Path(path).exists() else None


def pick_slices(n: int, max_slices: int = MAX_SLICES) -> np.ndarray:
    """All axial slices, or ``max_slices`` evenly spaced ones (first and last included)."""
    return np.arange(n) if n <= max_slices else np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))


def _mosaic(stack: np.ndarray, cols: int) -> np.ndarray:
    """(n, h, w) slices -> one (rows*h, cols*w) picture, row by row; unused tiles are zero."""
    n, h, w = stack.shape
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w), stack.dtype)
    for i, s in enumerate(stack):
        out[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = s
    return out


def _label_png(mosaic: np.ndarray) -> bytes:
    """Class indices as a palette PNG, index 0 fully transparent."""
    img = Image.fromarray(mosaic.astype(np.uint8))  # "L"; a palette makes it "P"
    img.putpalette([v for i in range(256) for v in PALETTE[i % len(PALETTE)]])
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, transparency=0)
    return buf.getvalue()


def case_mosaics(image: np.ndarray, ref: np.ndarray, pred: np.ndarray | None, spacing, label_values: list[int],
                 max_side: int = MAX_SIDE, max_slices: int = MAX_SLICES) -> dict:
    """A case's (z, y, x) image, reference and prediction as the viewer's mosaics and geometry.

    Labels (the label files' values) become class indices (``label_values`` order, unknown values
    shown as background); the image is windowed to its 1st-99th percentile. In-plane downsampling is
    linear for the image, nearest for the labels; the displayed aspect follows the (y, x) spacing."""
    zs = pick_slices(image.shape[0], max_slices)
    scale = min(1.0, max_side / max(image.shape[1:]))
    lo, hi = np.percentile(image, [1, 99])
    img = np.clip((image[zs].astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    lut = np.zeros(int(max(label_values + [int(ref.max()), int(pred.max()) if pred is not None else 0])) + 1, np.uint8)
    for i, v in enumerate(label_values):
        lut[v] = i
    if scale < 1:
        img = ndimage.zoom(img, (1, scale, scale), order=1)
    # labels: nearest neighbour by index, so no class is invented between two others
    iy, ix = (np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)
              for n_out, n_in in zip(img.shape[1:], image.shape[1:]))

    def classes(lab):
        return lut[np.clip(lab[zs], 0, len(lut) - 1)][:, iy][:, :, ix]
    n, h, w = img.shape
    cols = max(1, math.ceil(math.sqrt(n * h / w)))  # a roughly square mosaic
    buf = io.BytesIO()  # WebP: about half of a JPEG's bytes at the same quality (Chromium, Firefox, Safari)
    Image.fromarray(_mosaic(np.rint(img).astype(np.uint8), cols)).save(buf, "WEBP", quality=WEBP_QUALITY, method=6)
    ref_c = classes(ref)
    area = ref_c.reshape(n, -1).astype(bool).sum(1)
    return {"image": data_uri(buf.getvalue(), "image/webp"),
            "reference": data_uri(_label_png(_mosaic(ref_c, cols)), "image/png"),
            "prediction": data_uri(_label_png(_mosaic(classes(pred), cols)), "image/png") if pred is not None else "",
            "slices": [int(z) for z in zs], "tile": [int(h), int(w)], "cols": int(cols),
            "start": int(np.argmax(area)) if area.any() else n // 2,
            "display": [VIEW_WIDTH, round(VIEW_WIDTH * image.shape[1] * spacing[1] / (image.shape[2] * spacing[2]))]}


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f}" if metric.endswith("_mm") else f"{value:.3f}"


def table_html(table: dict, classes: list[str]) -> str:
    """The CV table: one row per fold (and average, and their postprocessed twins), a column group
    per class with its metrics (whichever the table holds, in their order)."""
    metrics = list(dict.fromkeys(m for row in table.values() for c in classes for m in row.get(c, {})))
    head1 = "".join(f'<th colspan="{len(metrics)}">{html.escape(c)}</th>' for c in classes)
    head2 = "".join(f"<th>{html.escape(m)}</th>" for _ in classes for m in metrics)
    body = []
    for name, row in table.items():
        kind = ' class="post"' if "postprocessed" in name else (' class="avg"' if name.startswith("average") else "")
        cells = "".join(f"<td>{_fmt(m, row.get(c, {}).get(m))}</td>" for c in classes for m in metrics)
        body.append(f"<tr{kind}><th>{html.escape(name)}</th>{cells}</tr>")
    return (f'<table id="cv-table"><thead><tr><th rowspan="2"></th>{head1}</tr><tr>{head2}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def rank_cases(rows: list[dict], label_names: list[str]) -> list[dict]:
    """One entry per validation case (fold, mean Dice over ``label_names``: the scored labels or
    regions, not the label groups; Dice per class), worst first."""
    cases: dict[str, dict] = {}
    for r in rows:
        c = cases.setdefault(r["case"], {"case": r["case"], "fold": int(r["fold"]), "dice": {}})
        c["dice"][r["class"]] = float(r["dice"])
    for c in cases.values():
        own = [v for k, v in c["dice"].items() if k in label_names] or list(c["dice"].values())
        c["mean_dice"] = float(np.nanmean(own)) if not np.all(np.isnan(own)) else math.nan
    return sorted(cases.values(), key=lambda c: (-math.inf if math.isnan(c["mean_dice"]) else c["mean_dice"],
                                                  c["case"]))


def _viewer(ws: Workspace, entry: dict, label_values: list[int]) -> str:
    case = next(c for c in ws.dataset.cases if c.case_id == entry["case"])
    image = read_image(case)[0][0]
    ref, geom = read_label(case.label_file)
    pred_file = ws.fold(entry["fold"]).validation / f"{case.case_id}.nii.gz"
    pred = read_label(pred_file)[0] if pred_file.exists() else None
    m = case_mosaics(image, ref, pred, geom.spacing, label_values)
    dice = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in entry["dice"].items())
    missing = "" if pred is not None else ' <b class="warn">prediction missing (scored as Dice 0)</b>'
    w, h = m["display"]
    canvases = "".join(f'<figure><figcaption>{t}</figcaption><canvas class="{t}" width="{w}" height="{h}"></canvas>'
                       f"</figure>" for t in ("reference", "prediction"))
    attrs = {"data-image": m["image"], "data-reference": m["reference"], "data-prediction": m["prediction"],
             "data-geometry": json.dumps({k: m[k] for k in ("slices", "tile", "cols")})}
    attr_text = " ".join(f'{k}="{html.escape(v)}"' for k, v in attrs.items())
    n = len(m["slices"])
    return (f'<section class="viewer" id="case-{html.escape(case.case_id)}" {attr_text}>'
            f"<h3>{html.escape(case.case_id)} <small>fold {entry['fold']} · mean Dice "
            f"{_fmt('dice', entry['mean_dice'])} · {dice}</small>{missing}</h3>"
            f'<div class="pair">{canvases}</div>'
            f'<label>slice <input type="range" min="0" max="{n - 1}" value="{m["start"]}" step="1"> '
            f'<output></output></label></section>')


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
thead th{background:#eef;text-align:center}
tbody th{text-align:left;background:#f7f7f7}
tr.avg td,tr.avg th{font-weight:bold}
tr.post td,tr.post th{background:#f3faf3}
ul.notes{font-size:13px;color:#444}
img.plot{max-width:100%;border:1px solid #ddd;margin:.3em 0}
img.box{max-width:900px}
.nav{font-size:13px}
.cases{display:flex;flex-wrap:wrap;gap:10px}
.viewer{border:1px solid #ddd;padding:.4em .6em;background:#fafafa;width:min-content}
.viewer h3{font-size:14px;margin:.2em 0 .4em}
.viewer small{font-weight:normal;color:#555}
.pair{display:flex;gap:8px}
figure{margin:0}
figcaption{font-size:12px;color:#555}
canvas{background:#000;display:block}
input[type=range]{width:280px;vertical-align:middle}
.legend span{display:inline-block;margin-right:1em;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.warn{color:#b00}
"""

EAGER = 4  # viewers drawn at load (the worst cases); the others when they come into view
# Cut the shown slice out of the mosaics; a viewer's images are decoded when it comes into view.
SCRIPT = """
(function(){
  function load(src){return new Promise(function(ok){if(!src){ok(null);return;}
    var i=new Image();i.onload=function(){ok(i);};i.onerror=function(){ok(null);};i.src=src;});}
  function setup(v){
    if(v._started){return;} v._started=true;
    var g=JSON.parse(v.dataset.geometry), slider=v.querySelector('input'), out=v.querySelector('output');
    Promise.all([load(v.dataset.image),load(v.dataset.reference),load(v.dataset.prediction)]).then(function(im){
      function draw(){
        var k=+slider.value, th=g.tile[0], tw=g.tile[1], sx=(k%g.cols)*tw, sy=Math.floor(k/g.cols)*th;
        [['reference',im[1]],['prediction',im[2]]].forEach(function(p){
          var c=v.querySelector('canvas.'+p[0]), ctx=c.getContext('2d');
          ctx.clearRect(0,0,c.width,c.height);
          ctx.imageSmoothingEnabled=true; ctx.globalAlpha=1;
          if(im[0]){ctx.drawImage(im[0],sx,sy,tw,th,0,0,c.width,c.height);}
          if(p[1]){ctx.imageSmoothingEnabled=false; ctx.globalAlpha=0.55;
            ctx.drawImage(p[1],sx,sy,tw,th,0,0,c.width,c.height);}
        });
        out.textContent='z = '+g.slices[k]+' ('+(k+1)+'/'+g.slices.length+')';
        v.dataset.shown=String(k);
      }
      slider.addEventListener('input',draw); draw();
    });
  }
  var views=document.querySelectorAll('.viewer');
  for(var i=0;i<Math.min(EAGER,views.length);i++){setup(views[i]);}  // the worst cases at once
  if('IntersectionObserver' in window){
    var ob=new IntersectionObserver(function(es){es.forEach(function(e){if(e.isIntersecting){setup(e.target);}});},
                                    {rootMargin:'400px'});
    views.forEach(function(v){ob.observe(v);});
  } else { views.forEach(setup); }
})();
"""


def build_report(ws: Workspace, table: dict, classes: list[str], notes: list[str], missing: list[int],
                 rows: list[dict]) -> str:
    """The page's HTML: ``table`` as in cv_summary.yaml (postprocessed rows included), the report's
    ``notes``, the ``missing`` folds and every fold's per-case metric ``rows`` (with their fold)."""
    plan = ws.plan
    label_names = list(label_model(plan).structures)   # what each case's mean Dice is over (labels or regions)
    label_values = list(plan.dataset.labels.values())
    parts = [f"<h1>Cross-validation report: {html.escape(plan.name)}</h1>",
             '<p class="nav"><a href="#cases">validation cases</a> · <a href="#boxplots">box plots</a> · '
             '<a href="#curves">training curves</a>'
             + (' · <a href="#calibration">calibration</a>' if ws.calibration_plot.exists() else "") + '</p>',
             "<p>Median over each fold's validation cases (the paper's Table 1).</p>", table_html(table, classes),
             '<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes if n) + "</ul>"]
    if missing:
        parts.append(f"<p class=warn>Folds not finished yet: {', '.join(map(str, missing))}.</p>")
    box = _png_file(ws.cv_boxplots)
    if box:
        parts += [f'<h2 id="boxplots">Per-case metrics</h2><img class="plot box" alt="box plots" src="{box}">']
    reliability = _png_file(ws.calibration_plot)
    if reliability:   # written by the same summarize, before this page (runner/trust/fit.py)
        parts += ['<h2 id="calibration">Calibration</h2><p>Reliability of the out-of-fold probabilities before and '
                  'after temperature scaling, on folds the temperature was not fitted on (calibration.yaml).</p>'
                  f'<img class="plot" alt="reliability diagram" src="{reliability}">']
    legend = "".join(f'<span><i style="background:rgb{PALETTE[i % len(PALETTE)]}"></i>{html.escape(n)}</span>'
                     for i, n in enumerate(plan.dataset.labels) if i)
    if plan.dataset.ignore_label is not None:   # the viewer has no colour for it: say what it shows instead
        legend += (f"<span>unannotated voxels (ignore label {plan.dataset.ignore_label}) are shown uncoloured in the "
                   "reference, as background: they are not scored</span>")
    ranked = rank_cases(rows, label_names)
    parts += [f'<h2 id="cases">Validation cases, worst first ({len(ranked)})</h2>',
              f'<p class="legend">Left the reference, right the prediction, over the image. {legend}</p>',
              '<div class="cases">', *(_viewer(ws, e, label_values) for e in ranked), "</div>",
              '<h2 id="curves">Training curves</h2>']
    for k in sorted({int(r["fold"]) for r in rows}):
        curve = _png_file(ws.fold(k).progress)
        parts.append(f"<h3>fold {k}</h3>" + (f'<img class="plot" alt="fold {k} training curves" src="{curve}">'
                                             if curve else "<p>no training curves (progress.png) in this fold</p>"))
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>CV report: {html.escape(plan.name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + f"<script>{SCRIPT.replace('EAGER', str(EAGER))}</script></body></html>\n")


def write_report(ws: Workspace, table: dict, classes: list[str], notes: list[str], missing: list[int],
                 rows: list[dict]) -> Path:
    """Write WORK/cv_report.html (atomically) and return its path."""
    write_text(ws.cv_report_html, build_report(ws, table, classes, notes, missing, rows))
    return ws.cv_report_html
