"""The model-bundle file format (a zip; see runner/bundle.py for what is in it): its manifest, the
SHA-256 of every file, and checked unpacking. No TensorFlow: the planner reads bundles too
(`segplan plan --from`)."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

BUNDLE_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be trusted or used; the message says which file and why."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_bundle(bundle: Path, into: Path) -> dict:
    """Unpack ``bundle`` into ``into`` and return its manifest, after checking every file."""
    try:
        with zipfile.ZipFile(bundle) as z:
            names = set(z.namelist())
            if MANIFEST not in names:
                raise BundleError(f"{bundle}: no {MANIFEST}: not a segplan bundle")
            manifest = json.loads(z.read(MANIFEST))
            if manifest.get("bundle_version") != BUNDLE_VERSION:
                raise BundleError(f"{bundle}: bundle version {manifest.get('bundle_version')!r} is unknown; this "
                                  f"segplan reads version {BUNDLE_VERSION}")
            for name in manifest["files"]:
                if name not in names:
                    raise BundleError(f"{bundle}: {name} is listed in the manifest but missing")
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise BundleError(f"{bundle}: unsafe member name {name!r}")
                z.extract(name, into)
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError) as e:
        raise BundleError(f"{bundle}: not a readable segplan bundle ({e})") from e
    for name, digest in manifest["files"].items():
        if sha256(Path(into) / name) != digest:
            raise BundleError(f"{bundle}: {name} was changed after export (SHA-256 differs from the manifest)")
    for k in manifest["folds"]:
        for part in ("plan.yaml", "model.weights.h5"):
            if f"folds/{k}/{part}" not in manifest["files"]:
                raise BundleError(f"{bundle}: fold {k} has no {part}")
    return manifest
