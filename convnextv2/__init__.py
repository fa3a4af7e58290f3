"""ConvNeXt V2 models: timm's dense network, run densely or sparsely on visible patches."""
from convnextv2.encoder import MODEL_NAMES, PATCH_SIZES, create_convnextv2, create_encoder, encoder_patch_size
from convnextv2.sparse import SparseEncoder, sparse_forward
from convnextv2.backends import BACKENDS, register_backend
from convnextv2.backends.packed import visible_patches

__all__ = [
    "MODEL_NAMES", "PATCH_SIZES", "create_convnextv2", "create_encoder", "encoder_patch_size", "SparseEncoder", "sparse_forward", "BACKENDS", "register_backend",
    "visible_patches",
]
