"""One orientation for every image a plan sees (issue 41): a model trained on CTs stored LPS sees a
copy stored RAS (or a DICOM series in its storage order) mirrored, and with side-named labels
(left / right lung) labels the wrong side. As TotalSegmentator does, every image, training or new,
is brought to the orientation the plan records (``dataset.orientation``, the majority of its
training cases) before preprocessing, and every prediction is put back in the input's own
orientation and geometry after it.

Only axis permutations and flips: no interpolation, so the voxels are the input's own and the way
back is exact. The orientation is the nearest axis-aligned one: an oblique direction keeps its
obliqueness (its axes are permuted and flipped to lie nearest the plan's, as
SimpleITK.DICOMOrientImageFilter does). Codes are SimpleITK's / ITK's three letters (``LPS``: the
first index axis runs towards the patient's left, the second posterior, the third superior; the
identity direction of a NIfTI read by SimpleITK). Arrays are segplan's (z, y, x), or (c, z, y, x):
the last three axes are the volume's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from segplan.planner.dataset import Geometry, zyx_to_xyz

AXIS_LETTERS = ("RL", "AP", "SI")


@dataclass(frozen=True)
class Reorientation:
    """How an image's array becomes the oriented one: its (z, y, x) axes taken in the order ``axes``
    (oriented axis a is original axis ``axes[a]``), then the oriented axes marked in ``flips``
    reversed; ``geometry``: the oriented grid (the same voxels in the same places of the patient)."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    geometry: Geometry

    @property
    def identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "flips": list(self.flips), "geometry": self.geometry.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Reorientation":
        return cls(tuple(d["axes"]), tuple(bool(f) for f in d["flips"]), Geometry.from_dict(d["geometry"]))


def orientation_code(direction) -> str:
    """The three-letter code of the axis-aligned orientation nearest a SimpleITK direction (9 values)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])


def valid_code(code: str) -> bool:
    """Whether ``code`` names an orientation: one letter of each of R/L, A/P, S/I, in any order."""
    if not isinstance(code, str) or len(code) != 3:
        return False
    found = [next((i for i, pair in enumerate(AXIS_LETTERS) if c in pair), None) for c in code.upper()]
    return sorted(f for f in found if f is not None) == [0, 1, 2]


def majority(codes: list[str]) -> str | None:
    """The orientation most of ``codes`` share (ties: the first seen); None for no codes."""
    return Counter(codes).most_common(1)[0][0] if codes else None


def _anatomical_axis(letter: str) -> int:
    return next(k for k, pair in enumerate(AXIS_LETTERS) if letter in pair)


def reorientation(geom: Geometry, code: str) -> Reorientation:
    """The permutation and flips that bring an image on ``geom`` to orientation ``code``, and the grid
    it then lies on. As SimpleITK's DICOMOrientImageFilter: the image's own code (``orientation_code``,
    ITK's nearest axis-aligned orientation) is matched letter by letter with ``code``, each target
    axis taking the image axis along the same anatomical axis, flipped where the two letters point
    opposite ways; an oblique image keeps its tilt, and an image whose code is ``code`` is left as is."""
    d = np.array(geom.direction, dtype=float).reshape(3, 3)          # column i: index axis i (x, y, z)
    src, tgt = orientation_code(geom.direction).upper(), code.upper()
    perm = [next(i for i in range(3) if _anatomical_axis(src[i]) == _anatomical_axis(tgt[j])) for j in range(3)]
    flip_xyz = [src[perm[j]] != tgt[j] for j in range(3)]
    spacing_xyz, size_xyz = zyx_to_xyz(geom.spacing), zyx_to_xyz(geom.shape)
    new_dir = np.stack([d[:, perm[j]] * (-1.0 if flip_xyz[j] else 1.0) for j in range(3)], axis=1)
    origin = np.array(geom.origin, dtype=float)
    for j in range(3):
        if flip_xyz[j]:
            i = perm[j]
            origin = origin + d[:, i] * spacing_xyz[i] * (size_xyz[i] - 1)
    oriented = Geometry(tuple(float(spacing_xyz[perm[j]]) for j in (2, 1, 0)),
                        tuple(float(v) for v in origin), tuple(float(v) for v in new_dir.ravel()),
                        tuple(int(size_xyz[perm[j]]) for j in (2, 1, 0)))
    axes = tuple(2 - perm[2 - a] for a in range(3))                  # (z, y, x) array axes
    flips = tuple(flip_xyz[2 - a] for a in range(3))
    return Reorientation(axes, flips, oriented)


def orient(array: np.ndarray, r: Reorientation) -> np.ndarray:
    """``array`` ((z, y, x) or (c, z, y, x)) on the original grid -> on the oriented grid (a view
    where numpy can; copy it before writing in place)."""
    if r.identity:
        return array
    lead = array.ndim - 3
    out = array.transpose(tuple(range(lead)) + tuple(lead + a for a in r.axes))
    flip = tuple(lead + a for a in range(3) if r.flips[a])
    return np.flip(out, flip) if flip else out


def unorient(array: np.ndarray, r: Reorientation) -> np.ndarray:
    """The inverse of ``orient``: an array on the oriented grid -> on the original grid."""
    if r.identity:
        return array
    lead = array.ndim - 3
    flip = tuple(lead + a for a in range(3) if r.flips[a])
    out = np.flip(array, flip) if flip else array
    inverse = tuple(int(i) for i in np.argsort(r.axes))
    return out.transpose(tuple(range(lead)) + tuple(lead + a for a in inverse))


def oriented_spacing_and_shape(spacing, shape, direction, code: str) -> tuple[list[float], list[int]]:
    """A case's (z, y, x) spacing and shape once brought to ``code`` (what the planner plans with)."""
    g = reorientation(Geometry(tuple(spacing), (0.0, 0.0, 0.0), tuple(direction), tuple(shape)), code).geometry
    return list(g.spacing), list(g.shape)


def case_orientations(fp) -> dict[str, str]:
    """Each training case's orientation code (case id -> code), from the fingerprint's directions."""
    return {c.case_id: orientation_code(c.direction) for c in fp.cases}


def in_majority_orientation(fp):
    """The fingerprint with every case's spacing, shape, non-zero shape and direction as they are once
    brought to the orientation most cases share (what preprocessing will make of them), so that the
    planner's target spacing, patch and mirror axes are of the arrays the network sees. Cases
    already so are unchanged, and so is a fingerprint made so (it may be applied twice); the stored
    directions, which say which cases were moved, are the caller's to keep."""
    import dataclasses
    codes = case_orientations(fp)
    code = majority(list(codes.values()))
    cases = []
    for c in fp.cases:
        if codes[c.case_id] == code:
            cases.append(c)
            continue
        r = reorientation(Geometry(tuple(c.spacing), (0.0, 0.0, 0.0), tuple(c.direction), tuple(c.shape)), code)
        g = r.geometry
        cases.append(dataclasses.replace(c, spacing=list(g.spacing), shape=list(g.shape),
                                         cropped_shape=[c.cropped_shape[a] for a in r.axes],
                                         direction=list(g.direction)))
    return dataclasses.replace(fp, cases=cases)


def orientation_note(codes: dict[str, str], code: str) -> str:
    """What the plan's orientation is and which training cases are stored otherwise, in words."""
    other = {cid: c for cid, c in codes.items() if c != code}
    text = (f"{len(codes) - len(other)} of the {len(codes)} training cases are stored {code}: every image, training "
            "or new, is brought to it by axis permutation and flips (no interpolation) before preprocessing, and "
            "each prediction is written back in its input's own orientation and geometry")
    if other:
        shown = ", ".join(f"{cid} ({c})" for cid, c in list(other.items())[:10])
        text += f"; stored otherwise: {shown}{' ...' if len(other) > 10 else ''}"
    return text
