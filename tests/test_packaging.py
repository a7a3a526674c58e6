"""One import package (issue 39): the wheel built from a clean tree installs segplan and nothing
else at the top of site-packages, beside Hugging Face's `datasets` (which a bare top-level
`datasets` package of ours once replaced, and then deleted on uninstall)."""
from __future__ import annotations

import configparser
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "runner", "datasets")   # the repository's folders, installed as segplan.<folder>


def _clean_tree(dest: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored): no build folders, no egg-info,
    no virtual environment, as on a fresh clone."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = _clean_tree(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(src)], check=True, capture_output=True)
    (built,) = (root / "dist").glob("segplan-*.whl")
    return built


def test_the_wheel_holds_one_package_segplan_with_every_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = {n.split("/")[0] for n in names} - {info}
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
    assert top_level == {"segplan"}, f"the wheel puts {sorted(top_level)} at the top of site-packages"
    modules = {f"segplan/{p.relative_to(ROOT)}" for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert modules and modules | {"segplan/__init__.py"} <= names, sorted(modules - names)
    assert not [n for n in names if n.startswith(("segplan/tests/", "segplan/benchmarks/"))]
    assert entry_points["console_scripts"]["segplan"] == "segplan.runner.cli:main"


def test_segplan_beside_hugging_face_datasets_and_uninstalled_without_harm(wheel, tmp_path):
    """A fresh environment holding Hugging Face's `datasets` (copied file by file from this one's
    installation, dist-info included, so pip knows it), then segplan's wheel: both import from
    outside the repository (inside it, the datasets/ folder would shadow any package of that name);
    uninstalling segplan leaves `datasets` whole. Their dependencies come from this environment
    through a .pth file (which does not bring this environment's editable segplan along)."""
    hf = importlib.metadata.distribution("datasets")   # the test extra installs it
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for f in hf.files:
        if ".." not in f.parts:   # console scripts and data outside site-packages are not needed
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hf.locate_file(f), site / f)
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")

    def pip(*args):
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "-q"], check=True,
                       capture_output=True)

    def where(code: str) -> list[str]:
        r = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    pip("install", "--no-deps", "--no-index", str(wheel))
    seg, ds = where("import segplan.datasets.phantoms as p, datasets; from datasets import load_dataset\n"
                    "print(p.__file__, datasets.__file__)")
    assert Path(seg).is_relative_to(site) and Path(ds) == site / "datasets" / "__init__.py"
    pip("uninstall", "-y", "segplan")
    assert not (site / "segplan").exists() and (site / "datasets" / "__init__.py").is_file()
    (ds,) = where("import datasets; from datasets import load_dataset; print(datasets.__file__)")
    assert Path(ds) == site / "datasets" / "__init__.py"
