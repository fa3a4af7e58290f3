"""`fcmae predict CKPT PATH [PATH ...] --out preds.csv`: top-k classes of image files with a classifier checkpoint
(fcmae.predict says what the rows and files hold)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from fcmae.predict import check_out, list_inputs, predict_files, prediction_rows, skipped_path, write_predictions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="top-k classes of image files with a classifier checkpoint",
        description="Classify image files and folders of images (searched recursively) with CKPT, any classifier "
        "`fcmae eval` reads (best.pt, best-ema.pt, last.pt with --ema, an exported model.safetensors, or a folder "
        "holding one), with the preprocessing and class names it carries, as `fcmae eval` does. Writes --out: *.csv "
        "(timm inference.py's columns: filename, index_i, label_i, prob_i) or *.jsonl (one object per image); "
        "unreadable images are left out and listed in OUT-without-suffix + .skipped.txt. "
        "Example: fcmae predict runs/ft/best-ema.pt photos/ --out preds.csv --topk 3",
    )
    p.add_argument("ckpt", metavar="CKPT", help="classifier checkpoint file, or a folder holding an export's "
                   "model.safetensors")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders of images")
    p.add_argument("--out", required=True, help="output file: *.csv or *.jsonl")
    p.add_argument("--topk", type=int, default=5, help="classes per image, most probable first (default 5; at most "
                   "the model's classes)")
    p.add_argument("--ema", action="store_true", help="a fine-tune's last.pt: predict with its EMA weights")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images (default 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU), as fcmae eval's amp")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from convnextv2.encoder import encoder_patch_size
    from fcmae.config import config_from
    from fcmae.data.image_list import ImageList
    from fcmae.engine.config import check_at_least
    from fcmae.engine.distributed import pick_device
    from fcmae.engine.loop import amp_dtype
    from fcmae.evaluate import checkpoint_path, classifier_transform, read_classifier
    from fcmae.finetune_config import FinetuneDataConfig, check_image_size

    # every check before the model runs: output, options, inputs, checkpoint, device
    out = check_out(args.out)
    for flag, value, least in (("--topk", args.topk, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-workers", args.num_workers, 0)):
        check_at_least(flag, value, least)
    files = list_inputs(args.paths)
    model, meta, trained, said = read_classifier(checkpoint_path(args.ckpt), args.ema)
    if said:
        print(f"fcmae predict: {said}", flush=True)
    data = config_from(FinetuneDataConfig, trained)
    check_image_size(data.image_size, encoder_patch_size(model), " of the model")
    in_chans, k = model.stem[0].in_channels, model.num_classes
    transform = classifier_transform(data, in_chans)
    classes = list(meta.get("classes") or [])
    if len(classes) != k:
        print(f"fcmae predict: {args.ckpt} carries no class names: the labels are the class indices", flush=True)
        classes = [str(c) for c in range(k)]
    topk = min(args.topk, k)
    if topk < args.topk:
        print(f"fcmae predict: --topk {args.topk} > the model's {k} classes: writing the top {topk}", flush=True)
    device = pick_device(args.device, 0)

    dataset = ImageList(files, transform, in_chans, data.image_size)
    prob, index, kept = predict_files(model.to(device), dataset, topk, args.batch_size, args.num_workers, device,
                                      amp_dtype(args.amp, device), progress=not args.no_progress)
    if not kept:
        raise ValueError(f"none of the {len(files)} image files could be decoded (all corrupt or not images)")
    skipped = [files[i] for i in sorted(set(range(len(files))) - set(kept))]
    write_predictions(out, prediction_rows(files, kept, prob, index, classes), topk, skipped)
    print(f"fcmae predict: {len(kept)} images -> {out} (top-{topk} of {k} classes, {data.image_size} px, "
          f"crop_pct {data.crop_pct}); {len(skipped) or 'none'} unreadable ({skipped_path(out)} lists them)")
    if skipped:
        print(f"fcmae predict: warning: {len(skipped)} of {len(files)} images unreadable, left out (listed in "
              f"{skipped_path(out)})", file=sys.stderr)
    return {"out": str(out), "count": len(kept), "skipped": len(skipped)}
