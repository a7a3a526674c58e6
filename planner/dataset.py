"""A dataset's cases and their volumes, read and written through SimpleITK.

``Case``, ``Dataset`` and ``Geometry`` describe what planner/layouts.py finds in a dataset folder
(nnU-Net v2 raw layout or plain images/ + labels/); the functions below read and write one volume.

Axis convention: arrays are (c, z, y, x) images and (z, y, x) label maps; spacing and shape are
given in (z, y, x). SimpleITK's (x, y, z) order is converted here and nowhere else. Origin and
direction are physical quantities and are kept exactly as SimpleITK reports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segplan.planner.fileio import atomic

CT_NAMES = ("ct", "computed tomography")


class DatasetError(ValueError):
    """A dataset folder that cannot be understood; the message names the file."""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the patient: spacing/shape (z, y, x); origin/direction as SimpleITK."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"spacing": [float(v) for v in self.spacing], "origin": [float(v) for v in self.origin],
                "direction": [float(v) for v in self.direction], "shape": [int(v) for v in self.shape]}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]), tuple(d["shape"]))


@dataclass(frozen=True)
class Case:
    """One training or test case: its id and the files it is made of."""

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


@dataclass
class Dataset:
    """A dataset folder: layout, channels, labels (name -> value) and cases."""

    root: Path
    layout: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    channel_evidence: dict[int, str] = field(default_factory=dict)  # channels segplan named (plain layout): from what
    regions: dict[str, list[int]] = field(default_factory=dict)      # region name -> label values (nnU-Net regions)
    regions_class_order: list[int] = field(default_factory=list)     # label value written per region, in order
    ignore_label: int | None = None                                  # value of voxels nobody annotated

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def is_ct(self, channel: int) -> bool:
        return self.channel_names[channel].strip().lower() in CT_NAMES

    def channel_source(self, channel: int) -> str:
        """Whether ``channel`` is read as CT and from what, in words (the plan says it beside the channels)."""
        kind = "CT" if self.is_ct(channel) else "not CT (z-score per case)"
        if channel in self.channel_evidence:
            return f"{kind}, inferred from the files: {self.channel_evidence[channel]}"
        meta = "dataset.json" if self.layout == "nnunet" else "dataset.yaml"
        return f"{kind}: named '{self.channel_names[channel]}' in {meta}"


# --- arrays and geometry: the only place where SimpleITK's (x, y, z) order is converted ----------

def geometry_of(img: sitk.Image) -> Geometry:
    """The geometry of a SimpleITK image in segplan's (z, y, x) convention."""
    size = img.GetSize()
    return Geometry(tuple(float(v) for v in reversed(img.GetSpacing()[:3])),
                    tuple(float(v) for v in img.GetOrigin()[:3]),
                    tuple(float(v) for v in img.GetDirection()),
                    tuple(int(v) for v in reversed(size[:3])))


def read_volume(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read one file as a (z, y, x) array (or (c, z, y, x) for a vector image) and its geometry."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DatasetError(f"{path}: unreadable ({str(e).strip().splitlines()[-1]})") from e
    return volume_of(img, path)


def volume_of(img: sitk.Image, name) -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image (read from a file, or from a DICOM series named ``name``) as a (z, y, x)
    array (or (c, z, y, x) for a vector image) and its geometry."""
    if img.GetDimension() != 3:
        raise DatasetError(f"{name}: {img.GetDimension()}D image, segplan needs 3D volumes")
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
    return arr, geometry_of(img)


def read_image(case: Case) -> tuple[np.ndarray, Geometry]:
    """All channels of a case as a float32 (c, z, y, x) array, with the geometry of channel 0."""
    return stack_channels(read_volume(path) for path in case.image_files)


def stack_channels(volumes) -> tuple[np.ndarray, Geometry]:
    """(array, geometry) pairs, one file or image each (a vector image: several channels), as one
    float32 (c, z, y, x) array with the geometry of the first; read one at a time from an iterator."""
    chans, geom = [], None
    for c, (arr, g) in enumerate(volumes):
        if geom is not None and _differs(geom, g):
            raise DatasetError(f"channel {c} lies on another grid than channel 0 (shape {list(g.shape)} / "
                               f"{list(geom.shape)}, spacing {[round(v, 4) for v in g.spacing]} / "
                               f"{[round(v, 4) for v in geom.spacing]}, or origin / direction): the channels of a case "
                               "must share one voxel grid; resample them onto channel 0's first")
        geom = geom or g
        chans.extend(arr.astype(np.float32, copy=False) if arr.ndim == 4 else [arr.astype(np.float32, copy=False)])
    return np.stack(chans), geom


def _differs(a: Geometry, b: Geometry) -> bool:
    """Whether two channel grids differ beyond header round-off (the tolerances check-dataset uses)."""
    return (tuple(a.shape) != tuple(b.shape) or not np.allclose(a.spacing, b.spacing, rtol=1e-3, atol=0)
            or not np.allclose(a.origin, b.origin, atol=1e-2) or not np.allclose(a.direction, b.direction, atol=1e-3))


def read_label(path: Path) -> tuple[np.ndarray, Geometry]:
    """A label map as an integer (z, y, x) array and its geometry."""
    arr, geom = read_volume(path)
    if arr.ndim != 3:
        raise DatasetError(f"{path}: a label map must have one component")
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DatasetError(f"{path}: label map holds non-integer values")
        arr = rounded.astype(np.int32)
    return arr, geom


def zyx_to_xyz(values) -> tuple:
    """A per-axis tuple (spacing, size, ...) from segplan's (z, y, x) order to SimpleITK's (x, y, z)."""
    return tuple(reversed(tuple(values)))


def left_right_axis(direction) -> int:
    """The (z, y, x) array axis that runs most nearly along the patient's left-right axis, from
    SimpleITK's row-major direction cosines (column j: the world direction of index axis j, x first;
    world x is LPS' right-to-left)."""
    j = int(np.argmax(np.abs(np.asarray(direction, float).reshape(3, 3)[0])))
    return 2 - j


def centred_origin(shape, spacing) -> tuple[float, float, float]:
    """The (x, y, z) origin that puts the centre of a (z, y, x) grid at the world origin."""
    return tuple(-(n - 1) / 2 * s for n, s in zip(zyx_to_xyz(shape), zyx_to_xyz(spacing)))


def to_sitk(arr: np.ndarray, geom: Geometry) -> sitk.Image:
    """A (z, y, x) array as a SimpleITK image carrying ``geom``'s spacing, origin and direction."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(v) for v in zyx_to_xyz(geom.spacing)))
    img.SetOrigin(tuple(geom.origin))
    img.SetDirection(tuple(geom.direction))
    return img


def write_volume(arr: np.ndarray, geom: Geometry, path: Path) -> None:
    """Write a (z, y, x) array with ``geom`` to any SimpleITK format, atomically."""
    path = Path(path)
    if tuple(arr.shape) != tuple(geom.shape):
        raise ValueError(f"{path}: array shape {arr.shape} differs from geometry shape {geom.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        sitk.WriteImage(to_sitk(arr, geom), str(tmp), useCompression=True)
