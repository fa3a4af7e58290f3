"""FCMAE: sparse ConvNeXt V2 encoder + light ConvNeXt V2 decoder + norm-pix MSE on masked patches (docs/method.md)."""
from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from convnextv2 import create_encoder
from convnextv2.backends import get_backend
from convnextv2.encoder import check_patch_local, encoder_patch_size, stem_stride
from convnextv2.sparse import sparse_forward
from fcmae.masking import num_visible, patchify, random_mask


class FCMAEDecoder(nn.Module):
    """(N, C_last, h, w) encoder features + mask (N, h, w) -> (N, p*p*in_chans, h, w) pixel predictions."""

    def __init__(self, in_dim: int, patch_size: int, in_chans: int, dim: int = 512, depth: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(depth)
        ])
        self.pred = nn.Conv2d(dim, patch_size * patch_size * in_chans, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # std .02 everywhere (docs/method.md, departure 2: the reference's std 1.0 override is a defect).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        m = mask.unsqueeze(1).to(x.dtype)
        x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.blocks(x))


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder around a timm ConvNeXt V2 (`self.encoder` is the timm model).

    forward(imgs, mask=None, visible=None) -> (loss, pred, mask)
        imgs (N, in_chans, H, W), normalised, H and W multiples of the patch size p (`patch_size`: 32, 16 or 8)
        mask (N, H/p, W/p), 1 = masked; drawn as in docs/method.md when None
        visible (N, V) long, `convnextv2.visible_patches(mask)` on imgs' device, or None (the backend computes them:
            a host sync on a GPU; the training loop draws masks on the CPU and passes both)
        loss scalar: per-patch MSE (on normalised pixels if norm_pix_loss) averaged over masked patches only
        pred (N, L, p*p*in_chans), the `patchify` layout, L = (H/p)*(W/p)
    """

    def __init__(
        self,
        encoder_name: str = "convnextv2_atto",
        in_chans: int = 3,
        mask_ratio: float = 0.6,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        backend: str = "packed",
        patch_size: int = 32,
        **encoder_kwargs,
    ):
        """patch_size: the mask patch side = the encoder's total stride (32 / 16 / 8); the timm encoder is built with
        stem stride patch_size // 8 (see `convnextv2.encoder.create_convnextv2`). encoder_kwargs go to timm."""
        super().__init__()
        stem_stride(patch_size)  # a clear error for anything but 32 / 16 / 8, before building anything
        num_visible(100, mask_ratio)  # validate the ratio now, not at the first batch
        if decoder_dim < 1 or decoder_depth < 0:
            raise ValueError(f"decoder_dim must be >= 1 and decoder_depth >= 0, got {decoder_dim}, {decoder_depth}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        get_backend(backend)  # fail now on an unknown name
        self.backend = backend
        # the timm model; keys `encoder.*`
        self.encoder = create_encoder(encoder_name, in_chans, patch_size, **encoder_kwargs)
        check_patch_local(self.encoder)
        self.patch_size = encoder_patch_size(self.encoder)
        self.decoder = FCMAEDecoder(
            self.encoder.num_features, self.patch_size, in_chans, decoder_dim, decoder_depth
        )

    def random_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = imgs.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop to a multiple of {p}")
        return random_mask(n, (h // p, w // p), self.mask_ratio, device=imgs.device, generator=generator)

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, H/p, W/p) -> scalar loss over masked patches."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (N, L)
        m = mask.flatten(1).to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum()

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor | None = None, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if mask is None:
            mask, visible = self.random_mask(imgs), None
        features = sparse_forward(self.encoder, imgs, mask, self.backend, visible)
        pred = rearrange(self.decoder(features, mask), "n d h w -> n (h w) d")
        return self.loss(imgs, pred, mask), pred, mask
