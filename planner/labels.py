"""One model of a plan's labels, built from its dataset section once, for every consumer: what the
network outputs, how outputs become a label map, which voxels of a reference are scored, and what
each class or region is called (nnU-Net's LabelManager). Plain numpy: the planner, training,
inference, evaluation, postprocessing, selection and the exports all take a ``LabelModel`` instead
of loose ``regions`` / ``ignore_label`` arguments, so that no consumer can forget one of them.

Two kinds of plan:

- **labels** (the default): one softmax channel per label, in the order of ``dataset.labels``
  (background first); the label map is the arg-max class's label value.
- **regions** (``dataset.regions``, nnU-Net's region-based training): one sigmoid per region; a
  voxel is in a region when its label value is one of the region's. Back to one label map as
  nnU-Net's ``convert_probabilities_to_segmentation``: start from background, then for each region
  in order write its ``regions_class_order`` value where its probability exceeds 0.5, later regions
  overwriting earlier ones. Such a plan is scored and postprocessed per region.

The ignore label (``dataset.ignore_label``) is no class and no output: the preprocessed label maps
carry it as class index K (one past the labels), it is in no region, its voxels are left out of the
loss and of every score, and it is never written into a prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

THRESHOLD = 0.5   # a region is predicted where its sigmoid probability exceeds this (nnU-Net)


@dataclass(frozen=True)
class LabelModel:
    labels: dict[str, int]                                         # name -> value, background first
    regions: dict[str, list[int]] = field(default_factory=dict)    # {}: a plan of labels
    order: list[int] = field(default_factory=list)                 # regions_class_order
    ignore_label: int | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)     # evaluation's label groups

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def has_ignore(self) -> bool:
        return self.ignore_label is not None

    @property
    def n_classes(self) -> int:
        """Labels, background included (the class indices of the preprocessed label maps)."""
        return len(self.labels)

    @property
    def ignore_index(self) -> int | None:
        """The class index of the ignore label in preprocessed label maps: K; None without one."""
        return len(self.labels) if self.has_ignore else None

    @property
    def outputs(self) -> list[str]:
        """The network's output channels by name, in order: regions, or labels (background first)."""
        return list(self.regions) if self.has_regions else list(self.labels)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    @property
    def activation(self) -> str:
        """The network's last activation: one sigmoid per region (regions may overlap) or a softmax."""
        return "sigmoid" if self.has_regions else "softmax"

    @property
    def structures(self) -> dict[str, list[int]]:
        """What is scored and postprocessed, name -> label values: each region of a region plan, else
        each foreground label on its own."""
        if self.has_regions:
            return {name: list(values) for name, values in self.regions.items()}
        return {name: [value] for name, value in self.labels.items() if value != 0}

    @property
    def predicted_labels(self) -> dict[str, int]:
        """The foreground labels a prediction can hold, name -> value: every foreground label, or for a
        region plan those that ``regions_class_order`` writes."""
        return {n: v for n, v in self.labels.items() if v != 0 and (not self.has_regions or v in self.order)}

    def label_dtype(self):
        """The smallest unsigned integer type that holds every label value a prediction may hold."""
        return np.uint8 if max(self.labels.values()) < 256 else np.uint16

    def to_label_map(self, probabilities: np.ndarray) -> np.ndarray:
        """(outputs, ...) probabilities -> the label map: regions thresholded and written in order, or
        the arg-max class's label value."""
        if self.has_regions:
            return regions_to_labels(probabilities, self.order, self.label_dtype())
        return self.classes_to_labels(np.argmax(probabilities, axis=0))

    def classes_to_labels(self, classes: np.ndarray) -> np.ndarray:
        """Class indices 0..K-1 -> label values (non-consecutive values such as 0..117 kept)."""
        lut = np.array(list(self.labels.values()), dtype=self.label_dtype())
        return lut[classes]

    def annotated(self, reference: np.ndarray) -> np.ndarray | None:
        """The voxels of a reference (label values) someone annotated; None: all of them."""
        return None if self.ignore_label is None else reference != self.ignore_label

    def region_table(self) -> np.ndarray:
        """(K + 1, R) float32: 1 where class index k lies in region r; the last row, class index K,
        is the ignore label's, in no region. ``table[seg]`` is the region target of a class-index map."""
        return region_table(self.labels, self.regions)

    def same_outputs(self, other: LabelModel) -> bool:
        """Whether two plans' probabilities mean the same (and so can be averaged or compared)."""
        return (self.labels, self.regions, list(self.order)) == (other.labels, other.regions, list(other.order))

    def describe(self) -> dict:
        """What a server or a reader must know, JSON-ready: the output's kind and channels, the
        labels, the regions and their order, the ignore label, and how outputs become labels."""
        rule = (f"start from 0; for each region in the order of 'channels' write its value of 'regions_class_order' "
                f"where its sigmoid exceeds {THRESHOLD}, later regions overwriting earlier ones"
                if self.has_regions else "the label value (of 'labels', in channel order) of the arg-max channel")
        return {"output": self.activation, "channels": self.outputs, "labels": dict(self.labels),
                "regions": {k: list(v) for k, v in self.regions.items()}, "regions_class_order": list(self.order),
                "ignore_label": self.ignore_label, "to_label_map": rule}

    def note(self) -> list[str]:
        """Lines for a report: how it is scored (per region, which voxels)."""
        notes = []
        if self.has_regions:
            notes.append("scored per region (dataset.regions): "
                         + "; ".join(f"{n} = labels {v}" for n, v in self.regions.items()))
        if self.has_ignore:
            notes.append(f"voxels of the ignore label {self.ignore_label} in the references are not annotated and not "
                         "scored (dataset.ignore_label)")
        return notes


def label_model(dataset) -> LabelModel:
    """The label model of a plan's ``dataset`` section (or of a plan: its ``.dataset`` is taken)."""
    ds = getattr(dataset, "dataset", dataset)
    return LabelModel(dict(ds.labels), {k: list(v) for k, v in ds.regions.items()}, list(ds.regions_class_order),
                      ds.ignore_label, {k: list(v) for k, v in ds.label_groups.items()})


def consecutive(n_classes: int) -> LabelModel:
    """A label model of ``n_classes`` softmax classes 0..n-1 and nothing else (probes and benchmarks
    that time a network, not a dataset)."""
    return LabelModel({("background" if k == 0 else f"class_{k}"): k for k in range(n_classes)})


def region_table(labels: dict[str, int], regions: dict[str, list[int]]) -> np.ndarray:
    """(K + 1, R) float32: 1 where class index k (the order of ``labels``) lies in region r; the
    last row, class index K, is the ignore label's, in no region."""
    values = list(labels.values())
    table = np.zeros((len(values) + 1, len(regions)), np.float32)
    for r, members in enumerate(regions.values()):
        for k, v in enumerate(values):
            table[k, r] = v in members
    return table


def regions_to_labels(probabilities: np.ndarray, order: list[int], dtype=np.uint8) -> np.ndarray:
    """(R, ...) region probabilities -> one label map: ``order[r]`` written where region r's
    probability exceeds 0.5, region by region, later over earlier; 0 where none does."""
    out = np.zeros(probabilities.shape[1:], dtype)
    for p, value in zip(probabilities, order):
        out[p > THRESHOLD] = value
    return out


def mask_of(label_map: np.ndarray, values: list[int]) -> np.ndarray:
    """Voxels whose label is one of ``values``."""
    return label_map == values[0] if len(values) == 1 else np.isin(label_map, values)
