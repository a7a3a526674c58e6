"""segplan from Python: ``Predictor`` loads the networks of a plan's folds, a bundle or a selection's
winner once, then segments image after image (nnU-Net's ``nnUNetPredictor``: initialise from the
trained model folder, then predict). `segplan predict` is a thin layer over it: the same stages,
the same postprocessing, the same voxels.

    from segplan import Predictor
    predictor = Predictor.from_plan("plans/covid.yaml")
    label_map = predictor.predict("ct_001.nii.gz")      # SimpleITK.Image on the input's grid
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segplan.planner.bundle_file import MAX_MEMBER_MB
from segplan.planner.dataset import DatasetError, read_volume, stack_channels, to_sitk, volume_of
from segplan.planner.dicom import read_case_image
from segplan.planner.plan import Plan
from segplan.runner.inference.inputs import find_input_cases, refuse_overwrite
from segplan.runner.inference.stages import (Stage, check_members, predict_ensemble, predict_with_stages,
                                             stages_trust, trained_folds, workspace_stage)
from segplan.runner.trust.checks import check_case
from segplan.runner.postprocessing import postprocess
from segplan.runner.workspace import Workspace


class Predictor:
    """Trained networks, loaded once, and the postprocessing decided on cross-validation.

    Build one with ``from_plan``, ``from_bundle`` or ``from_selection``; then ``predict`` one image
    at a time (a file, a DICOM series folder, a ``SimpleITK.Image``, or a list of them for a
    multi-channel plan) or ``predict_folder`` a whole folder as `segplan predict` does."""

    def __init__(self, stages: list[Stage], post: postprocess.Postprocessing | None = None, note: str = ""):
        check_members(stages)
        self.stages = stages
        self.post = post
        self.note = note   # what was loaded and which postprocessing, said before a folder is predicted

    @classmethod
    def from_plan(cls, plan_path: str | Path, folds: list[int] | None = None, tta: bool = True,
                  postprocessing: bool = True) -> "Predictor":
        """The plan's ``folds`` (default: every trained one), each built from its frozen plan, averaged;
        a cascade's previous stage with the same folds; the work folder's postprocessing
        (WORK/postprocessing.yaml) unless ``postprocessing`` is False."""
        ws = Workspace(Path(plan_path))
        stage = workspace_stage(ws, trained_folds(ws, folds), tta)   # a cascade's previous stage: these folds
        post = (postprocess.load(ws.postprocessing, stage.plan.dataset.labels)
                if postprocessing and ws.postprocessing.exists() else None)
        return cls([stage], post, postprocess.note(post, ws.postprocessing) if post is not None else "")

    @classmethod
    def from_bundle(cls, zip_path: str | Path, folds: list[int] | None = None, tta: bool = True,
                    postprocessing: bool = True, max_member_mb: float = MAX_MEMBER_MB) -> "Predictor":
        """A model bundle's folds (or ``folds`` among them), averaged; an ensemble bundle's members
        averaged as `segplan predict --selection` does; the bundle's postprocessing unless told not to."""
        from segplan.runner.inference.bundle import bundle_stages
        stages, post, note = bundle_stages(Path(zip_path), folds, tta, postprocessing, max_member_mb)
        return cls(stages, post, note)

    @classmethod
    def from_selection(cls, selection_path: str | Path, folds: list[int] | None = None, tta: bool = True,
                       postprocessing: bool = True) -> "Predictor":
        """`segplan select`'s winner (``folds`` of each of its plans, default all) and the selection's
        postprocessing unless told not to."""
        from segplan.runner.evaluation.selection import selection_stages
        stages, post, note = selection_stages(Path(selection_path), folds, tta, postprocessing)
        return cls(stages, post, note)

    @property
    def plan(self) -> Plan:
        """The plan the predictions follow (an ensemble's first member: they agree on the labels)."""
        return self.stages[0].plan

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> the value the label maps hold."""
        return dict(self.plan.dataset.labels)

    def predict(self, image, probabilities: bool = False):
        """The label map of one image as a ``SimpleITK.Image`` on the input's grid: the voxels and
        geometry `segplan predict` writes for it with the same options (postprocessing included).
        ``image``: a file path, a DICOM series folder, a ``SimpleITK.Image``, or a list of files or
        images, one per channel of the plan. ``probabilities``: also return the probabilities on the
        input's grid, (classes, z, y, x) float32 (a region plan: one sigmoid per region), before
        postprocessing, calibrated where the plan's work folder (or the bundle) has a calibration
        (the label map is the uncalibrated arg-max either way)."""
        read, name, sources = self._reader(image)
        p = predict_with_stages(self.stages, read, name, sources, probabilities=probabilities)
        labels = postprocess.apply(p.labels, self.post) if self.post is not None else p.labels
        out = to_sitk(labels, p.geometry)
        return (out, p.probabilities.astype(np.float32, copy=False)) if probabilities else out

    def check(self, image) -> dict:
        """The quality check `segplan predict` writes to qc.csv for ``image`` (as in ``predict``):
        ``score`` (an expected Dice where there is a quality model), ``flagged`` and ``reason``, and
        the ``features`` it was computed from."""
        read, name, sources = self._reader(image)
        p = predict_with_stages(self.stages, read, name, sources)
        return check_case(name, p.features, stages_trust(self.stages)) | {"features": p.features}

    def predict_folder(self, input_dir: str | Path, output_dir: str | Path, save_probabilities: bool = False,
                       progress: bool = True, output_format: str = "nifti") -> list[dict]:
        """What `segplan predict` does: every case of ``input_dir`` (one file per case, nnU-Net's
        ``<case>_0000`` channel files, or DICOM series) into ``output_dir`` as ``<case>.nii.gz`` (or
        ``<case>.dcm`` with ``output_format`` dicom-seg), probabilities beside them if asked for;
        an output that would overwrite an input is refused before anything is predicted. Returns
        the per-case timings."""
        cases = find_input_cases(Path(input_dir), len(self.plan.dataset.channels))
        refuse_overwrite(Path(input_dir), Path(output_dir), cases)
        if self.note:
            print(self.note)
        return predict_ensemble(cases, self.stages, Path(output_dir), save_probabilities, progress, self.post,
                                output_format)

    def _reader(self, image) -> tuple[object, str, tuple]:
        """() -> a fresh (c, z, y, x) float32 image and its geometry (each stage of an ensemble or a
        cascade reads anew: preprocessing changes what it is given), a name for messages, and what
        the channels are read from. A DICOM series is given as its folder."""
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(items) == 1 and not isinstance(items[0], sitk.Image) and Path(items[0]).is_dir():
            cases = find_input_cases(Path(items[0]), len(self.plan.dataset.channels))
            if len(cases) != 1:
                raise DatasetError(f"{items[0]}: {len(cases)} cases; predict one image at a time, or a folder "
                                   "with predict_folder")
            return (lambda: read_case_image(cases[0])), cases[0].case_id, cases[0].image_files
        names = tuple(f"image[{i}]" if isinstance(x, sitk.Image) else Path(x) for i, x in enumerate(items))

        def read():
            return stack_channels(volume_of(x, n) if isinstance(x, sitk.Image) else read_volume(Path(x))
                                  for x, n in zip(items, names))
        first = names[0]
        return read, (first if isinstance(first, str) else first.name.split(".")[0]), names
