"""Predict one case with nnU-Net v2's own pipeline, for benchmarks/inference_speed.py's side-by-side.

Runs with the python of an environment that has nnU-Net v2 (never imported by segplan):

    python nnunet_predict.py SPEC_JSON

SPEC: plans (nnUNetPlans.json from its planner), dataset_json, image, out (output file name without
ending), and the network to use instead of its plan's: patch, spacing, features, pools, kernels.
An untrained PlainConvUNet of that depth and width (speed does not depend on the weights) predicts
the case through nnUNetPredictor.predict_from_files (its preprocessing, sliding window with half
overlap and Gaussian weighting, no mirroring, resampling back, export) on the CPU. Prints one JSON
line: the seconds of the whole call.
"""
import json
import sys
import time

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


def main() -> None:
    spec = json.loads(sys.argv[1])
    plans = json.load(open(spec["plans"]))
    cfg = plans["configurations"]["3d_fullres"]
    n = len(spec["features"])
    cfg["patch_size"], cfg["spacing"] = spec["patch"], spec["spacing"]
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update(n_stages=n, features_per_stage=spec["features"], kernel_sizes=spec["kernels"],
                strides=[[1, 1, 1]] + spec["pools"], n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    dataset_json = json.load(open(spec["dataset_json"]))
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, heads, allow_init=True,
                                 deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetTrainer", None)
    t = time.perf_counter()
    predictor.predict_from_files([[spec["image"]]], [spec["out"]], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
