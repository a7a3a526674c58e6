"""Writing predictions: a case's label map as NIfTI or as a DICOM SEG of the series it was read
from, its probabilities beside it; and which cases may be written in a format (DICOM series refused
by segplan.planner.dicom are named and left out)."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from segplan.planner.labels import label_model
from segplan.planner.dataset import Case, DatasetError, Geometry, write_volume
from segplan.planner.dicom import SeriesCase, modality_problem, refused
from segplan.planner.fileio import save_npz
from segplan.planner.plan import Plan
from segplan.runner.postprocessing import postprocess

OUTPUT_FORMATS = ("nifti", "dicom-seg")


def admit(cases: list[Case], output_format: str, plan: Plan) -> tuple[list[Case], list[Case]]:
    """The cases to predict and the DICOM series refused (each named on stderr): series that are no
    regular volume, and series of another modality than the plan's channel (an MR series to a CT
    plan); an unknown output format, or a DICOM SEG asked for input that is not DICOM, refused
    before any work."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r}: one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "dicom-seg":
        from segplan.runner.inference.dicom_seg import check_seg_output
        check_seg_output(cases)
    channel, scheme = plan.dataset.channels[0], plan.intensity.normalization[0].scheme
    checked = []
    for c in cases:
        why = modality_problem(c.series, channel, scheme, plan.name) if isinstance(c, SeriesCase) else None
        checked.append(dataclasses.replace(c, series=dataclasses.replace(c.series, problem=why))
                       if why and not c.series.problem else c)
    cases = checked
    skipped = refused(cases)
    for case in skipped:
        print(f"segplan: refused {case.series.describe()}: {case.series.problem}", file=sys.stderr, flush=True)
    return [c for c in cases if c not in skipped], skipped


def write_labels(labels: np.ndarray, geom: Geometry, case: Case, plan: Plan, out_dir: Path,
                 output_format: str = "nifti") -> Path:
    """A case's label map as ``<case>.nii.gz``, or as ``<case>.dcm``, a DICOM SEG of the series it was read from."""
    if output_format == "dicom-seg":
        from segplan.runner.inference.dicom_seg import write_seg
        path = out_dir / f"{case.case_id}.dcm"
        write_seg(labels, case.series, label_model(plan).predicted_labels, path, plan.name)
    else:
        path = out_dir / f"{case.case_id}.nii.gz"
        write_volume(labels, geom, path)
    return path


def write_prediction(case: Case, labels: np.ndarray, geom: Geometry, probs: np.ndarray | None, out_dir: Path,
                     post, t: dict, progress: bool, plan: Plan, output_format: str = "nifti") -> dict:
    """Write a case's label map (after ``post``, if given; as ``output_format`` says) and, if given,
    its probabilities (float16 .npz, after the label map: its presence marks a complete case);
    returns the case's timings."""
    t0 = time.perf_counter()
    if post is not None:
        labels = postprocess.apply(labels, post)
    written = write_labels(labels, geom, case, plan, out_dir, output_format)
    if probs is not None:
        save_npz(out_dir / f"{case.case_id}.npz", compressed=True, probabilities=probs.astype(np.float16, copy=False))
    t["write_s"] = time.perf_counter() - t0
    if not progress:  # no bar (a log file): one line per case
        print(f"predicted {case.case_id} in {sum(t.values()):.1f} s -> {written}", flush=True)
    return {"case": case.case_id, **t}


def refuse_unreadable(case: Case, error: DatasetError, skipped: list[Case]) -> None:
    """A DICOM series whose headers passed but which the reader cannot read (ITK 5.4 refuses a
    Spacing Between Slices of 0): named and added to ``skipped``, so the others are still predicted;
    any other case's error is raised."""
    if not isinstance(case, SeriesCase):
        raise error
    print(f"segplan: refused {error}", file=sys.stderr, flush=True)
    skipped.append(case)


def report_refused(skipped: list[Case], predicted: int, out_dir: Path) -> None:
    """After the others were predicted: a DatasetError naming the refused series, if any."""
    if skipped:
        raise DatasetError(f"{len(skipped)} DICOM series refused, as said above "
                           f"({', '.join(c.case_id for c in skipped)}); {predicted} predicted into {out_dir}")
