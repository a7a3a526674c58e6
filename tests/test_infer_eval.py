import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segplan.planner.labels import LabelModel
from segplan.runner.evaluation.evaluate import case_metrics, mask_metrics
from segplan.runner.inference.infer import gaussian_weights, mirrored, sliding_window, window_starts


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


def test_sensitivity_of_an_empty_reference_is_undefined_not_zero(tmp_path):
    """Nothing to detect: sensitivity is NaN (neither the 0 a false positive used to give nor 1),
    the summary averages the other cases and says why it left one out."""
    ref = np.zeros((4, 6, 6), bool)
    ref[1:3, 1:4, 1:4] = True
    spurious = np.zeros_like(ref)
    spurious[0, 0, 0] = True
    assert np.isnan(mask_metrics(spurious, np.zeros_like(ref), 1.0)["sensitivity"])
    assert np.isnan(mask_metrics(np.zeros_like(ref), np.zeros_like(ref), 1.0)["sensitivity"])
    assert mask_metrics(np.zeros_like(ref), ref, 1.0)["sensitivity"] == 0.0      # a miss is a real 0
    from segplan.planner.dataset import Geometry, write_volume
    from segplan.runner.evaluation.evaluate import evaluate_folder
    import yaml
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), ref.shape)
    for d in ("ref", "pred"):
        (tmp_path / d).mkdir()
    write_volume(ref.astype(np.uint8), g, tmp_path / "ref" / "a.nii.gz")            # found exactly
    write_volume(ref.astype(np.uint8), g, tmp_path / "pred" / "a.nii.gz")
    write_volume(np.zeros(ref.shape, np.uint8), g, tmp_path / "ref" / "b.nii.gz")  # nothing to find, one FP
    write_volume(spurious.astype(np.uint8), g, tmp_path / "pred" / "b.nii.gz")
    text = evaluate_folder(tmp_path / "pred", tmp_path / "ref", lm=LabelModel({"background": 0, "fg": 1}))
    sens = yaml.safe_load((tmp_path / "pred" / "summary.yaml").read_text())["classes"]["fg"]["sensitivity"]
    assert sens == {"mean": 1.0, "median": 1.0, "defined": 1, "undefined": 1}
    assert "fg: sensitivity undefined for 1 case(s) (the reference is empty" in text
    with open(tmp_path / "pred" / "metrics.csv") as f:
        assert "nan" in [line.split(",")[3] for line in f.read().splitlines() if line.startswith("b,")]


def test_missing_a_structure_does_not_improve_the_hd95():
    """The issue's case: a model that misses a structure it would have found badly gets a better
    mean HD95 over the defined cases. The defined mean stays (with the miss counted beside it) and
    hd95_diag_mm scores the miss as the image diagonal, so the miss now ranks worse."""
    from segplan.runner.evaluation.evaluate import image_diagonal_mm, summarize_rows
    shape, spacing = (10, 20, 20), (3.0, 0.8, 0.8)
    ref = np.zeros(shape, np.uint8)
    ref[2:6, 4:10, 4:10] = 1
    close = np.roll(ref, 1, axis=2)                     # a good prediction
    poor = np.roll(ref, (3, 8), axis=(0, 1))            # far off, but found
    labels, diag = {"background": 0, "fg": 1}, image_diagonal_mm(shape, spacing)
    assert diag == pytest.approx(np.sqrt(30.0 ** 2 + 16.0 ** 2 + 16.0 ** 2))

    def summary(second):
        rows = [{"case": cid, "class": "fg", **case_metrics(p, ref, LabelModel(labels), spacing, hd95=True)["fg"]}
                for cid, p in (("a", close), ("b", second))]
        return summarize_rows(rows)["classes"]["fg"], rows
    found, found_rows = summary(poor)
    missed, missed_rows = summary(np.zeros_like(ref))
    assert missed_rows[1]["missed"] and not found_rows[1]["missed"] and np.isnan(missed_rows[1]["hd95_mm"])
    assert missed["hd95_mm"]["mean"] < found["hd95_mm"]["mean"]   # the defined mean alone rewards the miss ...
    assert missed["hd95_mm"] | {"mean": 0, "median": 0} == {"mean": 0, "median": 0, "defined": 1, "undefined": 1,
                                                            "missed": 1}   # ... so the miss is counted beside it
    assert found["hd95_mm"]["missed"] == 0 and found["hd95_diag_mm"]["mean"] == pytest.approx(found["hd95_mm"]["mean"])
    assert missed_rows[1]["hd95_diag_mm"] == pytest.approx(diag)
    assert missed["hd95_diag_mm"]["mean"] > found["hd95_diag_mm"]["mean"]
    # both masks empty: a perfect 0; a structure predicted where the reference has none: the diagonal
    none = np.zeros_like(ref)
    assert mask_metrics(none == 1, none == 1, 1.0, spacing, hd95=True)["hd95_diag_mm"] == 0.0
    assert mask_metrics(ref == 1, none == 1, 1.0, spacing, hd95=True)["hd95_diag_mm"] == pytest.approx(diag)


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(2, 9)] * 3), spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
       seed=st.integers(0, 2 ** 16), density=st.floats(0.02, 0.6))
def test_a_missed_structure_never_scores_better_than_a_found_one(shape, spacing, seed, density):
    """The penalty is an upper bound: no two non-empty masks in an image are farther apart than its
    diagonal, so hd95_diag_mm of a miss is at least that of any prediction that found something."""
    from segplan.runner.evaluation.evaluate import image_diagonal_mm
    rng = np.random.default_rng(seed)
    ref, pred = rng.random(shape) < density, rng.random(shape) < density
    ref.flat[rng.integers(ref.size)] = True
    pred.flat[rng.integers(pred.size)] = True
    m = mask_metrics(pred, ref, 1.0, spacing, hd95=True)
    assert m["hd95_diag_mm"] == m["hd95_mm"] <= image_diagonal_mm(shape, spacing) + 1e-9
    missed = mask_metrics(np.zeros_like(ref), ref, 1.0, spacing, hd95=True)
    assert missed["missed"] and np.isnan(missed["hd95_mm"]) and missed["hd95_diag_mm"] >= m["hd95_diag_mm"]


def test_label_groups_score_as_the_paper_and_union_is_its_own_row():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:5, 1:3] = 1
    ref[1:3, 1:5, 3:5] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # right lung called left: per class wrong, the union right
    labels = {"background": 0, "left_lung": 1, "right_lung": 2}
    m = case_metrics(pred, ref, LabelModel(labels, groups={"lungs": ["left_lung", "right_lung"]}), (2.0, 1.0, 1.0), hd95=True,
                     nsd_tolerance=1.0)
    left = 2 * 16 / (32 + 16)
    assert m["left_lung"]["dice"] == pytest.approx(left) and m["right_lung"]["dice"] == 0.0
    assert m["lungs"]["dice"] == pytest.approx((left + 0.0) / 2)          # the paper: mean of left and right
    assert m["lungs_union"]["dice"] == 1.0 and m["lungs_union"]["hd95_mm"] == 0.0
    assert m["lungs"]["sensitivity"] == pytest.approx((m["left_lung"]["sensitivity"] + 0.0) / 2)
    assert np.isnan(m["right_lung"]["hd95_mm"]) and m["right_lung"]["surface_dice"] == 0.0
    # the issue's example: the whole left lung predicted as right
    swap = ref.copy()
    swap[ref == 1] = 2
    s = case_metrics(swap, ref, LabelModel(labels, groups={"lungs": ["left_lung", "right_lung"]}), (1.0, 1.0, 1.0))
    assert s["lungs_union"]["dice"] == 1.0 and s["lungs"]["dice"] == pytest.approx((0 + 2 * 16 / (16 + 32)) / 2)


def _masks(seed: int, shape=(9, 14, 11)):
    rng = np.random.default_rng(seed)
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.05
    b = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.05
    return a, b


@pytest.mark.parametrize("seed", range(6))
def test_overlap_metrics_match_miseval(seed):
    """Dice, sensitivity, specificity and IoU against miseval (MIScnn's author's metric library)."""
    miseval = pytest.importorskip("miseval")
    pred, ref = _masks(seed)
    m = mask_metrics(pred, ref, voxel_ml=0.001)
    assert m["dice"] == pytest.approx(miseval.evaluate(ref, pred, metric="DSC"), abs=1e-9)
    assert m["sensitivity"] == pytest.approx(miseval.evaluate(ref, pred, metric="SENS"), abs=1e-9)
    assert m["specificity"] == pytest.approx(miseval.evaluate(ref, pred, metric="SPEC"), abs=1e-9)
    assert m["iou"] == pytest.approx(miseval.evaluate(ref, pred, metric="IoU"), abs=1e-9)


def test_where_the_reference_is_empty_we_differ_from_miseval_on_purpose():
    """miseval calls the sensitivity of an empty reference 0 (a false positive or not); that case
    is undefined here. Dice and specificity still agree with it (its IoU of two empty masks is 0,
    ours 1 like its Dice: unchanged by this issue)."""
    miseval = pytest.importorskip("miseval")
    ref, _ = _masks(0)
    ref = np.zeros_like(ref)
    for pred in (np.zeros_like(ref), _masks(1)[1]):
        m = mask_metrics(pred, ref, voxel_ml=0.001)
        assert np.isnan(m["sensitivity"]) and miseval.evaluate(ref, pred, metric="SENS") == 0.0
        assert m["dice"] == pytest.approx(miseval.evaluate(ref, pred, metric="DSC"), abs=1e-9)
        assert m["specificity"] == pytest.approx(miseval.evaluate(ref, pred, metric="SPEC"), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_surface_metrics_follow_surface_elements_in_zyx(seed):
    """HD95 and surface Dice are DeepMind's surface-element definitions, with the spacing in the
    arrays' (z, y, x) order: the same masks transposed to (x, y, z) with the spacing reversed give
    the same numbers, and both equal the library called directly."""
    import surface_distance
    pred, ref = _masks(seed)
    spacing = (3.0, 0.7, 1.1)
    m = mask_metrics(pred, ref, 1.0, spacing, hd95=True, nsd_tolerance=1.5)
    t = mask_metrics(pred.transpose(2, 1, 0), ref.transpose(2, 1, 0), 1.0, spacing[::-1], hd95=True, nsd_tolerance=1.5)
    assert m["hd95_mm"] == pytest.approx(t["hd95_mm"]) and m["surface_dice"] == pytest.approx(t["surface_dice"])
    d = surface_distance.compute_surface_distances(ref, pred, spacing)
    assert m["hd95_mm"] == pytest.approx(surface_distance.compute_robust_hausdorff(d, 95))
    assert m["surface_dice"] == pytest.approx(surface_distance.compute_surface_dice_at_tolerance(d, 1.5))
    # spacing matters: the wrong axis order gives other numbers for these anisotropic masks
    w = mask_metrics(pred, ref, 1.0, spacing[::-1], hd95=True, nsd_tolerance=1.5)
    assert (w["hd95_mm"], w["surface_dice"]) != pytest.approx((m["hd95_mm"], m["surface_dice"]))


def test_surface_dice_of_a_shifted_slab_by_hand():
    """A slab moved by one slice of 2 mm: with a 1 mm tolerance only the side faces (which still touch)
    agree; with 2 mm everything does. Surface-element areas make this exact."""
    ref = np.zeros((12, 20, 20), bool)
    ref[4:8, 5:15, 5:15] = True
    pred = np.roll(ref, 1, axis=0)
    m = mask_metrics(pred, ref, 1.0, (2.0, 1.0, 1.0), hd95=True, nsd_tolerance=2.0)
    assert m["surface_dice"] == pytest.approx(1.0) and m["hd95_mm"] == pytest.approx(2.0)


def test_missing_and_empty_cases_are_counted_not_dropped(tmp_path):
    from segplan.planner.dataset import Geometry, write_volume
    from segplan.runner.evaluation.evaluate import evaluate_folder
    g = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (6, 8, 8))
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    full = np.zeros((6, 8, 8), np.uint8)
    full[1:5, 2:6, 2:6] = 1
    for cid in ("a", "b", "c"):
        write_volume(full, g, ref_dir / f"{cid}.nii.gz")
    write_volume(full, g, pred_dir / "a.nii.gz")                      # perfect
    write_volume(np.zeros_like(full), g, pred_dir / "b.nii.gz")       # empty prediction: HD95 undefined
    write_volume(full, g, pred_dir / "z.nii.gz")                      # no reference
    text = evaluate_folder(pred_dir, ref_dir, lm=LabelModel({"background": 0, "fg": 1}), hd95=True)
    import yaml
    summary = yaml.safe_load((pred_dir / "summary.yaml").read_text())
    assert summary["missing_predictions"] == ["c"] and summary["predictions_without_reference"] == ["z"]
    fg = summary["classes"]["fg"]
    assert fg["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)    # the missing case counts as 0
    assert fg["hd95_mm"] == {"mean": 0.0, "median": 0.0, "defined": 1, "undefined": 2, "missed": 2}
    diag = np.sqrt(12.0 ** 2 + 8.0 ** 2 + 8.0 ** 2)                    # the image's diagonal in mm
    assert fg["hd95_diag_mm"]["mean"] == pytest.approx((0.0 + diag + diag) / 3)
    assert fg["missing_prediction_cases"] == 1
    assert "MISSING predictions, scored as Dice 0: c" in text and "undefined for 2 case(s)" in text
    assert "fg: hd95_mm undefined for 2 case(s) (2 missed: the structure predicted nowhere; 0 with an empty " in text
    assert "hd95_diag_mm" in summary["conventions"]
