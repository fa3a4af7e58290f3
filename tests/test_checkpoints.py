"""Checkpoints (docs/checkpoints.md): every format round-trips exactly, converted models compute the same function, timm and
transformers load what we export, and bad files fail with one clear error each."""

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from conftest import randomize_grn, rel_err, trained_fcmae
from convnextv2 import SparseEncoder
from convnextv2.checkpoint import (
    SIZES, CheckpointError, infer_arch, load_encoder_weights, load_file, minkowski_conv_to_timm, minkowski_dw_to_timm,
    read_encoder, save_state_dict, save_torch, timm_conv_to_minkowski, timm_dw_to_minkowski, timm_shapes, timm_to_hf,
    timm_to_minkowski, timm_to_reference,
)
from fcmae import FCMAE
from fcmae.cli import main
from fcmae.convert import fcmae_checkpoint


def known_model(name="convnextv2_atto", num_classes=10) -> ConvNeXt:
    """A timm model whose every parameter is random (LN weights != 1, GRN != 0), so no mapping error can hide."""
    model = timm.create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return randomize_grn(model).eval()


# --- layouts, written out from docs/checkpoints.md with loops (the oracle) ---------------------------------------------------

def spec_dw_kernel(w):  # kernel[a + k*b, c] == W[c, 0, a, b]
    c, _, k, _ = w.shape
    out = torch.empty(k * k, c)
    for a in range(k):
        for b in range(k):
            out[a + k * b] = w[:, 0, a, b]
    return out


def spec_conv_kernel(w):  # kernel[a + k*b, i, o] == W[o, i, a, b]
    co, ci, k, _ = w.shape
    out = torch.empty(k * k, ci, co)
    for a in range(k):
        for b in range(k):
            out[a + k * b] = w[:, :, a, b].t()
    return out


def test_minkowski_kernel_layout():
    w_dw, w_conv = torch.randn(5, 1, 7, 7), torch.randn(6, 3, 2, 2)
    assert torch.equal(timm_dw_to_minkowski(w_dw), spec_dw_kernel(w_dw))
    assert torch.equal(timm_conv_to_minkowski(w_conv), spec_conv_kernel(w_conv))
    assert torch.equal(minkowski_dw_to_timm(spec_dw_kernel(w_dw)), w_dw)
    assert torch.equal(minkowski_conv_to_timm(spec_conv_kernel(w_conv)), w_conv)
    # The reference repo's own sparse -> dense remap (main_finetune) reads our kernels back to the same weights.
    k = spec_conv_kernel(w_conv)
    assert torch.equal(k.permute(2, 1, 0).reshape(6, 3, 2, 2).transpose(3, 2), w_conv)
    assert torch.equal(spec_dw_kernel(w_dw).permute(1, 0).reshape(5, 1, 7, 7).transpose(3, 2), w_dw)


def test_size_table_matches_timm():
    for name, (depths, dims, conv_mlp) in SIZES.items():
        with torch.device("meta"):
            sd = timm.create_model(name, num_classes=0).state_dict()
        arch = infer_arch(sd)
        assert (arch.name, arch.depths, arch.dims, arch.in_chans, arch.stem_stride, arch.patch_size) == (
            name, depths, dims, 3, 4, 32)
        assert (sd["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4) == conv_mlp


# --- every format: build it by the documented rules, read it back --------------------------------------------------

def build_format(fmt: str, model: ConvNeXt):
    """The checkpoint object a user would bring, in format `fmt`, holding `model`'s weights."""
    sd = model.state_dict()
    ref = timm_to_reference(sd)
    if fmt == "timm":
        return sd
    if fmt == "reference":  # a reference fine-tune checkpoint
        return {"model": ref, "epoch": 99}
    if fmt == "pt_only":  # released FCMAE encoder weights: `encoder.` prefix, no final norm / head, no decoder
        return {"model": {f"encoder.{k}": v for k, v in ref.items() if not k.startswith(("norm.", "head."))}}
    if fmt == "minkowski":  # the reference FCMAE model: sparse encoder + dense decoder, built with the loops above
        enc = {}
        for k, v in ref.items():
            if k.startswith(("norm.", "head.")):
                continue
            if k.startswith("downsample_layers.0."):
                enc[k] = v
            elif ".dwconv.weight" in k:
                enc[k.replace("weight", "kernel")] = spec_dw_kernel(v)
            elif k.endswith(".1.weight"):
                enc[k.replace("weight", "kernel")] = spec_conv_kernel(v)
            elif ".dwconv.bias" in k or k.endswith(".1.bias"):
                enc[k] = v.reshape(1, -1)
            elif k.startswith("downsample_layers."):
                enc[k.replace(".0.", ".0.ln.")] = v
            elif ".norm." in k:
                enc[k.replace(".norm.", ".norm.ln.")] = v
            elif ".pwconv" in k:
                enc[k.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias")] = v
            else:
                assert ".grn." in k
                enc[k] = v.reshape(1, -1)
        decoder = {"proj.weight": torch.randn(8, 320, 1, 1), "mask_token": torch.zeros(1, 8, 1, 1),
                   "decoder.0.dwconv.weight": torch.randn(8, 1, 7, 7), "pred.weight": torch.randn(3072, 8, 1, 1)}
        return {"model": {**{f"encoder.{k}": v for k, v in enc.items()}, **decoder}}
    if fmt == "hf":
        return timm_to_hf(sd)
    if fmt == "fcmae":
        fcmae = FCMAE("convnextv2_atto", decoder_dim=32)
        fcmae.encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.fc")})
        return fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto", "decoder_dim": 32})
    raise AssertionError(fmt)


HAS_HEAD = {"timm", "reference", "hf"}


def test_reference_layout_is_what_timm_reads():
    """timm's own FB-checkpoint filter turns our reference-layout dict back into the timm weights."""
    model = known_model()
    back = checkpoint_filter_fn(timm_to_reference(model.state_dict()), model)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


# Training checkpoints (dicts with a 'model' entry) are torch files; plain state_dicts come as both.
@pytest.mark.parametrize("fmt,suffix", [
    ("timm", ".pth"), ("timm", ".safetensors"), ("reference", ".pth"), ("pt_only", ".pth"), ("minkowski", ".pth"),
    ("hf", ".pth"), ("hf", ".safetensors"), ("fcmae", ".pt"),
])
def test_format_round_trip(fmt, suffix, tmp_path):
    model = known_model()
    obj = build_format(fmt, model)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_state_dict(obj, path)
    else:
        torch.save(obj, path)
    weights = read_encoder(path)
    assert weights.format == ("reference" if fmt == "pt_only" else fmt)
    assert weights.arch.name == "convnextv2_atto"
    fresh = timm.create_model("convnextv2_atto", num_classes=10).eval()
    info = load_encoder_weights(fresh, path)
    expect_fresh = set() if fmt in HAS_HEAD else {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    assert set(info.fresh) == expect_fresh
    orig, new = model.state_dict(), fresh.state_dict()
    for k in orig:
        if k not in expect_fresh:
            assert torch.equal(new[k], orig[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fresh.forward_features(x), model.forward_features(x)) <= 1e-5
        if fmt in HAS_HEAD:
            assert rel_err(fresh(x), model(x)) <= 1e-5
        else:  # fresh head: the fine-tune init (scale 0.001) and the LN at identity
            assert 1.5e-5 < fresh.head.fc.weight.std().item() < 2.5e-5 and fresh.head.fc.bias.abs().max() == 0
            assert torch.equal(fresh.head.norm.weight, torch.ones(320))
    if fmt == "minkowski":  # our writer produces exactly what the loops above built
        mk, dropped = timm_to_minkowski(model.state_dict())
        enc = {k[len("encoder."):]: v for k, v in obj["model"].items() if k.startswith("encoder.")}
        assert mk.keys() == enc.keys() and all(torch.equal(mk[k], enc[k]) for k in mk)
        assert set(dropped) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_timm_loads_exported_file_offline(tmp_path, no_network, capsys):
    model = known_model(num_classes=0)
    src = tmp_path / "fcmae_pt.pth"
    torch.save(build_format("minkowski", model), src)
    dst = tmp_path / "atto.safetensors"
    assert main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "minkowski" in out and "convnextv2_atto" in out and "inferred from tensor shapes" in out
    assert "fresh: head.fc, head.norm" in out
    x = torch.randn(2, 3, 64, 64)
    # num_classes == the file's (1000): timm loads the file strictly, our head included.
    clf = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)),
                            num_classes=1000).eval()
    assert torch.equal(clf.head.fc.weight, load_file(dst)["head.fc.weight"])
    assert 0.5e-5 < clf.head.fc.weight.std().item() < 4e-5  # trunc_normal(.02) * 0.001
    with torch.no_grad():
        assert rel_err(clf.forward_features(x), model.forward_features(x)) <= 1e-5
    # Another class count: the CLI writes K classes; saying K in the overlay keeps that head.
    dst2 = tmp_path / "atto7.pth"
    assert main(["convert", str(src), str(dst2), "--num-classes", "7", "--model", "convnextv2_atto"]) == 0
    clf7 = timm.create_model("convnextv2_atto", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(dst2), num_classes=7), num_classes=7)
    assert torch.equal(clf7.head.fc.weight, load_file(dst2)["head.fc.weight"])
    assert torch.equal(clf7.stem[0].weight, model.stem[0].weight)


def test_sparse_pretrained_to_dense(tmp_path, no_network):
    """A few FCMAE steps, then the converted classifier's forward_features == the sparse encoder, all visible."""
    fcmae = trained_fcmae()
    ckpt = tmp_path / "last.pt"
    save_torch(fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto", "decoder_dim": 32}), ckpt)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        sparse = SparseEncoder(fcmae.encoder)(x, torch.zeros(2, 3, 2))
    dst = tmp_path / "clf.safetensors"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    clf = timm.create_model("convnextv2_atto", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst))).eval()
    with torch.no_grad():
        assert rel_err(clf.forward_features(x), sparse) <= 1e-5
    # Fine-tuning starts from the same file through the Python API, and is told what is fresh.
    ft = timm.create_model("convnextv2_atto", num_classes=5, drop_path_rate=0.1)
    info = load_encoder_weights(ft, ckpt)
    assert info.format == "fcmae" and set(info.fresh) == {"head.norm.weight", "head.norm.bias", "head.fc.weight",
                                                           "head.fc.bias"}
    assert "fresh: head.fc, head.norm" in info.summary()
    ft.eval()
    with torch.no_grad():
        assert rel_err(ft.forward_features(x), sparse) <= 1e-5


def test_convert_to_fcmae_continues_pretraining(tmp_path):
    model = known_model()
    src = tmp_path / "ref.pth"
    torch.save(build_format("reference", model), src)
    dst = tmp_path / "fcmae.pt"
    assert main(["convert", str(src), str(dst), "--to", "fcmae", "--decoder-dim", "64"]) == 0
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "fcmae" and ckpt["version"] == 1
    fcmae = FCMAE(**ckpt["model_args"])
    fcmae.load_state_dict(ckpt["model"], strict=True)
    assert ckpt["model_args"]["decoder_dim"] == 64 and ckpt["model_args"]["encoder_name"] == "convnextv2_atto"
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(fcmae.encoder.state_dict()[k], v), k
    loss, _, _ = fcmae(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(loss)


# --- Hugging Face transformers -------------------------------------------------------------------------------------

def test_hf_export_matches_timm(tmp_path, no_network):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")
    torch.manual_seed(0)
    depths, dims = (1, 1, 2, 1), (8, 16, 32, 64)
    for conv_mlp in (True, False):  # both timm MLP layouts (1x1 conv for atto..nano, Linear for tiny+)
        model = ConvNeXt(depths=depths, dims=dims, use_grn=True, ls_init_value=None, conv_mlp=conv_mlp, num_classes=5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        randomize_grn(model).eval()
        cfg = transformers.ConvNextV2Config(depths=list(depths), hidden_sizes=list(dims), layer_norm_eps=1e-6,
                                            num_labels=5)
        base = transformers.ConvNextV2Model(cfg).eval()
        base.load_state_dict(timm_to_hf(model.state_dict(), base_model=True), strict=True)
        clf = transformers.ConvNextV2ForImageClassification(cfg).eval()
        clf.load_state_dict(timm_to_hf(model.state_dict()), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            pooled = base(pixel_values=x).pooler_output
            assert rel_err(pooled, model.forward_head(model.forward_features(x), pre_logits=True)) <= 1e-4
            assert rel_err(clf(pixel_values=x).logits, model(x)) <= 1e-4
        back = load_encoder_weights(ConvNeXt(depths=depths, dims=dims, use_grn=True, ls_init_value=None,
                                             conv_mlp=conv_mlp, num_classes=5), timm_to_hf(model.state_dict()))
        assert back.fresh == []
    # The CLI's folder output loads with from_pretrained, offline.
    atto = known_model(num_classes=0)
    src = tmp_path / "atto.safetensors"
    save_state_dict(atto.state_dict(), src)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--num-classes", "0"]) == 0
    hf = transformers.ConvNextV2Model.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(hf(pixel_values=x).pooler_output,
                       atto.forward_head(atto.forward_features(x), pre_logits=True)) <= 1e-4


# --- bad inputs ------------------------------------------------------------------------------------------------------

def test_bad_files(tmp_path):
    model = known_model()
    good_pt, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save({"model": model.state_dict()}, good_pt)
    save_state_dict(model.state_dict(), good_st)
    for good in (good_pt, good_st):
        data = good.read_bytes()
        trunc = tmp_path / f"trunc{good.suffix}"
        trunc.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_encoder(trunc)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        read_encoder(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_encoder(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_encoder(tmp_path / "missing.pt")
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), resnet)
    with pytest.raises(CheckpointError, match="not a ConvNeXt V2 checkpoint.*conv1"):
        read_encoder(resnet)
    custom = tmp_path / "custom.pth"
    torch.save({"model": model.state_dict(), "loss_fn": torch.nn.CrossEntropyLoss()}, custom)
    with pytest.raises(CheckpointError, match=r"pickled Python object \(torch.nn.*CrossEntropyLoss\) that needs code"):
        read_encoder(custom)
    v1 = {k: v for k, v in model.state_dict().items() if ".grn." not in k}
    with pytest.raises(CheckpointError, match="ConvNeXt V1"):
        read_encoder(v1)


def test_size_mismatch_names_size_and_keys(tmp_path, capsys):
    path = tmp_path / "atto.pth"
    torch.save(known_model().state_dict(), path)
    femto = timm.create_model("convnextv2_femto", num_classes=10)
    with pytest.raises(ValueError, match=r"holds convnextv2_atto .*target is convnextv2_femto.*stem\.0\.weight \(40, 3, 4, 4\) vs \(48, 3, 4, 4\)"):
        load_encoder_weights(femto, path)
    assert main(["convert", str(path), str(tmp_path / "x.safetensors"), "--model", "convnextv2_tiny"]) == 2
    err = capsys.readouterr().err
    assert "holds convnextv2_atto" in err and "stem.0.weight" in err and "--model convnextv2_atto" in err
    assert main(["convert", str(path), str(tmp_path / "x.txt")]) == 2
    assert "name it *.safetensors" in capsys.readouterr().err


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    save_state_dict({"a": torch.ones(2)}, path)

    def broken_save(obj, f, *args, **kwargs):  # f: the temp file, open
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match=f"cannot write {path}: OSError: disk full"):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temp file left behind
    assert torch.equal(load_file(path)["a"], torch.ones(2))  # the old file is intact


def test_shapes_helper_matches_real_model():
    shapes = timm_shapes("convnextv2_atto", 7, in_chans=1)
    real = timm.create_model("convnextv2_atto", num_classes=7, in_chans=1).state_dict()
    assert {k: tuple(v) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in real.items()}
