"""ConvNeXt V2 checkpoints: read every format safely (docs/checkpoints.md), convert to timm / Hugging Face, load for fine-tuning.

    weights = read_encoder("convnextv2_atto_1k_224_fcmae.pt")          # auto-detects format and size
    info = load_encoder_weights(timm_model, "run/last.pt")              # info.summary(): what starts fresh
    write_timm(weights, "atto.safetensors", num_classes=10)             # loads with timm pretrained_cfg_overlay
    write_backbone(weights, "encoder", config)                          # timm's features_only / local-dir folder

Every tensor read is checked before use (convnextv2.checkpoint.validate): each key's exact shape for the size, a
floating dtype, finite values, and a header (model_args, safetensors metadata) that says what the tensors hold.
"""
from convnextv2.checkpoint.arch import SIZES, Arch, encoder_shapes, infer_arch
from convnextv2.checkpoint.convert import (
    HEAD_INIT_SCALE, EncoderWeights, LoadInfo, feature_info, fit_shapes, hf_state_dict, load_encoder_weights,
    read_encoder, timm_classifier_state_dict, timm_metadata, timm_shapes, write_backbone, write_hf, write_timm,
)
from convnextv2.checkpoint.detect import FORMATS, Source, detect
from convnextv2.checkpoint.hf import hf_config, hf_to_timm, timm_to_hf
from convnextv2.checkpoint.io import CheckpointError, atomic_write, load_file, save_state_dict, save_torch
from convnextv2.checkpoint.layout import (
    minkowski_bias_to_timm, minkowski_conv_to_timm, minkowski_dw_to_timm, timm_bias_to_minkowski,
    timm_conv_to_minkowski, timm_dw_to_minkowski,
)
from convnextv2.checkpoint.minkowski import minkowski_to_reference, minkowski_to_timm, reference_to_minkowski, timm_to_minkowski
from convnextv2.checkpoint.reference import reference_to_timm, timm_to_reference
from convnextv2.checkpoint.validate import check_state_dict, check_values, layout_fits

__all__ = [
    "SIZES", "Arch", "infer_arch", "HEAD_INIT_SCALE", "EncoderWeights", "LoadInfo", "feature_info", "fit_shapes",
    "hf_state_dict", "load_encoder_weights", "read_encoder", "timm_classifier_state_dict", "timm_metadata",
    "timm_shapes", "write_backbone", "write_hf", "write_timm",
    "FORMATS", "Source", "detect", "hf_config", "hf_to_timm", "timm_to_hf", "CheckpointError", "atomic_write",
    "load_file", "save_state_dict", "save_torch", "minkowski_bias_to_timm", "minkowski_conv_to_timm",
    "minkowski_dw_to_timm", "timm_bias_to_minkowski", "timm_conv_to_minkowski", "timm_dw_to_minkowski",
    "minkowski_to_reference", "minkowski_to_timm", "reference_to_minkowski", "timm_to_minkowski",
    "reference_to_timm", "timm_to_reference", "encoder_shapes", "check_state_dict", "check_values", "layout_fits",
]
