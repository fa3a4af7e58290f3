"""A fuzz pass over checkpoint contents (issue 28), as tests/test_config_fuzz.py is over config keys.

Per architecture - atto at patch sizes 32 / 16 / 8 (1x1-conv MLP weights), tiny and a small custom layout (Linear
MLP weights) - every fault below is generated on an audited key (a block's mlp.fc1 weight) and on a key drawn at
random, and sent through the library's readers: `read_encoder` on every checkpoint format (what convert, knn, embed,
eval, demo and model.init read through), loading into a live timm model, the FCMAE model of model.init / visualize /
resume (encoder and decoder), a training checkpoint's model, EMA and optimizer moments. Each fault is refused with
one line that names the file and the bad key; a model it was meant for is left untouched. What must be accepted is:
the file as written, its fp16 / bf16 copies (loading as float32), the other mlp.fc layout, every other format.

Then one file per command (convert, pretrain and finetune model.init, resume, eval, knn, embed, visualize, demo)
through the CLI in a fresh process: exit 2, one line `fcmae CMD: error: ...`, nothing written; and a pickle that
needs code to load is refused by every command, each line naming only that command's own options.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from convnextv2.checkpoint import (
    Arch, CheckpointError, encoder_shapes, infer_arch, load_encoder_weights, read_encoder, save_state_dict,
    timm_to_hf, timm_to_minkowski, timm_to_reference,
)
from convnextv2.checkpoint.hf import hf_to_timm
from convnextv2.checkpoint.minkowski import minkowski_to_timm
from convnextv2.checkpoint.reference import reference_to_timm
from convnextv2.encoder import create_convnextv2
from convnextv2.timm_names import without_stage0_downsample
from test_config_fuzz import SAMPLE_SCRIPT

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # the fault is the point

WHERE = "fuzz.pt"
AUDITED = "stages.0.blocks.0.mlp.fc1.weight"  # the audit's transposed weight
CUSTOM = Arch((1, 1, 2, 1), (8, 16, 32, 64), 2, 4, None)  # Linear MLP, 2 input channels, no timm name
ARCHS = {  # id -> (Arch, mlp.fc weights as 1x1 convs)
    "atto": (Arch((2, 2, 6, 2), (40, 80, 160, 320), 3, 4, "convnextv2_atto"), True),
    "atto_s16": (Arch((2, 2, 6, 2), (40, 80, 160, 320), 1, 2, "convnextv2_atto"), True),
    "atto_s8": (Arch((2, 2, 6, 2), (40, 80, 160, 320), 3, 1, "convnextv2_atto"), True),
    "tiny": (Arch((3, 3, 9, 3), (96, 192, 384, 768), 3, 4, "convnextv2_tiny"), False),
    "custom": (CUSTOM, False),
}
TINY_FAULTS = ("transposed", "same_size", "extra_dim", "off_by_one", "int8", "nan")  # 28M parameters: the layout ones


# --- faults: tensor -> tensor (None: does not apply to this tensor) ---------------------------------------------------

def _at_middle(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def put(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return put


SHAPE_FAULTS: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "transposed": lambda t: t.transpose(0, 1).contiguous() if t.ndim >= 2 and t.shape[0] != t.shape[1] else None,
    "same_size": lambda t: t.reshape(-1) if t.ndim >= 2 else t.reshape(2, -1) if t.numel() % 2 == 0 else None,
    "extra_dim": lambda t: t.unsqueeze(0),
    "off_by_one": lambda t: torch.cat([t, t[:1]]),
    "off_by_one_last": lambda t: torch.cat([t, t[..., :1]], dim=-1) if t.ndim >= 2 else None,
}
VALUE_FAULTS: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "int8": lambda t: (t * 100).to(torch.int8), "int64": lambda t: t.to(torch.int64), "bool": lambda t: t > 0,
    "complex": lambda t: t.to(torch.complex64), "float8": lambda t: t.to(torch.float8_e4m3fn),
    "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "sparse": lambda t: t.to_sparse(),
    "meta": lambda t: torch.empty(t.shape, device="meta"), "not_a_tensor": lambda t: "weights",
    "nan": _at_middle(float("nan")), "inf": _at_middle(float("inf")),
    "all_nan": lambda t: torch.full_like(t, float("nan")),
}
FAULTS = {**SHAPE_FAULTS, **VALUE_FAULTS, "missing": None, "extra": None}


def inject(sd: dict[str, torch.Tensor], key: str, fault: str) -> dict[str, torch.Tensor] | None:
    """A copy of sd with `fault` at `key` (None when the fault does not apply to that tensor)."""
    out = dict(sd)
    if fault == "missing":
        del out[key]
    elif fault == "extra":
        out[key.rsplit(".", 1)[0] + ".gamma"] = torch.ones(3)  # a ConvNeXt V1 layer scale: no V2 key
    else:
        bad = FAULTS[fault](sd[key])
        if bad is None:
            return None
        out[key] = bad
    return out


# --- formats: the same weights as each reader meets them -------------------------------------------------------------

FORMATS: dict[str, tuple[Callable, Callable | None]] = {  # name -> (timm sd -> file object, file key -> timm keys)
    "timm": (lambda sd, arch: dict(sd), None),
    "fcmae": (lambda sd, arch: {"format": "fcmae", "version": 1, "model": {f"encoder.{k}": v for k, v in sd.items()},
                                "model_args": {"encoder_name": arch.name, "in_chans": arch.in_chans,
                                               "patch_size": arch.patch_size}}, None),
    "reference": (lambda sd, arch: {"model": timm_to_reference(sd)}, reference_to_timm),
    "hf": (lambda sd, arch: timm_to_hf(sd, base_model=True), hf_to_timm),
    "minkowski": (lambda sd, arch: timm_to_minkowski(sd)[0], minkowski_to_timm),
}


def state_of(obj: dict) -> dict[str, torch.Tensor]:
    """The state_dict inside a FORMATS file object."""
    return obj["model"] if "model" in obj else obj


def faulty_file(fmt: str, sd: dict[str, torch.Tensor], arch: Arch, key: str, fault: str
                ) -> tuple[dict | None, set[str]]:
    """(the file object of format `fmt` with `fault` at the tensor that is timm's `key`, the names a refusal may
    give it: the file's own key and the timm key it maps to); (None, _) when the fault does not apply there."""
    build, to_timm = FORMATS[fmt]
    obj = build(sd, arch)
    inner = state_of(obj)
    inner_before = set(inner)
    if fmt == "fcmae":
        file_key = f"encoder.{key}"
    else:
        single = build({key: sd[key]}, arch)
        file_key = next(iter(state_of(single))) if state_of(single) else None
    if file_key is None:  # a key the format has no place for (the Minkowski encoder's head)
        return None, set()
    bad = inject(inner, file_key, fault)
    if bad is None:
        return None, set()
    inner.clear()
    inner.update(bad)
    names = {key, file_key} | {k for k in bad if k not in inner_before}
    if to_timm is not None and fault == "extra":
        extra = next(k for k in bad if k not in state_of(build(sd, arch)))
        try:
            names |= set(to_timm({extra: bad[extra]})[0])
        except ValueError:
            pass
    return obj, names | {n.removeprefix("encoder.") for n in names}


# --- the architectures' weights ---------------------------------------------------------------------------------------

def random_weights(shapes: dict[str, torch.Size], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """Per architecture, an encoder state_dict in timm keys with head.norm (what `fcmae convert` reads)."""
    return {name: random_weights(encoder_shapes(arch, 0, conv_mlp)) for name, (arch, conv_mlp) in ARCHS.items()}


def live_model(name: str) -> torch.nn.Module:
    arch, conv_mlp = ARCHS[name]
    if arch.name is not None:
        return create_convnextv2(arch.name, arch.patch_size, in_chans=arch.in_chans, num_classes=0)
    return without_stage0_downsample(depths=arch.depths, dims=arch.dims, in_chans=arch.in_chans, num_classes=0,
                                     conv_mlp=conv_mlp, use_grn=True, ls_init_value=None, patch_size=arch.stem_stride)


def drawn_key(sd: dict[str, torch.Tensor], name: str, fault: str) -> str:
    """A key drawn at random (seeded by architecture and fault) among those the fault applies to."""
    keys = [k for k in sd if not k.startswith("head.") and (fault not in SHAPE_FAULTS or SHAPE_FAULTS[fault](sd[k])
                                                            is not None)]
    return random.Random(f"{name}/{fault}").choice(keys)


def one_line_naming(e: BaseException, names: set[str], where: str = WHERE) -> str:
    message = str(e)
    assert isinstance(e, ValueError) and "\n" not in message and where in message, message
    assert any(n in message for n in names), (names, message)
    return message


def test_encoder_shapes_are_timms():
    """The shapes every reader checks against, written out, equal timm's own models (the oracle): every size at
    patch 32, and atto / tiny at 16 and 8 with other in_chans and a classifier, key order included."""
    from convnextv2.checkpoint import SIZES

    cases = [(n, 32, 3, 0) for n in SIZES] + [(n, p, 1, 7) for n in ("convnextv2_atto", "convnextv2_tiny")
                                               for p in (16, 8)]
    for name, patch, in_chans, classes in cases:
        with torch.device("meta"):
            real = create_convnextv2(name, patch, in_chans=in_chans, num_classes=classes).state_dict()
        assert list(encoder_shapes(infer_arch(real), classes).items()) == [(k, v.shape) for k, v in real.items()]
    with torch.device("meta"):
        custom = live_model("custom").state_dict()
    assert encoder_shapes(CUSTOM, 0, conv_mlp=False) == {k: v.shape for k, v in custom.items()}


@pytest.mark.parametrize("name", ARCHS)
def test_good_files_are_read_and_loaded_exactly(name, weights):
    """The control: the file as written, its half-precision copies, the other mlp.fc layout and every format are
    read, and load into the live model with exactly their values (as float32)."""
    arch, conv_mlp = ARCHS[name]
    sd = weights[name]
    other_layout = {k: (v.flatten(1) if v.ndim == 4 else v[..., None, None]) if ".mlp.fc" in k and k.endswith("weight")
                    else v for k, v in sd.items()}
    variants = {"as written": sd, "other mlp layout": other_layout,
                **{str(d): {k: v.to(d) for k, v in sd.items()} for d in (torch.float16, torch.bfloat16)}}
    if name != "tiny":
        variants.update({fmt: build(sd, arch) for fmt, (build, _) in FORMATS.items() if fmt != "timm"
                         and (fmt != "fcmae" or arch.name is not None)})
    model = live_model(name)
    for what, obj in variants.items():
        got = read_encoder(obj, where=WHERE)
        assert (got.arch.depths, got.arch.dims, got.arch.patch_size) == (arch.depths, arch.dims, arch.patch_size)
        load_encoder_weights(model, got)
        loaded = model.state_dict()
        source = variants["as written"] if what in FORMATS else variants[what]
        for k, v in source.items():
            if what in ("minkowski", "fcmae") and k.startswith("head."):
                continue  # neither carries head.norm: it starts fresh
            assert torch.equal(loaded[k].flatten(), v.float().flatten()), (what, k)


@pytest.mark.parametrize("name", ARCHS)
def test_every_fault_is_refused_by_every_encoder_reader(name, weights):
    """Each fault, at the audited key (timm format, and loaded into a live model) and at a drawn key (in a format
    drawn too): one line naming the file and the key; the live model is left as it was."""
    arch, _ = ARCHS[name]
    sd = weights[name]
    model = live_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    faults = TINY_FAULTS if name == "tiny" else FAULTS
    formats = [f for f in FORMATS if f != "fcmae" or arch.name is not None]
    wrong, cases = [], 0
    for fault in faults:
        drawn = drawn_key(sd, name, fault)
        fmt = random.Random(f"{name}/{fault}/format").choice(formats)
        for key, fmt, into_model in ((AUDITED, "timm", True), (drawn, fmt, False)):
            obj, names = faulty_file(fmt, sd, arch, key, fault)
            if obj is None:
                continue
            cases += 1
            try:
                if into_model:
                    load_encoder_weights(model, obj)
                else:
                    read_encoder(obj, where=WHERE)
                wrong.append(f"{fault} at {key} ({fmt}): accepted")
            except ValueError as e:
                if fault == "missing" and fmt in ("hf", "reference") and "not a ConvNeXt V2 checkpoint" in str(e):
                    continue  # without its stem the file is no ConvNeXt V2 it could recognise: said so
                try:
                    one_line_naming(e, names, WHERE if not into_model else "checkpoint")
                except AssertionError as a:
                    wrong.append(f"{fault} at {key} ({fmt}): {a}")
    assert not wrong, "\n".join(wrong)
    assert cases >= len(faults)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- FCMAE checkpoints: model.init's decoder, visualize, resume -------------------------------------------------------

FCMAE_ARCHS = ("atto", "atto_s16", "atto_s8")


@pytest.fixture(scope="module")
def fcmae_states() -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Per FCMAE architecture: (the header's model_args, the FCMAE state_dict)."""
    from fcmae.model import FCMAE

    out = {}
    for name in FCMAE_ARCHS:
        arch, _ = ARCHS[name]
        args = {"encoder_name": arch.name, "in_chans": arch.in_chans, "patch_size": arch.patch_size,
                "decoder_dim": 16, "decoder_depth": 1}
        out[name] = (args, FCMAE(**args).state_dict())
    return out


@pytest.mark.parametrize("name", FCMAE_ARCHS)
def test_fcmae_faults_are_refused_by_visualize_resume_and_model_init(name, fcmae_states):
    """Each fault at a drawn encoder key and a drawn decoder key of an FCMAE checkpoint: refused by the check of the
    model its header builds (visualize, resume's model and EMA) and, for the decoder, by model.init's decoder; a
    header that says another size / in_chans / patch size / decoder than the tensors hold: refused, naming it."""
    from fcmae.headers import check_model_state, model_shapes
    from fcmae.model import FCMAE
    from fcmae.pretrain import init_decoder

    args, sd = fcmae_states[name]
    shapes = model_shapes("fcmae", args, WHERE)
    assert shapes == {k: v.shape for k, v in sd.items()}
    check_model_state(sd, "fcmae", args, WHERE, shapes=shapes)  # the control
    target = FCMAE(**args)
    wrong = []
    for fault in FAULTS:
        for part in ("encoder.", "decoder."):
            keys = {k: v for k, v in sd.items() if k.startswith(part) and ".head." not in k}
            key = drawn_key(keys, f"{name}/{part}", fault)
            bad = inject(sd, key, fault)
            if bad is None:
                continue
            names = {key} | {k for k in bad if k not in sd}
            readers = {"visualize": lambda: check_model_state(bad, "fcmae", args, WHERE, shapes=shapes),
                       "resume ema": lambda: check_model_state(bad, "fcmae", args, WHERE, what="ema", shapes=shapes)}
            if part == "decoder.":  # as load_init reads it: the encoder (read_encoder), then the decoder
                file = {"format": "fcmae", "model": bad, "model_args": args}
                readers["model.init decoder"] = lambda: (read_encoder(file, where=WHERE),
                                                         init_decoder(file, target, WHERE))
            for reader, read in readers.items():
                try:
                    read()
                    wrong.append(f"{reader}: {fault} at {key}: accepted")
                except ValueError as e:
                    try:
                        one_line_naming(e, names | {"decoder of another shape"})
                    except AssertionError as a:
                        wrong.append(f"{reader}: {fault} at {key}: {a}")
    other_patch = {32: 16, 16: 8, 8: 32}[args["patch_size"]]
    for claim, words in (({"encoder_name": "convnextv2_femto"},
                          "size 'convnextv2_femto', the tensors 'convnextv2_atto' (read off its blocks)"),
                         ({"in_chans": args["in_chans"] + 1}, "(read off stem.0.weight)"),
                         ({"patch_size": other_patch},
                          f"patch size {other_patch}, the tensors {args['patch_size']} (read off stem.0.weight)"),
                         ({"decoder_dim": 32}, "decoder_dim 32, the tensors 16 (read off its decoder)"),
                         ({"decoder_depth": 2}, "decoder_depth 2, the tensors 1 (read off its decoder)")):
        with pytest.raises(CheckpointError) as e:
            check_model_state(sd, "fcmae", {**args, **claim}, WHERE, shapes=shapes)
        one_line_naming(e.value, {words})
        assert f"{WHERE}: its header (model_args) says" in str(e.value) and "disagree" in str(e.value), e.value
    assert not wrong, "\n".join(wrong)


def training_state(name: str, fcmae_states) -> tuple[dict[str, Any], dict[str, Any], torch.optim.Optimizer, dict]:
    """(a training checkpoint of the FCMAE `name` with AdamW moments, its run's header, the run's optimizer, the
    names of its parameters)."""
    from fcmae.engine.optim import build_adamw, param_groups
    from fcmae.model import FCMAE

    args, sd = fcmae_states[name]
    model = FCMAE(**args)
    model.load_state_dict(sd)
    optimizer = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95))
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p) * 1e-3,
                                  "exp_avg_sq": torch.rand_like(p) * 1e-6}
    header = {"format": "fcmae", "version": 1, "model_args": args}
    state = {**header, "model": sd, "optimizer": optimizer.state_dict(), "epoch": 1, "step": 3}
    return state, header, optimizer, {id(p): n for n, p in model.named_parameters()}


def test_training_checkpoint_faults_are_refused_before_anything_is_restored(fcmae_states):
    """Resume: non-finite or non-float optimizer moments, moments of another shape than their parameter, an
    optimizer state of other groups, damaged counters / RNG state, a wrong model tensor: one line each."""
    from fcmae.engine.optim import check_optimizer_state
    from fcmae.engine.training_state import check_training_tensors, damage

    state, header, optimizer, names = training_state("atto_s16", fcmae_states)
    shapes = {k: v.shape for k, v in state["model"].items()}
    check_training_tensors(state, header, WHERE)  # the control, with the model its header builds
    check_optimizer_state(optimizer, state["optimizer"], WHERE, names)
    index = random.Random("moment").choice(sorted(state["optimizer"]["state"]))
    for fault in ("nan", "inf", "all_nan", "int8", "bool", "complex"):
        for moment in ("exp_avg", "exp_avg_sq"):
            bad = json_copy(state)
            bad["optimizer"]["state"][index][moment] = VALUE_FAULTS[fault](bad["optimizer"]["state"][index][moment])
            with pytest.raises(CheckpointError) as e:
                check_training_tensors(bad, header, WHERE, shapes)
            one_line_naming(e.value, {f"optimizer state of parameter {index}): {moment}"})
    param = [p for g in optimizer.param_groups for p in g["params"]][index]
    for fault in ("transposed", "off_by_one", "extra_dim"):
        bad = json_copy(state)
        moment = SHAPE_FAULTS[fault](bad["optimizer"]["state"][index]["exp_avg"])
        if moment is None:
            continue
        bad["optimizer"]["state"][index]["exp_avg"] = moment
        with pytest.raises(ValueError) as e:
            check_optimizer_state(optimizer, bad["optimizer"], WHERE, names)
        one_line_naming(e.value, {f"exp_avg of {names[id(param)]}"})
    bad = json_copy(state)
    bad["optimizer"]["param_groups"] = bad["optimizer"]["param_groups"][:1]
    with pytest.raises(ValueError, match="parameter groups"):
        check_optimizer_state(optimizer, bad["optimizer"], WHERE, names)
    for entry, value, words in (("epoch", "1", "epoch is '1', not a count"), ("step", -2, "step is -2"),
                                ("rng", {"torch": torch.zeros(3, dtype=torch.uint8)}, "RNG state"),
                                ("optimizer", {"state": []}, "not an optimizer's state_dict"),
                                ("model_args", ["atto"], "'model_args' is a list"),
                                ("epoch_sums", {"loss": 1.0}, "epoch_sums"),
                                ("best", {"top1": "high"}, "best.top1 is 'high'"),
                                ("scaler", {"scale": float("nan")}, "scaler.scale is nan")):
        assert words in damage({**state, entry: value})
    key = drawn_key(state["model"], "resume-model", "nan")
    for what in ("model", "ema"):
        bad = {**state, "ema": state["model"], what: inject(state["model"], key, "nan")}
        with pytest.raises(CheckpointError) as e:
            check_training_tensors(bad, header, WHERE, shapes)
        one_line_naming(e.value, {key})


def json_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a training state whose optimizer entries can be changed without touching the original's."""
    opt = state["optimizer"]
    return {**state, "optimizer": {"state": {i: dict(m) for i, m in opt["state"].items()},
                                   "param_groups": [dict(g) for g in opt["param_groups"]]}}


# --- through the CLI, in a fresh process ------------------------------------------------------------------------------

DRIVER = SAMPLE_SCRIPT  # many argv lists through fcmae.cli.main in one fresh process -> [[exit code, stderr]]


def demo_training_checkpoint(path: Path, break_it: Callable[[dict], None]) -> None:
    """A pretraining last.pt of `fcmae demo --quick` (its header, its model, AdamW moments), broken by break_it."""
    import argparse

    from fcmae.commands.demo import demo_configs
    from fcmae.model import FCMAE
    from fcmae.pretrain import checkpoint_header

    cfg = demo_configs(argparse.Namespace(quick=True, full=False, seed=0, pretrain_epochs=None, finetune_epochs=None,
                                          backend=None), str(path.parent.parent))[0]
    header = checkpoint_header(cfg)
    model = FCMAE(**header["model_args"])
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                     for i, p in enumerate(p for p in model.parameters() if p.requires_grad)},
           "param_groups": []}
    state = {**header, "model": model.state_dict(), "optimizer": opt, "epoch": 0, "step": 1}
    break_it(state)
    path.parent.mkdir(parents=True)
    torch.save(state, path)


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory) -> tuple[Path, list[tuple[list[str], list[str], list[Path]]]]:
    """(folder, [(argv, words its one line must hold, paths that must not exist afterwards)]): one faulty file per
    command, and the pickle that needs code through every command."""
    from fcmae.convert import fcmae_checkpoint
    from fcmae.export import FINETUNE_FORMAT
    from fcmae.model import FCMAE
    from imagegen import make_imagefolder

    root = tmp_path_factory.mktemp("cli")
    make_imagefolder(str(root / "images"), classes=2, per_class=2)
    image = str(next((root / "images").rglob("*.jpg")))
    atto = random_weights(encoder_shapes(ARCHS["atto"][0]))
    grey16 = random_weights(encoder_shapes(ARCHS["atto_s16"][0]))
    fcmae = FCMAE("convnextv2_atto", decoder_dim=32)

    def save(name: str, obj: Any) -> str:
        torch.save(obj, root / name)
        return str(root / name)

    files = {
        "transposed": save("transposed.pt", inject(atto, AUDITED, "transposed")),
        "nan16": save("nan16.pt", inject(grey16, "stages.2.blocks.3.mlp.fc2.weight", "all_nan")),
        "int8_16": save("int8_16.pt", inject(grey16, AUDITED, "int8")),
        "header": save("header.pt", fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_tiny", "decoder_dim": 32})),
        "classes": save("classes.pt", {"format": FINETUNE_FORMAT, "version": 1, "model": {
            **atto, "head.fc.weight": torch.zeros(7, 320), "head.fc.bias": torch.zeros(7)},
            "model_args": {"name": "convnextv2_atto", "num_classes": 10, "in_chans": 3, "patch_size": 32}}),
        "complex": save("complex.pt", inject(atto, "stem.0.weight", "complex")),
        "no_pred_bias": save("no_pred_bias.pt", {**fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto",
                                                                           "decoder_dim": 32}),
                                                 "model": inject(fcmae.state_dict(), "decoder.pred.bias", "missing")}),
        "code": save("code.pt", {"model": atto, "loss": torch.nn.CrossEntropyLoss()}),
        "int_key": save("int_key.pt", {**atto, 0: torch.zeros(1)}),
        "sparse": save("sparse.pt", {"model": inject(atto, AUDITED, "sparse")}),
        "config_str": save("config_str.pt", {**fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto",
                                                                        "decoder_dim": 32}), "config": "data"}),
        "bad_mean": save("bad_mean.pt", {"format": FINETUNE_FORMAT, "version": 1, "model": atto,
                                         "model_args": {"name": "convnextv2_atto", "num_classes": 0},
                                         "config": {"data": {"mean": ["a", "b", "c"]}}}),
    }
    meta = {"model": "convnextv2_femto", "in_chans": "3", "patch_size": "32"}
    save_state_dict(atto, root / "metadata.safetensors", meta)
    demo_training_checkpoint(root / "resume" / "last.pt", lambda s: s["optimizer"]["state"][5].update(
        exp_avg_sq=torch.full_like(s["optimizer"]["state"][5]["exp_avg_sq"], float("nan"))))
    classifier = create_convnextv2("convnextv2_atto", 16, num_classes=10, in_chans=1).state_dict()
    save("ft_last.pt", {"format": FINETUNE_FORMAT, "version": 1, "model": classifier,
                        "ema": inject(classifier, "stages.3.blocks.1.mlp.grn.bias", "inf"),
                        "optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "step": 2,
                        "model_args": {"name": "convnextv2_atto", "num_classes": 10, "in_chans": 1, "patch_size": 16}})
    (root / "demo2" / "pretrain").mkdir(parents=True)
    save("demo2/pretrain/last.pt", {"model": atto, "loss": torch.nn.CrossEntropyLoss()})
    demo_training_checkpoint(root / "demo" / "pretrain" / "last.pt", lambda s: s["model"].update({
        "decoder.proj.weight": s["model"]["decoder.proj.weight"].transpose(0, 1).contiguous()}))
    run, out = ["--config", "pretrain/demo"], root / "out"
    ft = ["--config", "finetune/demo"]
    cases = [
        (["convert", files["transposed"], str(out / "t.safetensors")],
         ["transposed.pt", AUDITED, "(it is transposed)"], [out]),
        (["convert", str(root / "metadata.safetensors"), str(out / "m.safetensors")],
         ["safetensors metadata says size 'convnextv2_femto'", "convnextv2_atto"], [out]),
        (["pretrain", *run, f"output_dir={out}", f"model.init={files['nan16']}"],
         ["model.init=", "stages.2.blocks.3.mlp.fc2.weight holds only NaN"], [out]),
        (["finetune", *ft, f"output_dir={out}", f"model.init={files['int8_16']}"],
         ["model.init=", AUDITED, "is int8"], [out]),
        (["pretrain", *run, f"output_dir={out}", f"resume={root / 'resume' / 'last.pt'}"],
         ["resume=", "optimizer state of parameter 5): exp_avg_sq holds only NaN"], [out]),
        (["eval", files["classes"], "data.format=digits"],
         ["classes.pt", "num_classes 10, the tensors 7 (read off head.fc.weight)"], []),
        (["knn", files["header"], "data.format=digits"], ["header.pt", "says size 'convnextv2_tiny'"], []),
        (["embed", str(root / "images"), "--checkpoint", files["complex"], "--out", str(out / "e.npy")],
         ["complex.pt", "stem.0.weight is complex64"], [out]),
        (["visualize", files["no_pred_bias"], image, "--out", str(out / "g.png")],
         ["no_pred_bias.pt", "lacks 1 key(s)", "decoder.pred.bias"], [out]),
        (["convert", files["int_key"], str(out / "k.safetensors")], ["int_key.pt", "has a key 0 that is not a name"],
         [out]),
        (["knn", files["sparse"], "data.format=digits"], ["sparse.pt", AUDITED, "is a sparse_coo tensor"], []),
        (["visualize", files["config_str"], image, "--out", str(out / "g.png")],
         ["config_str.pt", "its config is a str, not a mapping"], [out]),
        (["embed", str(root / "images"), "--checkpoint", files["bad_mean"], "--out", str(out / "e.npy")],
         ["bad_mean.pt", "data.mean is ['a', 'b', 'c']"], [out]),
        (["convert", files["bad_mean"], str(out / "b.safetensors")], ["bad_mean.pt", "data.mean"], [out]),
        (["finetune", *ft, f"output_dir={out}", f"resume={root / 'ft_last.pt'}"],
         ["resume=", "(ema): stages.3.blocks.1.mlp.grn.bias holds 1 inf"], [out]),
        (["demo", "--quick", "--out", str(root / "demo2")],
         ["cannot resume", "holds a pickled Python object", "give a new --out (or leave it out) to start afresh"],
         [root / "demo2" / "pretrain" / "config.yaml", root / "demo2" / "finetune-fcmae"]),
        (["demo", "--quick", "--out", str(root / "demo")],
         ["decoder.proj.weight has shape (320, 128, 1, 1)", "(it is transposed)", "give a new --out"],
         [root / "demo" / "pretrain" / "config.yaml", root / "demo" / "finetune-fcmae"]),
    ]
    code = files["code"]
    cases += [(argv, [f"{code} holds a pickled Python object (torch.nn.modules.loss.CrossEntropyLoss)", *words], [out])
              for argv, words in (
        (["convert", code, str(out / "c.safetensors")], []),
        (["pretrain", *run, f"output_dir={out}", f"model.init={code}"], ["model.init="]),
        (["finetune", *ft, f"output_dir={out}", f"model.init={code}"], ["model.init="]),
        (["pretrain", *run, f"output_dir={out}", f"resume={code}"], ["cannot resume"]),
        (["finetune", *ft, f"output_dir={out}", f"resume={code}"], ["cannot resume"]),
        (["eval", code, "data.format=digits"], []),
        (["knn", code, "data.format=digits"], []),
        (["embed", str(root / "images"), "--checkpoint", code, "--out", str(out / "e.npy")], []),
        (["visualize", code, image, "--out", str(out / "g.png")], []))]
    return root, cases


OPTIONS = {"resume=", "model.init=", "--checkpoint", "--out", "--model", "--ema", "data.", "output_dir"}


def test_every_command_refuses_a_bad_checkpoint_in_one_line(cli_cases):
    """Each command in a fresh process: exit 2, one line `fcmae CMD: error: ...` with the file, the key and what
    is wrong, no traceback, nothing written; a refused pickle's line names no other command's options."""
    root, cases = cli_cases
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([argv for argv, _, _ in cases])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases) > 20
    for (argv, words, absent), (code, err) in zip(cases, results):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert lines[0].startswith(f"fcmae {argv[0]}: error: "), (argv, err)
        for w in words:
            assert w in lines[0], (argv, w, lines[0])
        for path in absent:
            assert not path.exists(), (argv, path)
        if "pickled" in lines[0] or argv[0] == "demo":  # the fix names the command's own options only
            own = {o for o in OPTIONS if o in " ".join(argv)}
            assert not [o for o in OPTIONS - own if o in lines[0]], (argv, lines[0])


def test_a_pickle_needing_code_exits_2_from_the_process(cli_cases):
    """The exit status of `python -m fcmae` itself (not `main`'s return value) for a command that reads with the
    library and one that read with its own loader before (visualize)."""
    root, cases = cli_cases
    for argv in (c[0] for c in cases if c[0][0] == "visualize" and "code.pt" in c[0][1]):
        done = subprocess.run([sys.executable, "-m", "fcmae", *argv], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "needs code to load" in done.stderr and "resume=" not in done.stderr
