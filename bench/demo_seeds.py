"""`fcmae demo` over several seeds: the FCMAE-pretrained vs from-scratch gain with its mean and spread.

    python bench/demo_seeds.py --seeds 0 1 2 --out runs/demo-seeds [-- extra demo args, e.g. --finetune-epochs 30]

Each seed is a whole real demo (pretraining, conversion, both fine-tunings) in runs/demo-seeds/s<seed>; the labeled
subset and the held-out digits are the same for every seed (a fixed permutation), the seed changes the weights'
initialisation, the augmentation and the masks. Prints one row per seed and the mean / sample std of each column.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/demo-seeds")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: arguments for fcmae demo")
    a = p.parse_args()
    from fcmae.commands import demo

    extra = [x for x in a.demo_args if x != "--"]
    rows = []
    for seed in a.seeds:
        sub = argparse.ArgumentParser()
        demo.add_parser(sub.add_subparsers())
        args = sub.parse_args(["demo", "--seed", str(seed), "--out", os.path.join(a.out, f"s{seed}"), *extra])
        t0 = time.time()
        r = demo.run(args)
        knn = r["knn"]
        rows.append({"seed": seed, "pretrained": r["pretrained"]["top1"], "scratch": r["scratch"]["top1"],
                     "gain": r["pretrained"]["top1"] - r["scratch"]["top1"],
                     "knn_random": knn[0][1] if knn else float("nan"), "knn_last": knn[-1][1] if knn else float("nan"),
                     "minutes": (time.time() - t0) / 60})
    cols = ["pretrained", "scratch", "gain", "knn_random", "knn_last", "minutes"]
    print("\nseed " + " ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print(f"{r['seed']:>4} " + " ".join(f"{r[c]:>11.2f}" for c in cols))
    if len(rows) > 1:
        print("mean " + " ".join(f"{statistics.mean(r[c] for r in rows):>11.2f}" for c in cols))
        print("std  " + " ".join(f"{statistics.stdev(r[c] for r in rows):>11.2f}" for c in cols))


if __name__ == "__main__":
    main()
