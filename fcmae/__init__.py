"""fcmae: self-supervised FCMAE pretraining of ConvNeXt V2 encoders, and fine-tuning."""
from fcmae import api
from fcmae.masking import patchify, random_mask, unpatchify
from fcmae.model import FCMAE

__all__ = ["FCMAE", "patchify", "unpatchify", "random_mask", "api"]
