import numpy as np
import pytest

from runner.evaluate import case_metrics, mask_metrics
from runner.infer import gaussian_weights, mirrored, sliding_window, window_starts


@pytest.mark.parametrize("shape,patch,overlap", [((13, 17, 19), (8, 8, 8), 0.5), ((5, 7, 3), (8, 8, 8), 0.5),
                                                  ((33, 20, 41), (16, 12, 10), 0.25), ((8, 8, 8), (8, 8, 8), 0.5)])
@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_identity_predictor_reproduces_input(shape, patch, overlap, weighting):
    vol = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    calls = []

    def identity(batch):
        calls.append(batch.shape)
        assert batch.shape[2:] == patch
        return batch
    out = sliding_window(vol, list(patch), identity, 2, overlap, weighting, batch_size=3)
    assert out.shape == vol.shape
    assert np.allclose(out, vol, atol=1e-5)
    assert all(c[0] <= 3 for c in calls)


def test_window_starts_cover_exactly_with_half_overlap():
    s = window_starts(100, 40, 0.5)
    assert s[0] == 0 and s[-1] == 60 and all(b - a <= 20 for a, b in zip(s, s[1:]))
    assert window_starts(30, 40, 0.5) == [0]
    assert window_starts(160, 80, 0.5) == [0, 40, 80]


def test_gaussian_weights_peak_in_centre():
    w = gaussian_weights([9, 9, 9])
    assert w[4, 4, 4] == w.max() == 1.0 and w.min() > 0


def test_mirroring_undoes_flips():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 1, 4, 5, 6)).astype(np.float32)
    assert np.allclose(mirrored(lambda b: b * 2, [0, 1, 2])(x), 2 * x)
    # a predictor that is not flip-equivariant gets averaged over the flips
    pos = lambda b: np.broadcast_to(np.arange(b.shape[-1], dtype=np.float32), b.shape)  # noqa: E731
    assert np.allclose(mirrored(pos, [2])(x), 2.5)


def test_metrics_against_hand_computed():
    ref = np.zeros((4, 4, 4), bool)
    ref[:2] = True                     # 32 voxels
    pred = np.zeros_like(ref)
    pred[1:3] = True                   # 32 voxels, 16 overlap
    m = mask_metrics(pred, ref, voxel_ml=0.002)
    tp, fp, fn, tn = 16, 16, 16, 16
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert m["pred_ml"] == pytest.approx(32 * 0.002) and not m["empty_reference"]
    empty = mask_metrics(np.zeros_like(ref), np.zeros_like(ref), 1.0)
    assert empty["dice"] == 1.0 and empty["empty_reference"] and empty["specificity"] == 1.0
    miss = mask_metrics(pred, np.zeros_like(ref), 1.0)
    assert miss["dice"] == 0.0 and miss["empty_reference"]


def test_label_groups_and_hd95():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:5, 1:3] = 1
    ref[1:3, 1:5, 3:5] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # right lung called left: per class wrong, lungs right
    m = case_metrics(pred, ref, {"background": 0, "left_lung": 1, "right_lung": 2}, {"lungs": ["left_lung", "right_lung"]},
                     (2.0, 1.0, 1.0), hd95=True, nsd_tolerance=1.0)
    assert m["lungs"]["dice"] == 1.0 and m["right_lung"]["dice"] == 0.0
    assert m["left_lung"]["dice"] == pytest.approx(2 * 16 / (32 + 16))
    assert m["lungs"]["hd95_mm"] == 0.0 and m["left_lung"]["hd95_mm"] > 0
    assert m["lungs"]["surface_dice"] == 1.0 and m["right_lung"]["surface_dice"] == 0.0


def test_surface_dice_by_hand():
    ref = np.zeros((1, 1, 10), bool)
    ref[0, 0, 2:6] = True
    pred = np.zeros_like(ref)
    pred[0, 0, 4:9] = True
    # surfaces: every voxel of a one-voxel-thick line is surface; distances along x in mm
    m = mask_metrics(pred, ref, 1.0, (1.0, 1.0, 1.0), hd95=True, nsd_tolerance=1.0)
    d_pred = [min(abs(p - r) for r in range(2, 6)) for p in range(4, 9)]   # 0 0 1 2 3
    d_ref = [min(abs(r - p) for p in range(4, 9)) for r in range(2, 6)]    # 2 1 0 0
    within = sum(d <= 1.0 for d in d_pred + d_ref)
    assert m["surface_dice"] == pytest.approx(within / 9)
    assert m["hd95_mm"] == pytest.approx(np.percentile(d_pred + d_ref, 95))
