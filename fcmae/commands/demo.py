"""`fcmae demo`: the whole story on the built-in digits, on CPU: FCMAE pretraining of ConvNeXt V2 atto (16-px mask
patches: a 4x4 grid at 64 px) on the digits without labels, with a kNN monitor of the encoder; conversion to a timm
backbone; fine-tuning on a small labeled subset; the same fine-tuning from scratch; and a table comparing the two on
held-out digits that neither pretraining nor fine-tuning has seen.

Each stage is the real command with the demo recipes (configs/pretrain/demo.yaml, configs/finetune/demo.yaml) in a
fresh run directory: the same engine, checkpoints, metrics and pictures as a real run. --full swaps in the recipe that
shows the gain (120 FCMAE epochs, a fine-tuning lr for a pretrained start); --quick is the tests' reduced run.
"""
from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `fcmae --help` stays fast
    from fcmae.finetune_config import FinetuneConfig
    from fcmae.pretrain_config import PretrainConfig

DIGITS = 1797  # scikit-learn's digits
# --quick (tests): fewer epochs and labeled/val images; the same stages
QUICK_PRETRAIN = ["optim.epochs=1", "data.num_samples=128", "data.batch_size=32", "log.vis_every_epochs=1",
                  "monitor.data.digits_per_class=4", "monitor.data.digits_val=100"]
QUICK_FINETUNE = ["optim.epochs=2", "data.digits_per_class=4", "data.digits_val=100", "data.batch_size=20"]
# --full: the digits study's recipe that pays (BENCHMARKS.md, issue 12): 120 FCMAE epochs at batch 32, then fine-tuning
# on 5 labeled digits per class with twice the demo's lr, which suits a well-pretrained start (both arms alike)
FULL_PRETRAIN = ["optim.epochs=120", "data.batch_size=32", "optim.blr=1.2e-2", "monitor.every_epochs=20",
                 "log.vis_every_epochs=40"]
FULL_FINETUNE = ["data.digits_per_class=5", "data.batch_size=25", "optim.blr=1.6e-2"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="FCMAE pretraining + fine-tuning vs. from scratch on the built-in digits (CPU, minutes)",
        description="On scikit-learn's handwritten digits (upscaled to 64 px, nothing downloaded): pretrain ConvNeXt "
        "V2 atto with FCMAE (16-px mask patches) on the digits without labels, leaving out 500 held-out digits, with a "
        "kNN monitor; convert the checkpoint to timm; fine-tune on a few labeled digits per class; fine-tune the same "
        "way from scratch; print both accuracies on the 500 held-out digits, the kNN trajectory and where the "
        "reconstruction pictures are.",
    )
    p.add_argument("--pretrain-epochs", type=int, default=None, help="FCMAE epochs (default: demo.yaml's)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tune epochs (default: demo.yaml's)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a reduced run (1 FCMAE epoch on 128 images, 2 fine-tune epochs on 40 labeled, 100 val)")
    length.add_argument("--full", action="store_true",
                        help="the recipe that shows the gain (~25 min on 2 CPU cores): 120 FCMAE epochs at batch 32, "
                        "then fine-tuning on 5 labeled digits per class at twice the demo's lr")
    p.add_argument("--backend", default=None, help="sparse backend for pretraining (default: demo.yaml's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default: a new runs/demo/<time>)")
    p.set_defaults(func=run)


def demo_configs(args: argparse.Namespace, out: str) -> tuple[PretrainConfig, FinetuneConfig, FinetuneConfig]:
    """The pretraining config and the two fine-tuning configs (FCMAE start, scratch) of a demo in `out`: the demo
    recipes with --quick / --full and the explicit options applied; the two fine-tunings differ only in output_dir."""
    from fcmae.config import load_config
    from fcmae.finetune_config import FinetuneConfig
    from fcmae.pretrain_config import PretrainConfig
    from fcmae.recipes import find_config

    common = [f"seed={args.seed}", "log.progress=false"]
    pre = common + (QUICK_PRETRAIN if args.quick else FULL_PRETRAIN if args.full else [])
    if args.pretrain_epochs is not None:
        pre.append(f"optim.epochs={args.pretrain_epochs}")
    if args.backend is not None:
        pre.append(f"model.backend={args.backend}")
    ft = common + (QUICK_FINETUNE if args.quick else FULL_FINETUNE if args.full else [])
    if args.finetune_epochs is not None:
        ft.append(f"optim.epochs={args.finetune_epochs}")
    pre_cfg = load_config(PretrainConfig, find_config("pretrain/demo"),
                          pre + [f"output_dir={os.path.join(out, 'pretrain')}"])
    ft_cfgs = [load_config(FinetuneConfig, find_config("finetune/demo"), ft + [f"output_dir={os.path.join(out, d)}"])
               for d in ("finetune-fcmae", "finetune-scratch")]
    return pre_cfg, *ft_cfgs


def run(args: argparse.Namespace) -> dict:
    from fcmae.engine.config import check_at_least, check_seed
    from fcmae.engine.loop import NonFiniteLossError
    from fcmae.engine.stop import Interrupted

    check_at_least("--pretrain-epochs", args.pretrain_epochs, 1)
    check_at_least("--finetune-epochs", args.finetune_epochs, 1)
    check_seed("--seed", args.seed)
    out = args.out or os.path.join("runs", "demo", time.strftime("%Y%m%d-%H%M%S"))
    pre_cfg, ft_cfg, scratch_cfg = demo_configs(args, out)
    try:
        return stages(pre_cfg, ft_cfg, scratch_cfg, out)
    except Interrupted as e:  # its stages say "rerun the same command", which starts a new demo: say what is kept
        at = e.where.split(";")[0]
        raise Interrupted(e.signum, f"{at + ' ' if at else ''}during the demo; its runs so far are in {out}") from None
    except (OSError, NonFiniteLossError) as e:  # a full disk, a NaN stop: "the same command" must name this --out
        if args.out is None:
            e.args = (f"{e} (for the demo: the same command with --out {out}, which holds its runs so far)",)
        raise


def stages(pre_cfg: PretrainConfig, ft_cfg: FinetuneConfig, scratch_cfg: FinetuneConfig, out: str) -> dict:
    """Pretrain, convert, fine-tune from it and from scratch, print the comparison -> the stages' summaries."""
    from convnextv2.checkpoint import detect, load_file, read_encoder
    from fcmae.export import write_backbone_export
    from fcmae.finetune import finetune
    from fcmae.pretrain import pretrain

    # a stage whose folder holds a run continues it; one that cannot be continued is refused in the demo's own terms
    afresh = f"the demo continues the runs in --out {out}: give a new --out (or leave it out) to start afresh"

    t0 = time.time()
    held = pre_cfg.data.digits_holdout
    n = min(pre_cfg.data.num_samples or DIGITS - held, DIGITS - held)
    what = f"the {n} digits" if n == DIGITS - held else f"the first {n} of the {DIGITS - held} digits"
    print(f"== 1/4 FCMAE pretraining on {what} that are not held out (no labels)", flush=True)
    pre_summary = pretrain(pre_cfg, afresh=afresh)
    last = os.path.join(pre_cfg.output_dir, "last.pt")
    print("== 2/4 conversion of the FCMAE checkpoint to a timm backbone", flush=True)
    raw = load_file(last)
    weights = read_encoder(detect(raw, last))
    print(f"read {last}: {weights.describe()}")
    write_backbone_export(weights, raw, Path(out) / "encoder-timm.safetensors")
    print("== 3/4 fine-tuning from the FCMAE encoder", flush=True)
    ft_cfg.model.init = last  # converted on the fly (the same weights as the file above, plus a fresh head)
    pretrained = finetune(ft_cfg, afresh=afresh)
    print("== 4/4 the same fine-tuning from scratch", flush=True)
    scratch = finetune(scratch_cfg, afresh=afresh)
    minutes = (time.time() - t0) / 60

    d = ft_cfg.data
    rows = [("FCMAE-pretrained", pretrained), ("from scratch", scratch)]
    knn = knn_trajectory(os.path.join(pre_cfg.output_dir, "metrics.jsonl"))
    if knn:
        print("\nkNN top-1 of the frozen encoder on the held-out digits during pretraining (epoch 0 = random init): "
              + " -> ".join(f"{e}: {v:.1f}" for e, v in knn))
    print(f"\nConvNeXt V2 atto, {d.image_size} px, patch {pre_cfg.model.patch_size}, {10 * d.digits_per_class} labeled "
          f"digits, {d.digits_val} held-out digits, {ft_cfg.optim.epochs} fine-tune epochs (FCMAE: "
          f"{pre_cfg.optim.epochs} epochs, final loss {pre_summary['loss']:.3f})")
    print(f"{'init':<18} {'top-1':>7} {'top-5':>7} {'EMA top-1':>10} {'best top-1':>11}")
    for name, s in rows:
        print(f"{name:<18} {s['top1']:>7.2f} {s['top5']:>7.2f} {s['ema_top1']:>10.2f} {s['best_top1']:>11.2f}")
    pngs = sorted(glob.glob(os.path.join(pre_cfg.output_dir, "reconstruction-epoch*.png")),
                  key=lambda p: int(p.rsplit("epoch", 1)[1].split(".")[0]))
    print(f"\nreconstructions: {pngs[-1] if pngs else 'none'}")
    print(f"run directory: {out} ({minutes:.1f} min)")
    return {"pretrain": pre_summary, "pretrained": pretrained, "scratch": scratch, "knn": knn,
            "reconstruction": pngs[-1] if pngs else None}


def knn_trajectory(metrics_path: str) -> list[tuple[int, float]]:
    """[(epoch, kNN top-1)] from a pretraining's metrics.jsonl (the monitor's rows; epoch 0 = random init)."""
    import json

    if not os.path.isfile(metrics_path):
        return []
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["epoch"], r["knn_top1"]) for r in rows if r.get("kind") == "epoch" and "knn_top1" in r]
