"""segplan: plan and run 3D medical image segmentation the way nnU-Net does, on TensorFlow/Keras.

The repository's folders install inside this package: ``segplan.planner`` (fingerprint and plan,
no TensorFlow), ``segplan.runner`` (preprocessing, training, inference, evaluation,
postprocessing and the ``segplan`` command) and ``segplan.datasets`` (phantoms and importers).

From Python, the networks loaded once for a whole cohort (docs/python-api.md)::

    from segplan import Predictor
    predictor = Predictor.from_plan("plans/covid.yaml")       # or Predictor.from_bundle("covid.zip")
    label_map = predictor.predict("ct_001.nii.gz")             # a SimpleITK.Image on the input's grid

Importing segplan starts nothing: TensorFlow is imported when a network is first built. What
importing it does do: turn TensorFlow's oneDNN CPU kernels on where TensorFlow would leave them off
and the user has not chosen (``segplan.runner.backend.prefer_onednn``), since that must happen
before TensorFlow is imported.
"""
from __future__ import annotations

from pathlib import Path

# A source checkout used without installing it (PYTHONPATH=checkout, as benchmarks/gpu_check.sh does
# on a machine where nothing is installed): the folders beside this one are segplan's subpackages.
# Installed (a wheel, or editable through setup.cfg's package_dir) they are found as usual.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "setup.cfg").is_file() and (_checkout / "runner" / "cli.py").is_file():
    __path__.append(str(_checkout))

from segplan.runner.backend import prefer_onednn  # noqa: E402  (after the path above)

prefer_onednn()

__all__ = ["Predictor"]


def __getattr__(name: str):
    """``segplan.Predictor`` imported on first use, so that ``import segplan`` stays light."""
    if name == "Predictor":
        from segplan.runner.inference.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'segplan' has no attribute {name!r}")
