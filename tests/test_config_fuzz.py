"""A fuzz pass over every config key (issue 24): wrong types, negative, zero, huge, NaN / inf, empty lists and
unknown keys, each given as a `key=value` override on top of a runnable config. A value the key cannot mean is
refused with one line naming the key (exit 2 from the CLI) before anything is written; a value it can mean is
accepted. What a key can mean is decided here, from its documented meaning (the table below), not read from the
schema's own checks.

The rules, by kind of key:
- a choice (device, amp, model.name, model.backend, model.patch_size, data.format, ...): none of the probes is one.
- a path (data.path, resume, model.init, ...): refused; the recipes read the built-in digits, which take no folder,
  and none of the probes names an existing checkpoint.
- a text key (output_dir): any scalar is kept as the text written (`output_dir=2024` is the folder "2024").
- a count with no natural upper bound (epochs, steps, batch sizes, k, num_samples...): >= 1 (or >= 0 where 0 means
  "off"), huge included: a batch larger than the data is refused later, when the data is read, before any write.
- a size that costs memory or processes (model.in_chans, model.decoder_dim/depth, data.num_workers,
  data.image_size): bounded; 10^12 is refused. data.image_size must also be a multiple of the patch size.
- a rate or coefficient with no upper bound (lr, blr, weight decay, clip_grad, temperatures, mixup alphas): > 0
  (or >= 0 where 0 means off), any finite size; a run they make diverge stops with the NaN stop (exit 3).
- a probability or fraction: its interval ([0, 1], (0, 1], [0, 1) or (0, 1), from what 0 and 1 would mean).
- every float: finite (NaN and infinities mean nothing for any key); every int: fits in 64 bits; seed in
  [0, 2**63).
- cross-key rules decide a few (documented at the key): warmup_epochs <= epochs, min_lr <= the peak lr, accum_steps
  divides the batch, the digits' counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import get_type_hints

import pytest

from fcmae.commands.knn import KnnConfig
from fcmae.config import load_config
from fcmae.evaluate import EvalConfig
from fcmae.finetune_config import FinetuneConfig
from fcmae.pretrain_config import PretrainConfig
from fcmae.recipes import find_config

PROBES = {  # name -> the override's YAML text
    "text": "x", "negative": "-1", "zero": "0", "one": "1", "two": "2", "fraction": "0.5",
    "huge_int": str(10**12), "huge_float": "1e30", "beyond_64_bits": str(2**64), "nan": ".nan", "inf": ".inf",
    "minus_inf": "-.inf", "empty_list": "[]", "list": "[1]", "mapping": "{a: 1}", "bool": "true", "null": "null",
}
SCALARS = {"text", "negative", "zero", "one", "two", "fraction", "huge_int", "huge_float", "beyond_64_bits", "nan",
           "inf", "minus_inf", "bool"}

NOTHING: set[str] = set()
BOOL = {"bool"}
COUNT = {"one", "two", "huge_int"}  # >= 1, no upper bound in its meaning
COUNT0 = COUNT | {"zero"}  # >= 0: 0 = off
SMALL = {"one", "two"}  # >= 1, bounded (memory, processes)
SMALL0 = SMALL | {"zero"}
POSITIVE = {"fraction", "one", "two", "huge_int", "huge_float", "beyond_64_bits"}  # a finite float > 0
NONNEG = POSITIVE | {"zero"}
OPEN_UNIT = {"fraction"}  # (0, 1)
LEFT_CLOSED = {"zero", "fraction"}  # [0, 1)
RIGHT_CLOSED = {"fraction", "one"}  # (0, 1]
UNIT = {"zero", "fraction", "one"}  # [0, 1]
NULL = {"null"}

DATA = {  # a fine-tuning-style `data` section (fine-tuning, the kNN monitor, `fcmae knn`, `fcmae eval`)
    "path": NOTHING, "train_path": NOTHING, "val_path": NOTHING,  # the digits read no folder
    "format": NOTHING, "image_size": NOTHING,  # >= 2 patches of 8..32 px: none of the probes
    "batch_size": COUNT, "eval_batch_size": COUNT, "eval_every_epochs": COUNT, "num_workers": SMALL0,
    "crop_pct": RIGHT_CLOSED, "auto_augment": NULL,  # a timm spec such as rand-m9-mstd0.5-inc1: none of the probes
    "reprob": UNIT, "min_scale": RIGHT_CLOSED, "hflip": UNIT, "fast_decode": BOOL,
    "mean": {"list", "null"}, "std": {"list", "null"},  # one finite value per channel (std > 0); the recipes: 1
    "digits_per_class": SMALL,  # with digits_val = 500: at most 129
    "digits_val": NOTHING,  # in [10, 1797 - 10 x digits_per_class]
}
RUN = {
    "output_dir": SCALARS, "seed": {"zero", "one", "two", "huge_int"}, "device": NOTHING, "amp": NOTHING,
    "resume": NULL, "compile": BOOL, "channels_last": BOOL,
    "accept_changes": {"empty_list"},  # config keys (e.g. [optim.lr, seed]): none of the probes names one
    "optim.epochs": COUNT,
    "optim.warmup_epochs": {"zero", "fraction", "one", "two"},  # <= optim.epochs (20 / 30 in the demo recipes)
    "optim.blr": POSITIVE, "optim.lr": POSITIVE | NULL,
    "optim.min_lr": {"zero"},  # <= the peak lr (1.5e-3 / 1e-3 in the demo recipes)
    "optim.weight_decay": NONNEG, "optim.betas": NOTHING,  # a pair of numbers in [0, 1)
    "optim.accum_steps": SMALL,  # divides data.batch_size (64 / 32)
    "optim.clip_grad": POSITIVE | NULL,
    "checkpoint.every_steps": COUNT, "checkpoint.keep_every_epochs": COUNT0,
    "log.every_steps": COUNT, "log.progress": BOOL, "log.tensorboard": BOOL, "log.vis_every_epochs": COUNT0,
    "log.vis_images": COUNT,
    "log.mlflow": BOOL, "log.wandb": BOOL,  # true needs the package (the dev extra installs both)
    "log.mlflow_uri": NULL,  # a tracking URI (scheme://...), and only with log.mlflow=true: none of the probes
    "log.experiment": SCALARS, "log.run_name": SCALARS | NULL,  # names: any scalar is kept as the text written
}
RULES = {
    "pretrain": {
        **RUN,
        "model.name": NOTHING, "model.init": NOTHING, "model.backend": NOTHING, "model.in_chans": SMALL,
        "model.mask_ratio": OPEN_UNIT, "model.decoder_dim": SMALL, "model.decoder_depth": SMALL0,
        "model.norm_pix_loss": BOOL, "model.patch_size": NOTHING,  # 32, 16, 8 or auto
        "data.path": NOTHING, "data.format": NOTHING, "data.image_size": NOTHING, "data.batch_size": COUNT,
        "data.num_workers": SMALL0, "data.min_scale": RIGHT_CLOSED, "data.hflip": UNIT, "data.fast_decode": BOOL,
        "data.mean": {"list", "null"}, "data.std": {"list", "null"}, "data.shuffle_buffer": COUNT,
        "data.num_samples": COUNT | NULL, "data.digits_holdout": {"zero", "one", "two"},  # [0, 1000]
        "monitor.every_epochs": COUNT0, "monitor.k": COUNT, "monitor.temperature": POSITIVE,
        **{f"monitor.data.{k}": v for k, v in DATA.items()},
    },
    "finetune": {
        **RUN,
        "optim.layer_decay": RIGHT_CLOSED, "optim.layer_decay_scheme": NOTHING,
        "model.name": NOTHING, "model.init": NOTHING, "model.num_classes": COUNT | NULL,
        "model.in_chans": SMALL | NULL, "model.patch_size": NULL, "model.drop_path": LEFT_CLOSED,
        "model.head_init_scale": RIGHT_CLOSED,  # scales timm's init of the fresh head: 1 = timm's own
        **{f"data.{k}": v for k, v in DATA.items()},
        "aug.mixup": NONNEG, "aug.cutmix": NONNEG, "aug.mixup_prob": UNIT, "aug.switch_prob": UNIT,
        "aug.smoothing": LEFT_CLOSED, "ema.enabled": BOOL, "ema.decay": LEFT_CLOSED,
    },
    "knn": {"device": NOTHING, "amp": NOTHING, "k": COUNT, "temperature": POSITIVE,
            **{f"data.{k}": v for k, v in DATA.items()}},
    "eval": {"device": NOTHING, "amp": NOTHING, "ema": BOOL, **{f"data.{k}": v for k, v in DATA.items()}},
}
SCHEMAS = {  # schema, --config, the overrides that make it runnable (here: the digits, a fresh output_dir)
    "pretrain": (PretrainConfig, "pretrain/demo", ["output_dir={out}"]),
    "finetune": (FinetuneConfig, "finetune/demo", ["output_dir={out}"]),
    "knn": (KnnConfig, None, ["data.format=digits"]),
    "eval": (EvalConfig, None, ["data.format=digits"]),
}


def leaves(cls: type, prefix: str = "") -> list[str]:
    hints = get_type_hints(cls)
    return [k for f in dataclasses.fields(cls) if f.init for k in (  # init=False: derived state, not a key
        leaves(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name])]


def sections(cls: type) -> list[str]:
    """'' and every dotted section of the schema (where an unknown key can be put)."""
    return sorted({k.rsplit(".", 1)[0] + "." if "." in k else "" for k in leaves(cls)})


def cases(command: str, out: str) -> list[tuple[list[str], str, bool]]:
    """(overrides, the key that must be named, accepted?) for every key x probe, and an unknown key per section."""
    cls, _, base = SCHEMAS[command]
    base = [b.format(out=out) for b in base]
    found = []
    for key in leaves(cls):
        for probe, text in PROBES.items():
            found.append((base + [f"{key}={text}"], key, probe in RULES[command][key]))
    for section in sections(cls):
        found.append((base + [f"{section}no_such_key=1"], f"{section}no_such_key", False))
    return found


def test_every_key_has_a_rule():
    for command, (cls, _, _) in SCHEMAS.items():
        assert sorted(RULES[command]) == sorted(leaves(cls)), command


@pytest.mark.parametrize("command", SCHEMAS)
def test_fuzz_every_key(command, tmp_path, record_property):
    cls, config, _ = SCHEMAS[command]
    path = find_config(config) if config else None
    out = tmp_path / "run"
    wrong = []
    for overrides, key, accepted in cases(command, str(out)):
        try:
            load_config(cls, path, overrides)
            if not accepted:
                wrong.append(f"accepted {overrides[-1]}")
        except ValueError as e:
            message = str(e)
            if accepted:
                wrong.append(f"refused {overrides[-1]}: {message}")
            elif "\n" in message or key not in message:
                wrong.append(f"{overrides[-1]}: not one line naming {key}: {message}")
    assert not wrong, "\n".join(wrong)
    assert not out.exists() and os.listdir(tmp_path) == []
    record_property("cases", len(cases(command, str(out))))


SAMPLE_SCRIPT = r"""
import contextlib, io, json, sys
from fcmae.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_fuzz_sample_through_the_cli_in_a_subprocess(tmp_path):
    """Every 25th case through `fcmae.cli.main` in one fresh process: a refused value exits 2 with one line
    `fcmae COMMAND: error: ...` naming the key and writes nothing; an accepted one prints under --print-config."""
    from convnextv2.checkpoint import save_state_dict
    from convnextv2.encoder import create_convnextv2

    ckpt = tmp_path / "ckpt" / "atto.safetensors"  # for knn, which reads its checkpoint before the data keys
    save_state_dict(create_convnextv2("convnextv2_atto", 32, num_classes=0).state_dict(), ckpt)
    out = tmp_path / "run"
    runs, expect = [], []
    for command in ("pretrain", "finetune", "knn"):
        for i, (overrides, key, accepted) in enumerate(cases(command, str(out))):
            if i % 25:
                continue
            if command == "knn":
                if accepted:
                    continue  # would run the probe; refused ones stop before the checkpoint is read
                argv = ["knn", str(ckpt), *overrides]
            else:
                config = SCHEMAS[command][1]
                argv = [command, "--config", config, *overrides] + (["--print-config"] if accepted else [])
            runs.append(argv)
            expect.append((command, key, accepted))
    done = subprocess.run([sys.executable, "-c", SAMPLE_SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert len(results) == len(runs) > 60
    for argv, (code, err), (command, key, accepted) in zip(runs, results, expect):
        if accepted:
            assert code == 0 and err == "", (argv, err)
        else:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith(f"fcmae {command}: error: "), (argv, err)
            assert key in lines[0] and "Traceback" not in err, (argv, err)
    assert not out.exists() and os.listdir(tmp_path) == ["ckpt"]


def count() -> int:
    """The number of fuzz cases (for the report): `python tests/test_config_fuzz.py`."""
    return sum(len(cases(c, "/nonexistent/run")) for c in SCHEMAS)


if __name__ == "__main__":
    print(count())
