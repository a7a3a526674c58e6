"""DICOM SEG output: a label map written as a DICOM Segmentation of the series it was predicted on.

highdicom builds the object: one segment per foreground class of the plan, in the order of the
label values, absent classes included (an empty segment says "looked for, not found"; background
is no segment), labelled with the plan's name for the class. A class whose name is known anatomy
(``KNOWN``: lung, left/right lung, liver, hippocampus ...) gets its SNOMED CT category and type,
pydicom's codes where it has them; any other class is category Tissue, type Tissue, and its name.
Frame i of the label map is the slice of the series' i-th file (the order the series was read in),
so every frame references its source instance and lies at its position, in the series' frame of
reference. Opens in 3D Slicer (QuantitativeReporting) and OHIF.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import numpy as np

from segplan.planner.dataset import Case, DatasetError
from segplan.planner.dicom import Series, SeriesCase, require
from segplan.planner.fileio import atomic

SERIES_NUMBER_OFFSET = 1000   # the SEG's series number: the source's plus this (viewers sort series by number)

# (category, type) by pydicom's SCT code names, or (value, meaning) pairs where pydicom has none
ORGAN, STRUCTURE, ABNORMAL = "Organ", "AnatomicalStructure", "MorphologicallyAbnormalStructure"
KNOWN = {
    "lung": (ORGAN, "Lung"), "left lung": (ORGAN, ("44029006", "Left lung")),
    "right lung": (ORGAN, ("3341006", "Right lung")), "liver": (ORGAN, "Liver"), "spleen": (ORGAN, "Spleen"),
    "kidney": (ORGAN, "Kidney"), "left kidney": (ORGAN, ("18639004", "Left kidney")),
    "right kidney": (ORGAN, ("9846003", "Right kidney")), "pancreas": (ORGAN, "Pancreas"),
    "heart": (ORGAN, "Heart"), "brain": (ORGAN, "Brain"), "prostate": (ORGAN, "Prostate"),
    "bladder": (ORGAN, "Bladder"), "stomach": (ORGAN, "Stomach"), "gallbladder": (ORGAN, "Gallbladder"),
    "esophagus": (ORGAN, "Esophagus"), "trachea": (STRUCTURE, "Trachea"), "aorta": (STRUCTURE, "Aorta"),
    "hippocampus": (STRUCTURE, "Hippocampus"), "spinal cord": (STRUCTURE, "SpinalCord"),
    "lesion": (ABNORMAL, "Lesion"), "tumor": (ABNORMAL, "Tumor"), "tumour": (ABNORMAL, "Tumor"),
}
GENERIC = ("Tissue", "Tissue")


def anatomy_key(name: str) -> str:
    """A class name as a key of ``KNOWN``: lower case, words in sorted order ('Lung_Left' -> 'left lung')."""
    return " ".join(sorted(re.split(r"[\s_\-]+", name.strip().lower()))).strip()


def segment_codes(name: str) -> tuple:
    """The (category, type) codes of a class named ``name``: known anatomy's, else Tissue/Tissue."""
    from pydicom.sr.codedict import codes
    hd = require("highdicom", "--output-format dicom-seg")
    known = {anatomy_key(k): v for k, v in KNOWN.items()}

    def code(c):
        return getattr(codes.SCT, c) if isinstance(c, str) else hd.sr.CodedConcept(c[0], "SCT", c[1])
    category, kind = known.get(anatomy_key(name), GENERIC)
    return code(category), code(kind)


def check_seg_output(cases: list[Case]) -> None:
    """Refuse DICOM SEG output for cases that are no DICOM series (before anything is predicted),
    and say how to install highdicom if it is missing."""
    other = [c for c in cases if not isinstance(c, SeriesCase)]
    if other:
        names = ", ".join(str(c.image_files[0]) for c in other[:3]) + (" ..." if len(other) > 3 else "")
        raise DatasetError(f"--output-format dicom-seg writes the segmentation of a DICOM series, and {len(other)} "
                           f"input cases are not DICOM series ({names}): predict DICOM series with it, or write "
                           "NIfTI (--output-format nifti)")
    require("highdicom", "--output-format dicom-seg")


def write_seg(labels: np.ndarray, series: Series, label_names: dict[str, int], path: Path,
              model_name: str = "segplan") -> None:
    """Write ``labels`` ((z, y, x), the plan's label values, on the series' grid) as a DICOM SEG of
    ``series`` to ``path``, atomically; ``label_names``: the foreground labels a prediction can hold
    (name -> value: LabelModel.predicted_labels), one segment each."""
    hd = require("highdicom", "--output-format dicom-seg")
    pydicom = require("pydicom", "--output-format dicom-seg")
    from pydicom.sr.codedict import codes
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    first = sources[0]
    if tuple(labels.shape) != (len(sources), int(first.Rows), int(first.Columns)):
        raise ValueError(f"{series.describe()}: label map of shape {labels.shape} for {len(sources)} slices of "
                         f"{first.Rows}x{first.Columns}")
    # highdicom copies the first header's Slice Thickness and Spacing Between Slices into the SEG's
    # pixel measures (a pixel_measures argument is replaced by them when the pixel spacing agrees,
    # so the header itself is set). The spacing must be the one the positions give, as segplan's
    # reader takes it: a header that disagrees (7 mm for slices 2.5 mm apart) made a SEG that
    # highdicom itself cannot read back as a volume. A missing thickness (type 1 in the SEG) is
    # taken to be that spacing.
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    step = float(np.linalg.norm(positions[-1] - positions[0])) / (len(sources) - 1)
    first.SpacingBetweenSlices = pydicom.valuerep.DS(step, auto_format=True)   # at most 16 characters
    if not first.get("SliceThickness"):
        first.SliceThickness = first.SpacingBetweenSlices
    classes = sorted((v, name) for name, v in label_names.items() if v != 0)
    segments = np.zeros(labels.shape, np.uint8 if len(classes) < 256 else np.uint16)
    for number, (value, _) in enumerate(classes, start=1):
        segments[labels == value] = number
    try:
        version = metadata.version("segplan")
    except metadata.PackageNotFoundError:
        version = "unknown"
    algorithm = hd.AlgorithmIdentificationSequence(name="segplan", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, (_, name) in enumerate(classes, start=1):
        category, kind = segment_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segments, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="segplan", manufacturer_model_name=model_name[:64],
        software_versions=version, device_serial_number="none", content_label="SEGPLAN",
        content_description=f"segplan {model_name}"[:64], series_description=f"segplan {model_name}"[:64])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        seg.save_as(tmp)
