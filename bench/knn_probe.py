"""Speed of the kNN probe (fcmae.knn, docs/method.md): what a monitor call or `fcmae knn` costs, and where the time goes.

Part 1, the probe as the monitor runs it: a random-init encoder on the built-in digits (eval transform), the
feature extraction of the train and val splits and the weighted vote, timed separately, plus the whole
`knn_probe` call; images/s of the extraction. Part 2, the vote alone on synthetic features (N train x M val, the
encoder's width), chunked similarity matrices of two sizes side by side (ratio printed): the part that grows as
N x M once the labeled set is large.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/knn_probe.py --model convnextv2_atto --image-size 64 --threads 1
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from fcmae.finetune_config import FinetuneDataConfig
from fcmae.knn import extract_features, knn_probe, knn_top1, probe_loader, probe_splits


def timed_cpu(fn, repeat: int) -> tuple[float, float, object]:
    """Best of `repeat` wall-clock times (the machine is shared: the minimum is the least disturbed) and best
    process CPU times -> (wall s, CPU s, the last result)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def timed(fn, repeat: int) -> tuple[float, object]:
    wall, _, out = timed_cpu(fn, repeat)
    return wall, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--digits-per-class", type=int, default=100, help="labeled train digits per class")
    p.add_argument("--digits-val", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--vote-train", type=int, default=20000, help="part 2: synthetic train features")
    p.add_argument("--vote-val", type=int, default=2000, help="part 2: synthetic val features")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    encoder = timm.create_model(args.model, num_classes=0).eval()
    cfg = FinetuneDataConfig(format="digits", image_size=args.image_size, digits_per_class=args.digits_per_class,
                             digits_val=args.digits_val, eval_batch_size=args.batch_size, num_workers=0)
    t_split, splits = timed(lambda: probe_splits(cfg, 3), 1)
    tr_loader = probe_loader(splits.train, args.batch_size, 0, device)
    va_loader = probe_loader(splits.val, args.batch_size, 0, device)
    t_tr, (tr, tr_y, _) = timed(lambda: extract_features(encoder, tr_loader, device), args.repeat)
    t_va, (va, va_y, _) = timed(lambda: extract_features(encoder, va_loader, device), args.repeat)
    t_vote, top1 = timed(lambda: knn_top1(tr, tr_y, va, va_y, 10), args.repeat)
    t_all, cpu_all, result = timed_cpu(
        lambda: knn_probe(encoder, splits.train, splits.val, 10, device, args.batch_size), args.repeat)
    n_tr, n_va = len(tr), len(va)
    print(f"{args.model}, {args.image_size} px, digits {n_tr} train / {n_va} val, batch {args.batch_size}, "
          f"{args.threads} thread(s), best of {args.repeat}")
    print(f"{'stage':<28} {'seconds':>8} {'img/s':>8}  vs the whole call")
    print(f"{'build splits (once)':<28} {t_split:8.3f}")
    for name, t, n in (("features train", t_tr, n_tr), ("features val", t_va, n_va), ("kNN vote", t_vote, None)):
        rate = f"{n / t:8.0f}" if n else " " * 8
        print(f"{name:<28} {t:8.3f} {rate}  {t / t_all:6.1%}")
    print(f"{'knn_probe (whole call)':<28} {t_all:8.3f} {(n_tr + n_va) / t_all:8.0f}  top-1 {result.top1:.2f} "
          f"(vote alone {top1:.2f}); CPU time {cpu_all:.3f}s (wall / CPU "
          f"{t_all / cpu_all:.2f}: > 1 when other jobs share the cores)")

    # Part 2: the vote alone at a larger scale, two chunk sizes
    g = torch.Generator().manual_seed(0)
    dim = encoder.num_features
    ftr, fva = torch.randn(args.vote_train, dim, generator=g), torch.randn(args.vote_val, dim, generator=g)
    ytr = torch.randint(0, 100, (args.vote_train,), generator=g)
    yva = torch.randint(0, 100, (args.vote_val,), generator=g)
    t_small, _ = timed(lambda: knn_top1(ftr, ytr, fva, yva, 100, chunk=128), args.repeat)
    t_big, _ = timed(lambda: knn_top1(ftr, ytr, fva, yva, 100, chunk=1024), args.repeat)
    print(f"vote alone, {args.vote_train} train x {args.vote_val} val x {dim}-d, 100 classes: chunk 128 "
          f"{t_small:.3f}s, chunk 1024 (default) {t_big:.3f}s, ratio {t_small / t_big:.2f}x")


if __name__ == "__main__":
    main()
