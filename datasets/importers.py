"""Turn the public archives into nnU-Net v2 raw datasets. Nothing here downloads: the user fetches
the archives (the URLs are printed) and passes their paths."""
from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import SimpleITK as sitk

from segplan.planner.fileio import atomic, write_json

COVID_URLS = {
    "COVID-19-CT-Seg_20cases.zip": "https://zenodo.org/record/3757476/files/COVID-19-CT-Seg_20cases.zip",
    "Lung_and_Infection_Mask.zip": "https://zenodo.org/record/3757476/files/Lung_and_Infection_Mask.zip",
}
MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar (or the Google Drive of medicaldecathlon.com)"
COVID_LABELS = {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3}


class ArchiveError(ValueError):
    """An archive that does not have the expected members; the message names archive and member."""


def _nifti_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    out = {}
    for info in zf.infolist():
        name = PurePosixPath(info.filename).name
        if name.endswith(".nii.gz") and not name.startswith("._") and not info.is_dir():
            out[name[: -len(".nii.gz")]] = info
    return out


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    with atomic(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def import_covid19_ct_seg(images_zip: str | Path, masks_zip: str | Path, out: str | Path) -> Path:
    """COVID-19-CT-Seg (Ma et al., zenodo 3757476) -> nnU-Net raw dataset with 4 classes.

    The radiopaedia_* cases are stored windowed to 0..255; they are copied as they are, and the
    planner's fingerprint detects and records that convention.
    """
    out = Path(out)
    with zipfile.ZipFile(images_zip) as zi, zipfile.ZipFile(masks_zip) as zm:
        imgs, masks = _nifti_members(zi), _nifti_members(zm)
        if not imgs:
            raise ArchiveError(f"{images_zip}: no .nii.gz members")
        missing = sorted(set(imgs) - set(masks))
        if missing:
            raise ArchiveError(f"{masks_zip}: no mask for {', '.join(missing)}")
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        for case in sorted(imgs):
            _copy_member(zi, imgs[case], out / "imagesTr" / f"{case}_0000.nii.gz")
            _copy_member(zm, masks[case], out / "labelsTr" / f"{case}.nii.gz")
    meta = {"name": "COVID-19-CT-Seg", "channel_names": {"0": "CT"}, "labels": COVID_LABELS,
            "numTraining": len(imgs), "file_ending": ".nii.gz",
            "reference": "Ma et al. 2020, COVID-19 CT Lung and Infection Segmentation Dataset, "
                         "doi:10.5281/zenodo.3757476", "licence": "CC BY-NC-SA 4.0 (coronacases), CC BY-NC-SA 3.0"}
    write_json(out / "dataset.json", meta, indent=2)
    return out


def import_msd(tar_path: str | Path, out: str | Path) -> Path:
    """A Medical Segmentation Decathlon task tar -> nnU-Net v2 raw layout (4D images split per channel)."""
    out = Path(out)
    tmp_root = out / ".msd_extract"
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and not PurePosixPath(m.name).name.startswith("._")]
        meta_m = [m for m in members if PurePosixPath(m.name).name == "dataset.json"]
        if not meta_m:
            raise ArchiveError(f"{tar_path}: no dataset.json member")
        top = PurePosixPath(meta_m[0].name).parent
        msd = json.load(tf.extractfile(meta_m[0]))
        for key in ("modality", "labels", "training"):
            if key not in msd:
                raise ArchiveError(f"{tar_path}: {meta_m[0].name} lacks '{key}'")
        by_name = {str(PurePosixPath(m.name).relative_to(top)): m for m in members
                   if PurePosixPath(m.name).is_relative_to(top)}
        n_chan = len(msd["modality"])
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
        try:
            for entry in msd["training"]:
                img_rel, lbl_rel = _rel(entry["image"]), _rel(entry["label"])
                case = PurePosixPath(img_rel).name[: -len(".nii.gz")]
                _extract_image(tf, by_name, img_rel, tar_path, out / "imagesTr", case, n_chan, tmp_root)
                _extract_to(tf, by_name, lbl_rel, tar_path, out / "labelsTr" / f"{case}.nii.gz")
            for entry in msd.get("test", []):
                rel = _rel(entry if isinstance(entry, str) else entry["image"])
                case = PurePosixPath(rel).name[: -len(".nii.gz")]
                _extract_image(tf, by_name, rel, tar_path, out / "imagesTs", case, n_chan, tmp_root)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    meta = {"name": msd.get("name", PurePosixPath(top).name), "description": msd.get("description", ""),
            "reference": msd.get("reference", ""), "licence": msd.get("licence", ""),
            "channel_names": {str(k): v for k, v in msd["modality"].items()},
            "labels": {name: int(v) for v, name in msd["labels"].items()},
            "numTraining": len(msd["training"]), "file_ending": ".nii.gz"}
    if "background" not in meta["labels"]:
        meta["labels"] = {"background": 0} | {k: v for k, v in meta["labels"].items() if v != 0}
    write_json(out / "dataset.json", meta, indent=2)
    return out


def _rel(p: str) -> str:
    return p[2:] if p.startswith("./") else p


def _extract_to(tf: tarfile.TarFile, by_name: dict, rel: str, tar_path, dest: Path) -> None:
    if rel not in by_name:
        raise ArchiveError(f"{tar_path}: member '{rel}' listed in dataset.json is missing")
    with atomic(dest) as tmp, tf.extractfile(by_name[rel]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract_image(tf, by_name, rel, tar_path, folder: Path, case: str, n_chan: int, tmp_root: Path) -> None:
    """Copy a 3D image as channel 0000; split a 4D one into one file per channel."""
    tmp = tmp_root / f"{case}.nii.gz"
    _extract_to(tf, by_name, rel, tar_path, tmp)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    reader.ReadImageInformation()
    if reader.GetDimension() == 3:
        tmp.replace(folder / f"{case}_0000.nii.gz")
        return
    img = sitk.ReadImage(str(tmp))
    size = list(img.GetSize())
    if size[3] != n_chan:
        raise ArchiveError(f"{tar_path}: {rel} has {size[3]} volumes, dataset.json lists {n_chan} modalities")
    for c in range(n_chan):
        vol = sitk.Extract(img, size[:3] + [0], [0, 0, 0, c])
        with atomic(folder / f"{case}_{c:04d}.nii.gz") as tmp_c:
            sitk.WriteImage(vol, str(tmp_c), useCompression=True)
    tmp.unlink()
