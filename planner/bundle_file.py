"""The model-bundle file format (a zip; see runner/inference/bundle.py for what is in it): its manifest, the
SHA-256 of every file, and checked unpacking. No TensorFlow: the planner reads bundles too
(`segplan plan --from`).

A bundle is a file people download and pass around, so nothing in it is trusted before it is
checked, and every refusal is a ``BundleError`` naming the bundle and the problem. ``open_bundle``
reads it in three passes and writes nothing before the third:

1. the manifest: a JSON object of at most ``MANIFEST_LIMIT`` bytes; ``bundle_version`` the integer
   ``BUNDLE_VERSION`` (one plan: ``folds`` a non-empty list of distinct fold numbers) or
   ``ENSEMBLE_BUNDLE_VERSION`` (several plans, ``models``: each a ``name`` (one plain path part),
   its ``folds`` and the ``previous`` model it builds on (a cascade's 3d_lowres, or null), no chain
   a loop; ``ensemble``: the distinct models whose probabilities are averaged; every model used);
   ``files`` a map of plain relative names to SHA-256 digests, with each fold's plan and weights
   among them (``folds/K/...``, or ``models/NAME/folds/K/...``);
2. every listed member: present once, a file (not a folder entry), not encrypted, stored or
   deflated, at most ``max_member_mb`` MB as declared, and its SHA-256, computed by streaming the
   member through the hash (never written, never whole in memory), equal to the manifest's;
3. only then the listed members are unpacked, hashed again as they are written (a bundle changed
   while it was read is refused too). Members the manifest does not list are never unpacked.

What the manifest proves: every file is the one that was exported. What it does not prove: who
exported it. Anyone can write a bundle with a matching manifest; take bundles from people you trust.
"""
from __future__ import annotations

import hashlib
import json
import re
import reprlib
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from segplan.planner.plan import Plan
from segplan.planner.plan_file import load_plan
from segplan.planner.schema import SchemaError

BUNDLE_VERSION = 1           # one plan's folds
ENSEMBLE_BUNDLE_VERSION = 2  # several plans: an ensemble of configurations, or a cascade and its previous stage
BUNDLE_VERSIONS = (BUNDLE_VERSION, ENSEMBLE_BUNDLE_VERSION)
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 1 << 20     # bytes; a manifest of ten folds is about 2 kB
MAX_MEMBER_MB = 512          # MB (10^6 bytes) per unpacked file: twice the weights of the largest network
                             # segplan plans (6 stages up to 512 filters, 4 channels, 20 classes: 240 MB)
COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
DIGEST = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
# what a damaged zip raises while a member is read (a bad CRC, a truncated or corrupt deflate stream)
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


class BundleError(ValueError):
    """A bundle that cannot be trusted or used; the message says which file and why."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def open_bundle(bundle: Path, into: Path, max_member_mb: float = MAX_MEMBER_MB) -> dict:
    """Check every file of ``bundle`` against its manifest, then unpack the listed ones into ``into``
    and return the manifest. Nothing is written unless every check passes (module docstring)."""
    bundle = Path(bundle)
    if bundle.is_dir():
        raise BundleError(f"{bundle}: is a folder; give the .zip file that `segplan export` wrote")
    if not bundle.is_file():
        raise BundleError(f"{bundle}: no such bundle file")
    try:
        z = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise BundleError(f"{bundle}: not a readable zip file ({e})") from e
    with z:
        manifest = _read_manifest(bundle, z)
        members = {name: _member(bundle, z, name, max_member_mb, "is listed in the manifest but missing")
                   for name in manifest["files"]}  # pass 2: each entry checked, none read yet
        for name, info in members.items():
            _check_digest(bundle, name, _hash(bundle, z, info), manifest["files"][name], "was changed after export")
        for name, info in members.items():
            target = Path(into) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                digest = _hash(bundle, z, info, f)
            _check_digest(bundle, name, digest, manifest["files"][name], "changed while the bundle was being read")
    return manifest


def bundle_plan(bundle: Path, root: Path, fold: int, prefix: str = "") -> Plan:
    """Fold ``fold``'s frozen plan from a bundle unpacked into ``root`` (``prefix``: its model's
    folder, ``models/NAME/``, in an ensemble bundle); one that does not validate is refused naming
    the bundle and the member (not the temporary folder it was unpacked into)."""
    name = f"{prefix}folds/{fold}/plan.yaml"
    try:
        return load_plan(Path(root) / name, check_paths=False)
    except ValueError as e:  # SchemaError, or text that is not UTF-8
        problems = e.problems if isinstance(e, SchemaError) else [str(e)]
        text = "; ".join(p.replace(str(Path(root) / name), name) for p in problems)
        raise BundleError(f"{bundle}: {name} is not a valid plan: {' '.join(text.split())}") from e


def choose_folds(bundle: Path, manifest: dict, folds: list[int] | None, model: dict | None = None) -> list[int]:
    """``folds`` (``--folds``), each of which the bundle (or its ``model``, an entry of ``bundle_models``)
    must hold; None: all of them."""
    held = manifest["folds"] if model is None else model["folds"]
    if folds is None:
        return list(held)
    missing = [k for k in folds if k not in held]
    if missing:
        whose = "" if model is None or not model["name"] else f"model {model['name']} "
        raise BundleError(f"{bundle}: {whose}has no fold {', '.join(map(str, missing))}; it holds folds "
                          f"{', '.join(map(str, held))} (--folds picks among them)")
    return list(folds)


def bundle_models(manifest: dict) -> tuple[dict[str, dict], list[str]]:
    """A checked manifest's models by name, each with its ``prefix`` inside the bundle, and the names
    of those averaged: a one-plan bundle is the ensemble of its one model (named '')."""
    if manifest["bundle_version"] == BUNDLE_VERSION:
        return {"": {"name": "", "folds": manifest["folds"], "previous": None, "prefix": ""}}, [""]
    models = {m["name"]: {**m, "prefix": f"models/{m['name']}/"} for m in manifest["models"]}
    return models, list(manifest["ensemble"])


def _read_manifest(bundle: Path, z: zipfile.ZipFile) -> dict:
    info = _member(bundle, z, MANIFEST, MANIFEST_LIMIT / 1e6, "not a segplan bundle")
    try:
        manifest = json.loads(b"".join(_blocks(bundle, z, info)))
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{bundle}: {MANIFEST} is not valid JSON ({e})") from e
    _check_manifest(bundle, manifest)
    return manifest


def _check_manifest(bundle: Path, m) -> None:
    """The manifest's shape and values (see the module docstring), refused by key."""
    where = f"{bundle}: {MANIFEST}"
    if not isinstance(m, dict):
        raise BundleError(f"{where} must be a JSON object with bundle_version, folds and files; found a "
                          f"{type(m).__name__}")
    version = m.get("bundle_version")
    if type(version) is not int:  # not True, not 1.0, not "1"
        raise BundleError(f"{where}: bundle_version must be an integer, found {_show(version)}")
    if version not in BUNDLE_VERSIONS:
        raise BundleError(f"{bundle}: bundle version {version!r} is unknown; this segplan reads versions "
                          f"{' and '.join(map(str, BUNDLE_VERSIONS))}")
    if version == BUNDLE_VERSION:
        parts = {"": _check_folds(where, m.get("folds"), "folds")}
    else:
        parts = _check_models(where, m)
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: files must map each file name to its SHA-256, found {_show(files)}")
    for name, digest in files.items():
        if name.endswith("/"):
            raise BundleError(f"{where}: files lists {_show(name)}, a folder; only files can be listed")
        if not SAFE_NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")) or name == MANIFEST:
            raise BundleError(f"{where}: files lists an unsafe name {_show(name)} (a relative path of letters, "
                              "digits, '_', '-' and '.' is expected)")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise BundleError(f"{where}: the SHA-256 of {name} must be 64 lowercase hex digits, found {_show(digest)}")
        parent = next((p for p in _parents(name) if p in files), None)
        if parent is not None:
            raise BundleError(f"{where}: files lists both {parent} and {name}, which would be inside it")
    for prefix, folds in parts.items():
        for k in folds:
            for part in ("plan.yaml", "model.weights.h5"):
                if f"{prefix}folds/{k}/{part}" not in files:
                    whose = f"model {prefix.split('/')[1]}'s " if prefix else ""
                    raise BundleError(f"{bundle}: {whose}fold {k} has no {part} ({prefix}folds/{k}/{part} is not in "
                                      "the manifest's files)")


def _check_folds(where: str, folds, key: str) -> list[int]:
    if not isinstance(folds, list) or not folds or any(type(k) is not int or k < 0 for k in folds):
        raise BundleError(f"{where}: {key} must be a non-empty list of fold numbers (0, 1, ...), found {_show(folds)}")
    repeated = sorted({k for k in folds if folds.count(k) > 1})
    if repeated:
        raise BundleError(f"{where}: {key} {folds} list fold {', '.join(map(str, repeated))} more than once "
                          "(its model would count several times in the average)")
    return folds


def _check_models(where: str, m: dict) -> dict[str, list[int]]:
    """An ensemble bundle's ``models`` and ``ensemble`` (module docstring); each model's folds by its prefix."""
    models = m.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(x, dict) for x in models):
        raise BundleError(f"{where}: models must be a non-empty list of {{name, folds, previous}}, found "
                          f"{_show(models)}")
    names: list[str] = []
    for i, model in enumerate(models):
        name = model.get("name")
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or "/" in name or name in (".", ".."):
            raise BundleError(f"{where}: models[{i}].name must be a plain name (letters, digits, '_', '-', '.'), "
                              f"found {_show(name)}")
        if name in names:
            raise BundleError(f"{where}: models lists {name} twice")
        names.append(name)
        _check_folds(where, model.get("folds"), f"models[{i}].folds")
        unknown = set(model) - {"name", "folds", "previous"}
        if unknown:
            raise BundleError(f"{where}: models[{i}] has unknown keys {sorted(unknown)}")
    previous = {x["name"]: x.get("previous") for x in models}
    for name, prev in previous.items():
        if prev is not None and (prev not in previous or prev == name):
            raise BundleError(f"{where}: model {name}'s previous must be another model's name or null, found "
                              f"{_show(prev)}")
        seen, at = {name}, prev
        while at is not None:
            if at in seen:
                raise BundleError(f"{where}: model {name}'s previous stages loop back to {at}")
            seen.add(at)
            at = previous[at]
    ensemble = m.get("ensemble")
    if (not isinstance(ensemble, list) or not ensemble or any(not isinstance(e, str) or e not in previous
                                                               for e in ensemble)
            or len(set(ensemble)) != len(ensemble)):
        raise BundleError(f"{where}: ensemble must be a non-empty list of distinct model names ({', '.join(names)}), "
                          f"found {_show(ensemble)}")
    used, todo = set(), list(ensemble)
    while todo:
        at = todo.pop()
        used.add(at)
        todo += [previous[at]] if previous[at] is not None else []
    if set(names) - used:
        raise BundleError(f"{where}: models lists {', '.join(sorted(set(names) - used))}, which neither the ensemble "
                          "nor a previous stage of it uses")
    return {f"models/{x['name']}/": x["folds"] for x in models}


def _show(value) -> str:
    """A found value for an error message: its repr, shortened (a manifest may hold anything)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 40, 40, 8, 4, 3
    return r.repr(value)


def _parents(name: str) -> Iterator[str]:
    parts = name.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts)))


def _member(bundle: Path, z: zipfile.ZipFile, name: str, limit_mb: float, missing: str) -> zipfile.ZipInfo:
    """The zip entry of ``name``, refused by name unless it is there once, a file, unencrypted, stored
    or deflated, and declares at most ``limit_mb`` MB (zipfile never inflates past the declared size)."""
    entries = [i for i in z.infolist() if i.filename == name]
    if not entries:
        raise BundleError(f"{bundle}: {name} {missing}" if name != MANIFEST else f"{bundle}: no {MANIFEST}: {missing}")
    if len(entries) > 1:
        raise BundleError(f"{bundle}: {name} is in the zip {len(entries)} times; a bundle holds each file once")
    info = entries[0]
    if info.is_dir():
        raise BundleError(f"{bundle}: {name} is a folder entry, not a file")
    if info.flag_bits & 0x1:
        raise BundleError(f"{bundle}: {name} is encrypted; segplan reads only unencrypted bundles")
    if info.compress_type not in COMPRESSIONS:
        raise BundleError(f"{bundle}: {name} uses zip compression method {info.compress_type}; segplan reads "
                          f"{' and '.join(COMPRESSIONS.values())} members (re-export the bundle, or re-zip it "
                          "with those)")
    if info.file_size > limit_mb * 1e6:
        hint = ("" if name == MANIFEST else "; if you trust where the bundle comes from, raise the limit with "
                "--max-member-mb")
        raise BundleError(f"{bundle}: {name} unpacks to {info.file_size / 1e6:.1f} MB, over the limit of "
                          f"{limit_mb:g} MB per file{hint}")
    return info


def _blocks(bundle: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's bytes in chunks; zipfile stops at the declared size and checks the CRC. A damaged
    member is refused by name (errors of whoever consumes the chunks, such as a full disk, are not
    caught here)."""
    try:
        with z.open(info) as f:
            while block := f.read(CHUNK):
                yield block
    except READ_ERRORS as e:
        raise BundleError(f"{bundle}: {info.filename} cannot be read ({' '.join(str(e).split())})") from e


def _hash(bundle: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, out=None) -> str:
    """SHA-256 of the member, streamed; also written to ``out`` (an open file) if given."""
    h = hashlib.sha256()
    for block in _blocks(bundle, z, info):
        h.update(block)
        if out is not None:
            out.write(block)
    return h.hexdigest()


def _check_digest(bundle: Path, name: str, found: str, expected: str, what: str) -> None:
    if found != expected:
        raise BundleError(f"{bundle}: {name} {what} (SHA-256 differs from the manifest)")
