"""Synthetic chest-CT phantoms with lungs and COVID-19-like infection, in the nnU-Net raw layout.

Labels follow COVID-19-CT-Seg: 0 background, 1 left lung, 2 right lung, 3 infection. Each case has
air, a soft-tissue body, a spine, two textured lungs (about -850 HU) with vessels, 1 to 6 irregular
lesions inside the lungs (ground glass -500..-200 HU or consolidation -100..+50 HU) and noise.
About half the cases are stored windowed to [-1250, 250] HU and scaled to 0..255 uint8, as the
Radiopaedia cases of COVID-19-CT-Seg are; the rest as int16 HU.

Anatomy is defined in millimetres and evaluated slab by slab with noise drawn per slab from a
generator seeded by (seed, case, slab), so files are byte-identical whatever the worker count, and
memory stays at a few slabs. ``scale`` multiplies the matrix and slice count (dividing the
spacing), so a small scale gives the same anatomy in fewer voxels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segplan.planner.dataset import Geometry, centred_origin, write_volume
from segplan.planner.fileio import write_json
from segplan.planner.parallel import parallel_map

LABELS = {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3}
WINDOW = (-1250.0, 250.0)   # the Radiopaedia cases' window, mapped to 0..255
SLAB = 16                   # slices generated at a time
NOISE_GRID_MM = 8.0         # spacing of the low-frequency texture grid


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines one case, drawn from its own seeded generator."""

    case_id: str
    shape: tuple[int, int, int]          # z, y, x
    spacing: tuple[float, float, float]  # z, y, x in mm
    windowed: bool
    body: tuple[float, float]            # semi-axes x, y (mm)
    lungs: tuple[tuple[float, ...], ...]  # per lung: cx, cy, cz, ax, ay, az (mm)
    spine: tuple[float, float]           # cy, radius (mm)
    vessels: tuple[tuple[float, ...], ...]  # x0, y0, z0, x1, y1, z1, radius, lung index
    lesions: tuple[tuple[float, ...], ...]  # cx, cy, cz, r, hu, lung index
    noise_hu: float


def make_spec(seed: int, index: int, scale: float = 1.0) -> PhantomSpec:
    rng = np.random.default_rng([seed, index, 7])
    matrix = int(rng.choice([512, 630]))
    sp_xy = float(rng.uniform(0.6, 0.9))
    thick = float(rng.uniform(1.0, 5.0))
    fov = matrix * sp_xy
    length = float(rng.uniform(260, 340))
    nz = max(8, int(round(length / thick * scale)))
    n = max(16, int(round(matrix * scale)))
    spacing = (length / nz, fov / n, fov / n)
    bx, by = float(rng.uniform(140, 175)), float(rng.uniform(100, 125))
    lungs = []
    for side in (+1, -1):  # +x is the patient's left in LPS: label 1 first
        lungs.append((side * float(rng.uniform(0.38, 0.45)) * bx, float(rng.uniform(-10, 5)),
                      float(rng.uniform(-15, 15)), float(rng.uniform(0.30, 0.36)) * bx,
                      float(rng.uniform(0.68, 0.78)) * by, float(rng.uniform(0.36, 0.42)) * length))
    vessels = []
    for li, (cx, cy, cz, ax, ay, az) in enumerate(lungs):
        for _ in range(int(rng.integers(4, 8))):
            d = rng.normal(size=3) * np.array([ax, ay, az]) * 0.6
            vessels.append((cx - np.sign(cx) * ax * 0.6, cy, cz, cx + d[0], cy + d[1], cz + d[2],
                            float(rng.uniform(1.5, 4.0)), li))
    lesions = []
    for _ in range(int(rng.integers(1, 7))):
        li = int(rng.integers(0, 2))
        cx, cy, cz, ax, ay, az = lungs[li]
        u = rng.uniform(-0.6, 0.6, size=3)
        hu = float(rng.uniform(-500, -200)) if rng.random() < 0.6 else float(rng.uniform(-100, 50))
        lesions.append((cx + u[0] * ax, cy + u[1] * ay, cz + u[2] * az, float(rng.uniform(12, 35)), hu, li))
    return PhantomSpec(f"phantom_{index:03d}", (nz, n, n), spacing, bool(rng.random() < 0.5), (bx, by),
                       tuple(lungs), (0.8 * by, float(rng.uniform(14, 20))), tuple(map(tuple, vessels)),
                       tuple(lesions), float(rng.uniform(12, 30)))


def _axis_coords(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Millimetre coordinates of voxel centres along z, y, x, centred on the volume."""
    return tuple((np.arange(n) - (n - 1) / 2) * s for n, s in zip(spec.shape, spec.spacing))


def _lowfreq(rng: np.random.Generator, extent: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random field on a coarse grid covering ``extent`` mm (z, y, x)."""
    from scipy.ndimage import gaussian_filter
    shape = tuple(int(np.ceil(e / NOISE_GRID_MM)) + 3 for e in extent)
    field = gaussian_filter(rng.normal(size=shape), 1.0)
    return field / (field.std() + 1e-6), np.array(extent)


def _sample(field: np.ndarray, extent: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trilinear samples of a coarse field at the tensor grid z x y x x, one axis at a time."""
    out = field
    for axis, c in enumerate((z, y, x)):
        pos = (c + extent[axis] / 2) / NOISE_GRID_MM + 1
        i0 = np.clip(np.floor(pos).astype(int), 0, field.shape[axis] - 2)
        w = (pos - i0).astype(np.float32)
        shp = [1, 1, 1]
        shp[axis] = -1
        w = w.reshape(shp)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out.astype(np.float32)


def render_slab(spec: PhantomSpec, seed: int, index: int, z0: int, z1: int,
                fields) -> tuple[np.ndarray, np.ndarray]:
    """HU values (float32) and labels (uint8) of slices z0..z1."""
    zc, yc, xc = _axis_coords(spec)
    z, y, x = zc[z0:z1, None, None], yc[None, :, None], xc[None, None, :]
    shape = (z1 - z0, spec.shape[1], spec.shape[2])
    (tex, ext), (warp, _) = fields
    texture = _sample(tex, ext, zc[z0:z1], yc, xc)
    deform = _sample(warp, ext, zc[z0:z1], yc, xc)
    bx, by = spec.body
    hu = np.full(shape, -1000.0, np.float32)
    body = (x / bx) ** 2 + (y / by) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    hu[body] = 40.0
    fat = np.broadcast_to((x / (bx - 12)) ** 2 + (y / (by - 12)) ** 2 > 1.0, shape) & body
    hu[fat] = -90.0
    spine_cy, spine_r = spec.spine
    spine = np.broadcast_to(x ** 2 + (y - spine_cy) ** 2 <= spine_r ** 2, shape)
    hu[spine] = 450.0 + 150.0 * texture[spine]
    label = np.zeros(shape, np.uint8)
    for li, (cx, cy, cz, ax, ay, az) in enumerate(spec.lungs):
        r = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
        lung = r <= 1.0 + 0.12 * deform
        hu[lung] = -850.0 + 35.0 * texture[lung]
        label[lung] = li + 1
    for x0, y0, z0_, x1, y1, z1_, rad, li in spec.vessels:
        _draw_vessel(hu, label, int(li) + 1, np.array([x0, y0, z0_]), np.array([x1, y1, z1_]), rad, z, y, x)
    for cx, cy, cz, r, lhu, li in spec.lesions:
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        lesion = (d <= r * (1.0 + 0.35 * deform)) & (label == li + 1)
        hu[lesion] = lhu + 40.0 * texture[lesion]
        label[lesion] = 3
    rng = np.random.default_rng([seed, index, 1000 + z0])
    hu += rng.normal(0.0, spec.noise_hu, size=shape).astype(np.float32)
    return hu, label


def _draw_vessel(hu, label, lung_label, p0, p1, rad, z, y, x) -> None:
    """A cylinder from p0 to p1 (x, y, z mm) drawn only where it lies inside its lung."""
    seg = p1 - p0
    t = ((x - p0[0]) * seg[0] + (y - p0[1]) * seg[1] + (z - p0[2]) * seg[2]) / float(seg @ seg)
    t = np.clip(t, 0, 1)
    d2 = (x - p0[0] - t * seg[0]) ** 2 + (y - p0[1] - t * seg[1]) ** 2 + (z - p0[2] - t * seg[2]) ** 2
    vessel = (d2 <= rad ** 2) & (label == lung_label)
    hu[vessel] = 30.0


def render_case(spec: PhantomSpec, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole case as stored: (int16 HU or uint8 windowed image, uint8 labels), (z, y, x)."""
    extent = tuple(n * s + 2 * NOISE_GRID_MM for n, s in zip(spec.shape, spec.spacing))
    frng = np.random.default_rng([seed, index, 3])
    fields = (_lowfreq(frng, extent), _lowfreq(frng, extent))
    dtype = np.uint8 if spec.windowed else np.int16
    image = np.empty(spec.shape, dtype)
    label = np.empty(spec.shape, np.uint8)
    for z0 in range(0, spec.shape[0], SLAB):
        z1 = min(z0 + SLAB, spec.shape[0])
        hu, lab = render_slab(spec, seed, index, z0, z1, fields)
        image[z0:z1] = hu_to_stored(hu, spec.windowed)
        label[z0:z1] = lab
    return image, label


def hu_to_stored(hu: np.ndarray, windowed: bool) -> np.ndarray:
    if windowed:
        lo, hi = WINDOW
        return np.rint(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return np.rint(np.clip(hu, -1024, 3071)).astype(np.int16)


def _write_case(args) -> dict:
    out, seed, index, scale = args
    spec = make_spec(seed, index, scale)
    image, label = render_case(spec, seed, index)
    geom = Geometry(spec.spacing, centred_origin(spec.shape, spec.spacing), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                    spec.shape)
    write_volume(image, geom, out / "imagesTr" / f"{spec.case_id}_0000.nii.gz")
    write_volume(label, geom, out / "labelsTr" / f"{spec.case_id}.nii.gz")
    ratios = np.bincount(label.ravel(), minlength=4) / label.size
    return {"case": spec.case_id, "windowed": spec.windowed, "shape": list(spec.shape),
            "spacing": [round(s, 4) for s in spec.spacing], "class_ratio": [round(float(r), 5) for r in ratios],
            "spec": asdict(spec)}


def make_phantoms(out: str | Path, cases: int = 20, seed: int = 0, scale: float = 1.0, workers: int = 1,
                  progress: bool = True) -> Path:
    """Write ``cases`` phantoms to ``out`` in the nnU-Net raw layout; returns ``out``."""
    out = Path(out)
    if cases < 1 or scale <= 0:
        raise ValueError("cases must be >= 1 and scale > 0")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    info = parallel_map(_write_case, [(out, seed, i, scale) for i in range(cases)], workers,
                        desc="make-phantoms", progress=progress)
    meta = {"name": "segplan chest-CT phantoms", "channel_names": {"0": "CT"}, "labels": LABELS,
            "numTraining": cases, "file_ending": ".nii.gz",
            "description": f"synthetic chest CT, seed {seed}, scale {scale}; see datasets/phantoms.py"}
    write_json(out / "dataset.json", meta, indent=2)
    write_json(out / "phantoms.json", [{k: v for k, v in i.items() if k != "spec"} for i in info], indent=1)
    return out
