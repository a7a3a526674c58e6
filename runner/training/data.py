"""Training batches: random patches (with foreground oversampling) + batchgenerators augmentation.

Patches have 3 spatial axes, or 2 for a 2d plan: its patches are windows one slice deep along the
plan's slice axis (segplan.planner.plan.volume_patch), reshaped to (c, *patch), so that batchgenerators'
transforms see (b, c, y, x) batches and apply their 2D forms.

Every batch is a pure function of (seed, fold, epoch, index): the sampler draws from its own
``numpy.random.Generator``, and batchgenerators (which draws from numpy's and Python's global generators) runs
inside ``seeded_global_numpy`` which seeds them and restores it afterwards. A resumed run therefore
sees exactly the batches an uninterrupted one would, and so does a run with another number of
batch workers (segplan.runner.training.batches). Arrays are (b, c, z, y, x) here and become channels-last only in
``to_keras``, which also makes the deep-supervision targets (the labels down-sampled per level).

Label voxels a patch or a spatial transform brings in from outside the image (padding, the border
of a rotation) are background, or with an ignore label unannotated (``outside_class``).
"""
from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import numpy as np

from segplan.planner.plan import AugmentationSection, Plan, SupervisedLevel, supervised_levels, volume_patch
from segplan.planner.labels import LabelModel, label_model
from segplan.runner.cascade import load_previous, move_previous_to_data
from segplan.runner.training.targets import targets
from segplan.runner.preprocessing.preprocess import ANNOTATED, load_case, load_locations

VALIDATION_FOREGROUND_SHARE = 0.5  # validation patches: half centred on foreground, so the loss sees the classes
VALIDATION_STREAM = 999            # seeds the validation patches apart from the training batches (index 0..)


@contextlib.contextmanager
def seeded_global_numpy(seed: int):
    """Seed numpy's and Python's global generators (batchgenerators draws from both) for a block,
    and restore their states afterwards."""
    state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
        random.setstate(py_state)


def outside_class(plan: Plan) -> int:
    """The class index of label voxels that lie outside the image (a patch over its border, the
    corners a rotation brings in): background (0), or with an ignore label the unannotated index K.
    Nobody annotated them, and counted as annotated background they outnumbered the annotated image
    voxels of sparse labels (Hippocampus, every 4th slice: 87% of the "annotated" voxels of a batch,
    foreground 1% of them against 3.4% with dense labels), which starved the loss of foreground."""
    return label_model(plan).ignore_index or 0


def build_augmentation(aug: AugmentationSection, patch_size: list[int], outside: int = 0):
    """The plan's batchgenerators pipeline (each transform with its own probability per sample);
    ``outside``: the label of voxels a spatial transform brings in from past the patch
    (``outside_class``)."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                             ContrastAugmentationTransform, GammaTransform)
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    rad = math.radians(aug.rotation_degrees)
    ts = []
    if max(aug.elastic_p, aug.rotation_p, aug.scaling_p) > 0:
        ts.append(SpatialTransform(
            list(patch_size), patch_center_dist_from_border=None, do_elastic_deform=aug.elastic_p > 0,
            alpha=tuple(aug.elastic_alpha), sigma=tuple(aug.elastic_sigma), do_rotation=aug.rotation_p > 0,
            angle_x=(-rad, rad), angle_y=(-rad, rad), angle_z=(-rad, rad), do_scale=aug.scaling_p > 0,
            scale=tuple(aug.scaling_range), border_mode_data="constant", border_cval_data=0, order_data=3,
            border_mode_seg="constant", border_cval_seg=outside, order_seg=0, random_crop=False,
            p_el_per_sample=aug.elastic_p, p_scale_per_sample=aug.scaling_p, p_rot_per_sample=aug.rotation_p))
    if aug.noise_p > 0:
        ts.append(GaussianNoiseTransform(tuple(aug.noise_variance), p_per_sample=aug.noise_p))
    if aug.brightness_p > 0:
        ts.append(BrightnessMultiplicativeTransform(tuple(aug.brightness_range), per_channel=True, p_per_sample=aug.brightness_p))
    if aug.contrast_p > 0:
        ts.append(ContrastAugmentationTransform(tuple(aug.contrast_range), preserve_range=True, per_channel=True,
                                                p_per_sample=aug.contrast_p))
    if aug.gamma_p > 0:
        ts.append(GammaTransform(tuple(aug.gamma_range), invert_image=False, per_channel=True, retain_stats=True,
                                 p_per_sample=aug.gamma_p))
    if aug.mirror_p > 0 and aug.mirror_axes:
        ts.append(MirrorTransform(tuple(aug.mirror_axes), p_per_sample=aug.mirror_p))
    return Compose(ts) if ts else None


def crop_patch(data: np.ndarray, seg: np.ndarray | None, start: list[int], patch: list[int], outside: int = 0):
    """Patch of size ``patch`` starting at ``start`` (may lie outside: the image padded with 0, the
    labels with ``outside``, see ``outside_class``)."""
    c = data.shape[0]
    out = np.zeros((c, *patch), np.float32)
    out_seg = np.full(tuple(patch), outside, np.int16) if seg is not None else None
    src, dst = [], []
    for s, p, n in zip(start, patch, data.shape[1:]):
        a, b = max(s, 0), min(s + p, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    if seg is not None:
        out_seg[tuple(dst)] = seg[tuple(src)]
    return out, out_seg


class PatchSampler:
    """Draws patches from preprocessed cases; foreground patches are centred on a stored class voxel.
    ``previous`` (a cascade): the folder of the previous stage's class maps on the same grid
    (runner/cascade.py); each patch's crop of it rides along as a second seg channel. ``outside``: the
    label of patch voxels past the image's border (``outside_class``). With a ``slice_axis`` (a 2d
    plan) each patch is a slice of the volume: a window one voxel deep along that axis, returned as a
    (c, *patch) 2D patch."""

    def __init__(self, folder: Path, case_ids: list[str], patch: list[int], fg_fraction: float, *,
                 previous: Path | None = None, outside: int = 0, slice_axis: int | None = None):
        self.folder, self.case_ids, self.patch, self.fg = Path(folder), list(case_ids), list(patch), fg_fraction
        self.outside = outside
        self.window = volume_patch(self.patch, slice_axis)
        self.cases = {cid: load_case(self.folder, cid) for cid in self.case_ids}
        self.locs = {cid: load_locations(self.folder, cid) for cid in self.case_ids}
        self.previous = ({cid: load_previous(Path(previous), cid, self.cases[cid][0].shape[1:]) for cid in self.case_ids}
                         if previous is not None else {})

    def sample(self, rng: np.random.Generator, force_fg: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A foreground patch centred on a stored voxel of a random class, else (with an ignore label)
        centred on a stored annotated voxel, else a random crop."""
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        data, seg, _ = self.cases[cid]
        shape = data.shape[1:]
        locs = [v for k, v in self.locs[cid].items() if len(v) and k != ANNOTATED]
        annotated = self.locs[cid].get(ANNOTATED)
        centre = None
        if (force_fg or rng.random() < self.fg) and locs:
            cls = locs[int(rng.integers(len(locs)))]
            centre = cls[int(rng.integers(len(cls)))]
        elif annotated is not None and len(annotated):
            centre = annotated[int(rng.integers(len(annotated)))]
        if centre is not None:
            start = [int(c) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1)) for c, p in zip(centre, self.window)]
        else:
            start = [int(rng.integers(min(0, n - p), max(0, n - p) + 1)) for n, p in zip(shape, self.window)]
        x, y = crop_patch(data, seg, start, self.window, self.outside)
        x, y = x.reshape((x.shape[0], *self.patch)), y.reshape(self.patch)
        if cid in self.previous:
            p, _ = crop_patch(self.previous[cid][None], None, start, self.window)
            return x, np.stack([y, p.reshape(self.patch).astype(y.dtype)])
        return x, y[None]

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        """A batch; like nnU-Net, at least one patch per batch is foreground when oversampling is on."""
        xs, ys = [], []
        for i in range(size):
            x, y = self.sample(rng, force_fg=self.fg > 0 and i == size - 1)
            xs.append(x)
            ys.append(y)
        return {"data": np.stack(xs), "seg": np.stack(ys).astype(np.float32)}


def to_keras(batch: dict, lm: LabelModel, levels: list[SupervisedLevel] | None = None):
    """(b, c, z, y, x) data and (b, 1, z, y, x) seg (2d: (b, c, y, x), (b, 1, y, x)) -> channels-last
    image and the target(s) ``lm`` defines (one-hot or region masks, with an ignore label's mask)."""
    x = np.moveaxis(batch["data"], 1, -1).astype(np.float32)
    seg = np.rint(batch["seg"][:, 0]).astype(np.int64)
    return x, targets(seg, lm, levels)


def augmented_batch(sampler: PatchSampler, augment, plan: Plan, fold: int, epoch: int, index: int) -> dict:
    """Batch ``index`` of ``epoch`` of ``fold``, before the Keras layout: a pure function of
    (seed, fold, epoch, index), whichever process or thread makes it. The seg stays compact
    (int8/int16) so worker processes send little back; one-hot happens in ``to_keras``. A cascade's
    previous-stage channel, augmented spatially with the labels, becomes input channels here."""
    seed = [plan.training.seed, fold, epoch, index]
    rng = np.random.default_rng(seed)
    batch = sampler.batch(rng, plan.training.batch_size)
    if augment is not None:
        with seeded_global_numpy(int(rng.integers(2 ** 31))):
            batch = augment(**batch)
    if sampler.previous:
        batch = move_previous_to_data(batch, len(plan.dataset.labels), rng)
    seg = np.rint(batch["seg"]).astype(np.int8 if len(plan.dataset.labels) < 128 else np.int16)
    return {"data": batch["data"].astype(np.float32, copy=False), "seg": seg}


def make_batch(sampler: PatchSampler, augment, plan: Plan, fold: int, epoch: int, index: int) -> tuple:
    return to_keras(augmented_batch(sampler, augment, plan, fold, epoch, index), label_model(plan),
                    supervised_levels(plan.network))


def validation_batches(folder: Path, case_ids: list[str], plan: Plan, fold: int,
                       previous: Path | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of validation patches (half centred on foreground), the same every epoch; a
    cascade's previous-stage channels as they are (not augmented)."""
    if not case_ids:
        return []
    sampler = PatchSampler(folder, case_ids, plan.training.patch_size, VALIDATION_FOREGROUND_SHARE,
                           previous=previous, outside=outside_class(plan), slice_axis=plan.slice_axis)
    rng = np.random.default_rng([plan.training.seed, fold, VALIDATION_STREAM])
    n, b, k = plan.training.schedule.validation_patches, plan.training.batch_size, len(plan.dataset.labels)
    levels = supervised_levels(plan.network)
    batches = [sampler.batch(rng, min(b, n - i)) for i in range(0, n, b)]
    if previous is not None:
        batches = [move_previous_to_data(batch, k, None) for batch in batches]
    return [to_keras(batch, label_model(plan), levels) for batch in batches]
