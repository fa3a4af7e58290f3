"""The FCMAE side of checkpoint conversion (it needs `fcmae.FCMAE`): an FCMAE checkpoint with a fresh decoder from
any ConvNeXt V2 encoder (to continue pretraining from released weights).

The reading, detection and format rules live in `convnextv2.checkpoint`; the `fcmae convert SRC DST` command, which
also writes timm and Hugging Face files, is fcmae.commands.convert.
"""
from __future__ import annotations

from typing import Any

from convnextv2.checkpoint import EncoderWeights, load_encoder_weights
from convnextv2.checkpoint.convert import require_name
from fcmae.model import FCMAE

FCMAE_VERSION = 1


def fcmae_checkpoint(model: FCMAE, model_args: dict[str, Any]) -> dict[str, Any]:
    """The FCMAE checkpoint dict of docs/checkpoints.md without training state (loadable with weights_only=True)."""
    return {"format": "fcmae", "version": FCMAE_VERSION, "model": model.state_dict(), "model_args": dict(model_args)}


def fcmae_from_encoder(weights: EncoderWeights, decoder_dim: int = 512, decoder_depth: int = 1,
                       mask_ratio: float = 0.6, norm_pix_loss: bool = True) -> tuple[FCMAE, dict[str, Any]]:
    """An FCMAE whose encoder holds `weights` and whose decoder is fresh -> (model, model_args)."""
    arch = weights.arch
    model_args: dict[str, Any] = {
        "encoder_name": require_name(arch), "in_chans": arch.in_chans, "mask_ratio": mask_ratio,
        "decoder_dim": decoder_dim, "decoder_depth": decoder_depth, "norm_pix_loss": norm_pix_loss,
        "patch_size": arch.patch_size,  # total stride = mask patch, read off the stem kernel (stride 2 -> 16)
    }
    model = FCMAE(**model_args)
    load_encoder_weights(model.encoder, weights)
    return model, model_args
