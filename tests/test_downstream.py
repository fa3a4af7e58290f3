"""The pretrained encoder as a backbone in real detection / segmentation clients, on CPU: segmentation_models_pytorch's
Unet (`tu-<timm name>`) and torchvision's FasterRCNN over a feature pyramid, with our weights loaded by name. Their
feature maps equal our encoder's stage outputs exactly, and a training step runs. README's "Detection and
segmentation" lines are the ones run here (read from README), as is mmdetection's config (replayed through the call
mmpretrain's TIMMBackbone makes; mmdetection itself is not installed)."""
from __future__ import annotations

import math
import shlex

import pytest
import timm
import torch

from conftest import randomize_grn
from convnextv2 import create_encoder
from convnextv2.checkpoint import load_encoder_weights
from fcmae.cli import main
from readme import code_block
from test_timm_names import stage_outputs

SECTION = "## Detection and segmentation (the encoder as a timm backbone)"


def smp_module():
    return pytest.importorskip("segmentation_models_pytorch", reason="pip install '.[dev]' (a dev extra)")


def random_backbone(tmp_path, in_chans: int, patch: int):
    """An atto encoder with every parameter random, exported with `fcmae convert --to backbone` -> (encoder, file)."""
    enc = create_encoder("convnextv2_atto", in_chans=in_chans, patch_size=patch)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src, dst = tmp_path / "enc.pt", tmp_path / "backbone.safetensors"
    torch.save(randomize_grn(enc).state_dict(), src)
    assert main(["convert", str(src), str(dst), "--to", "backbone"]) == 0
    return enc.eval(), str(dst)


def unet_training_step(unet, x: torch.Tensor, classes: int) -> None:
    """One AdamW step on a random segmentation target: finite loss, and the encoder's weights move."""
    stem = unet.encoder.model.stem_0.weight.detach().clone()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    target = torch.randint(0, classes, (x.shape[0], *x.shape[2:]))
    loss = torch.nn.functional.cross_entropy(unet.train()(x), target)
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and not torch.equal(unet.encoder.model.stem_0.weight, stem)


def detection_training_step(detector, in_chans: int) -> dict[str, float]:
    """One SGD step of a torchvision detector on two synthetic images with boxes -> its (finite) losses."""
    images = [torch.rand(in_chans, 96, 128), torch.rand(in_chans, 128, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 30.0, 90.0, 80.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 40.0, 70.0, 100.0]]), "labels": torch.tensor([1])}]
    opt = torch.optim.SGD(detector.parameters(), lr=1e-3)
    losses = detector.train()(images, targets)
    sum(losses.values()).backward()
    opt.step()
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    return {k: v.item() for k, v in losses.items()}


@pytest.mark.parametrize("patch, in_chans, depth, decoder",
                         [(32, 3, 5, (64, 32, 16, 16, 8)), (16, 1, 4, (64, 32, 16, 8))])
def test_smp_unet_encoder_is_ours(patch, in_chans, depth, decoder, tmp_path):
    """smp.Unet("tu-<name>") with our weights (encoder_weights=True + the overlay): its encoder's maps are our stage
    outputs, bit for bit (at 32 smp adds an empty stride-2 map), and a training step runs."""
    smp = smp_module()
    enc, path = random_backbone(tmp_path, in_chans, patch)
    name = "convnextv2_atto" if patch == 32 else "convnextv2_atto_s16"
    unet = smp.Unet(f"tu-{name}", encoder_weights=True, encoder_depth=depth, decoder_channels=decoder,
                    in_channels=in_chans, classes=3,
                    pretrained_cfg_overlay=dict(file=path, input_size=(in_chans, 224, 224))).eval()
    x = torch.randn(2, in_chans, 64, 64)
    with torch.no_grad():
        maps = unet.encoder(x)
        want = stage_outputs(enc, x)
    assert torch.equal(maps[0], x) and len(maps) == depth + 1
    if patch == 32:
        assert maps[1].shape == (2, 0, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(maps[-4:], want, strict=True))
    assert unet(x).shape == (2, 3, 64, 64)
    unet_training_step(unet, x, 3)


def test_fasterrcnn_over_our_backbone_trains(tmp_path):
    """torchvision's FasterRCNN over BackboneWithFPN(timm features model with our weights): the pyramid's inputs are
    our stage outputs, and a training step on boxes gives finite losses and gradients in the encoder."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    enc, path = random_backbone(tmp_path, 3, 32)
    body = timm.create_model("convnextv2_atto", in_chans=3, features_only=True, pretrained=True,
                             pretrained_cfg_overlay=dict(file=path))
    backbone = BackboneWithFPN(body, return_layers={f"stages_{i}": str(i) for i in range(4)},
                               in_channels_list=body.feature_info.channels(), out_channels=32)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone.body(x).values(), stage_outputs(enc, x), strict=True))
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    detector = FasterRCNN(backbone, num_classes=3, rpn_anchor_generator=anchors, min_size=96, max_size=128)
    detection_training_step(detector, 3)
    assert body.stem_0.weight.grad.abs().sum() > 0


def timm_backbone(model_name: str, features_only: bool = False, pretrained: bool = False, checkpoint_path: str = "",
                  in_channels: int = 3, init_cfg=None, **kwargs):
    """The model mmpretrain's TIMMBackbone(**cfg) wraps (mmpretrain/models/backbones/timm_backbone.py): its
    keyword arguments passed to timm.create_model, in_channels as in_chans."""
    return timm.create_model(model_name=model_name, features_only=features_only, pretrained=pretrained,
                             in_chans=in_channels, checkpoint_path=checkpoint_path, **kwargs)


def test_readme_detection_and_segmentation(in_demo_dir, capsys):
    """README's section as a user runs it after the demo's pretraining: the convert line prints what README shows, and
    each code block, run on its own, builds its model on those weights: the timm and mmdetection backbones give our
    encoder's stage outputs, smp's Unet and torchvision's FasterRCNN train a step."""
    smp_module()
    command = code_block(SECTION, "bash").strip()
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert all(line in printed for line in code_block(SECTION, "text").strip("\n").splitlines()), printed
    enc = create_encoder("convnextv2_atto", in_chans=1, patch_size=16).eval()
    load_encoder_weights(enc, "runs/demo/last.pt")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = stage_outputs(enc, x)
    assert any(b.mlp.grn.weight.abs().sum() > 0 for s in enc.stages for b in s.blocks)  # exactness can show GRN's

    timm_scope, smp_scope, tv_scope, mm_scope = ({} for _ in range(4))
    exec(code_block(SECTION, "python", 0), timm_scope)
    assert [tuple(f.shape) for f in timm_scope["features"]] == [(2, 40, 32, 32), (2, 80, 16, 16), (2, 160, 8, 8),
                                                                (2, 320, 4, 4)]  # as README's comment says
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(timm_scope["model"].eval()(x), want, strict=True))

    exec(code_block(SECTION, "python", 1), smp_scope)
    unet = smp_scope["unet"].eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(unet.encoder(x)[1:], want, strict=True))
    unet_training_step(unet, x, 2)

    exec(code_block(SECTION, "python", 2), tv_scope)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(tv_scope["backbone"].body(x).values(), want, strict=True))
    detection_training_step(tv_scope["detector"], 1)

    exec(code_block(SECTION, "python", 3), mm_scope)
    assert "convnextv2" in mm_scope["custom_imports"]["imports"]
    cfg = {k: v for k, v in mm_scope["model"]["backbone"].items() if k not in ("type", "_delete_")}
    assert mm_scope["model"]["backbone"]["type"] == "mmpretrain.TIMMBackbone"
    backbone = timm_backbone(**cfg).eval()
    assert backbone.feature_info.channels() == mm_scope["model"]["neck"]["in_channels"]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), want, strict=True))
