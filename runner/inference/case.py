"""One case through the network: read, preprocess, overlapping windows, and back to the input's grid
as a label map (and probabilities where asked for)."""
from __future__ import annotations

import sys
import time
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from segplan.planner.dataset import Case, DatasetError, Geometry
from segplan.planner.dicom import read_case_image
from segplan.planner.labels import label_model
from segplan.planner.plan import Plan, volume_patch
from segplan.runner.inference.infer import sliding_window, on_windows
from segplan.runner.preprocessing.inversion import invert_compact, invert_probabilities
from segplan.runner.preprocessing.preprocess import preprocess_image
from segplan.runner.trust.features import probability_features, volume_features


class CasePrediction(NamedTuple):
    """One image's prediction: the label map (original label values) on the input's grid, that
    grid's geometry, the probabilities on it where asked for (else None), the seconds of each step,
    and what its quality check is computed from (runner/trust/features.py)."""

    labels: np.ndarray
    geometry: Geometry
    probabilities: np.ndarray | None
    timings: dict
    features: dict


def warn_unknown_units(sources: tuple, props: dict) -> None:
    """Name each CT input whose values show no known unit: it is read as HU, which may be wrong
    (say, windowed 0..255 stored as 0..1 floats), and nobody would know from the output alone.
    ``sources``: what each channel was read from (file paths, or names of in-memory images)."""
    for c, (conv, why) in enumerate(zip(props["conventions"], props["convention_evidence"])):
        if conv == "unknown":
            path = sources[c] if c < len(sources) else sources[0]
            print(f"segplan: warning: {path}: CT values show no known unit ({why}); read as HU. If it is stored "
                  "otherwise (0..255 windowed, HU + 1024, scaled), convert it to HU and predict again",
                  file=sys.stderr, flush=True)


def predict_case(case: Case, plan: Plan, predict, progress: bool = False, probabilities: bool = False,
                 training_case: bool = False, previous=None, compact: bool = False) -> CasePrediction:
    """``predict_image`` of a case read from its files (or DICOM series). ``previous`` (a cascade):
    case -> the previous stage's label map on the original grid."""
    return predict_image(lambda: read_case_image(case), case.case_id, case.image_files, plan, predict, progress,
                         probabilities, training_case, previous=None if previous is None else (lambda: previous(case)),
                         compact=compact)


def predict_image(read, case_id: str, sources: tuple, plan: Plan, predict, progress: bool = False,
                  probabilities: bool = False, training_case: bool = False,
                  previous=None, compact: bool = False) -> CasePrediction:
    """The CasePrediction of one image (a region plan's probabilities: one sigmoid per region; the
    quality features: the input image's, the network's entropy on its own grid, the predicted
    volumes). ``read``: () -> a fresh (c, z, y, x) image and its geometry,
    called once and owned here (preprocessing works on it in place and it is let go of before the
    network runs; an ensemble or a cascade reads again for each stage). ``sources``: what the
    channels were read from, for messages. ``training_case``: the case is one of the plan's training
    cases (a fold's validation case), read in the plan's unit for it; otherwise the image's own
    values decide its unit, whatever its name. ``previous`` (a cascade): () -> the previous stage's
    label map on the same grid, added as one-hot input channels. ``compact``: the probabilities in
    float16 (half the memory; for writing, or calibrating in place, not for averaging), the label
    map still made from float32."""
    t, lm = {}, label_model(plan)
    t0 = time.perf_counter()
    image, geom = read()
    if image.shape[0] != len(plan.dataset.channels):
        raise DatasetError(f"{sources[0]}: {image.shape[0]} channels, the plan needs {len(plan.dataset.channels)}")
    data, _, props = preprocess_image(image, geom, plan, case_id, training_case=training_case)
    del image
    warn_unknown_units(sources, props)
    if previous is not None:
        from segplan.runner.cascade import previous_channels
        data = np.concatenate([data, previous_channels(previous(), props, plan)])
    t["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm(total=None, desc=f"{case_id}", disable=not progress, leave=False, unit="window")

    def tick(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
    window = volume_patch(plan.training.patch_size, plan.slice_axis)  # a 2d plan: one slice deep
    probs = sliding_window(data, window, on_windows(predict, plan.training.patch_size, window),
                           lm.n_outputs, plan.inference.overlap, plan.inference.weighting,
                           plan.inference.batch_size, progress=tick)
    bar.close()
    t["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = dict(props["image_features"], **probability_features(probs, lm))
    if probabilities and compact:   # float16 on the original grid, the label map from float32
        labels, full = invert_compact(probs, props, plan, lm)
    elif lm.has_regions:  # region probabilities on the original grid, thresholded and written in order
        full = invert_probabilities(probs, props, plan, full=True, background=False)
        labels = lm.to_label_map(full)
        full = full if probabilities else None
    elif probabilities:
        full = invert_probabilities(probs, props, plan, full=True)
        labels = lm.to_label_map(full)
    else:
        full = None
        labels = lm.classes_to_labels(invert_probabilities(probs, props, plan, full=False))
    features |= volume_features(labels, geom.spacing, lm)
    t["resample_back_s"] = time.perf_counter() - t0
    return CasePrediction(labels, geom, full, t, features)

