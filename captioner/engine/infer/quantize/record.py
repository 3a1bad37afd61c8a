"""quantization.json: how an int8 folder's graphs were made and how close they measured, as data.

    write_json(folder / "quantization.json", quantization_record(plan, calibration, source))
"""
from __future__ import annotations

import torch

from captioner.engine.infer.quantize.calibrate import METHODS, OP_TYPES
from captioner.engine.infer.quantize.rowwise import ROWWISE


def quantization_record(plan, calibration: torch.Tensor, source: str | None, shipped: bool = True) -> dict:
    """plan: encoder.EncoderPlan; calibration: the (N, 3, S, S) uint8 images; source: where they came from, in
    words without this machine's paths; shipped: the int8 encoder is the folder's (else it missed the budget and
    the folder holds the float32 encoder: "precision" says which, "feature_error" is the shipped encoder's)."""
    search = plan.search
    why = {name: (f"sensitivity: int8 alone it lowers the features' cosine to float32's by "
                  f"{plan.feature_losses[name]:.4f}, among the most" if name in plan.feature_losses else
                  f"sensitivity: its own int8 output error {plan.local_errors.get(name, 0.0):.4f} (relative L2) "
                  "is among the largest (not reached by the feature ranking in time)")
           for name in search.excluded}
    held_out = plan.held_images < len(calibration)
    return {
        "encoder": {
            "precision": "int8" if shipped else "float32",
            "kept_float32_because": None if shipped else (
                f"its int8 version reached cosine {plan.error['cosine_mean']:.4f} of float32's features, under the "
                f"budget {plan.budget:g} ({search.why_stopped})"),
            "method": "static", "format": "QDQ", "op_types": list(OP_TYPES), "per_channel": True,
            "weight_type": "int8", "activation_type": "uint8", "reduce_range": True,
            "transforms": plan.transforms,
            "weight_rounding": plan.rounding,
            "linear_layers": plan.linear,
            "calibration_method": plan.method,
            "calibration_candidates": plan.method_errors,
            "calibration_chosen_by": "the highest mean cosine similarity of int8 to float32 features on the "
                                     "held-out calibration images",
            "percentile": METHODS[plan.method][1],
            "excluded_nodes": list(why), "excluded_why": why,
            "sensitivity": {
                "ranked_by": "feature loss: 1 - mean cosine similarity of the features to float32's with only "
                             "the node int8 (its input quantize-dequantized, its weights int8), on calibration "
                             "images; nodes not reached in time after, by local error",
                "nodes_ranked_by_feature_loss": plan.nodes_measured,
                "excluded_feature_losses": plan.feature_losses,
                "node_error": "relative L2 error of the node's output with int8 input and weights, float input",
                "excluded_errors": plan.local_errors,
                "max_float_macs": plan.max_float_macs, "float_macs": plan.float_macs,
                "convolutions": plan.convs,
                "budget_met": search.met, "stopped": search.why_stopped, "tries": search.rounds,
                "seconds": plan.seconds},
        },
        "decoder": {"method": "dynamic", "op_types": ["MatMul", "Gemm"], "per_channel": True,
                    "weight_type": "int8", "reduce_range": True, "activations": ROWWISE,
                    "graphs": ["decoder_init", "decoder_step"]},
        "calibration": {"count": len(calibration), "source": source, "image_size": list(calibration.shape[2:]),
                        "fit_images": plan.fit_images, "held_out_images": plan.held_images,
                        "methods_tried": list(METHODS)},
        "budget": {"metric": "cosine_mean", "min": plan.budget,
                   "what": "mean over held-out calibration images of the cosine similarity of the int8 encoder's "
                           "features to float32's (each image's features flattened)"},
        "feature_error": {**plan.error, "budget_met": plan.error["cosine_mean"] >= plan.budget,
                          "measured_on": "held-out calibration images (not used to calibrate)" if held_out else
                                         "the calibration image itself (one image: nothing to hold out)"}
        if shipped else {"images": plan.error["images"], "cosine_mean": 1.0, "cosine_min": 1.0, "relative_error": 0.0,
                         "budget_met": True, "measured_on": "none needed: the float32 encoder graph itself",
                         "int8_tried": plan.error},
    }
