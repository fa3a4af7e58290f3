"""Screening harness of the digits study (BENCHMARKS.md, "Pretraining that pays"): FCMAE pretraining and both
fine-tuning arms in one process, on in-memory tensors (batched RandomResizedCrop by affine grids), so that many
settings can be screened on a CPU. It uses the library's FCMAE, encoder builder and layer decay, but its own
short loops and kNN; the figures that count come from the real commands (`fcmae demo`, bench/demo_seeds.py).

    PYTHONPATH=. python bench/digits_study.py --patch 16 --pt-epochs 20 --ft-variants "ft_epochs=10;ft_epochs=30"
    PYTHONPATH=. python bench/digits_study.py --pt-epochs 15 --dec-dim 256 --lp --no-finetune   # pretraining screen

The held-out digits (the fine-tuning val split) are left out of pretraining; the kNN uses the other digits' labels.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from convnextv2.encoder import create_convnextv2, encoder_patch_size
from fcmae.data.labeled import digits_split
from fcmae.demo_data import load_digits
from fcmae.layer_decay import param_groups as ld_groups
from fcmae.engine.optim import param_groups
from fcmae.model import FCMAE


def rrc(x, min_scale, g, hflip=False):
    """batched RandomResizedCrop (bilinear) on (N, C, H, W) tensors."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(min_scale, 1.0, generator=g)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    r = logr.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w
    theta[:, 1, 1] = h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    if hflip:
        flip = torch.rand(n, generator=g) < 0.5
        theta[flip, 0, 0] *= -1
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cosine(step, total, warm, base):
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def normalize(x):
    return (x - 0.449) / 0.226  # grey stats (per-channel default for in_chans != 3)


def eval_images(imgs, size):
    big = round(size / 0.875)
    up = F.interpolate(imgs, size=(big, big), mode="bicubic", align_corners=False)
    o = (big - size) // 2
    return up[:, :, o:o + size, o:o + size]


@torch.no_grad()
def pooled(model, x, bs=256):
    model.eval()
    out = []
    for i in range(0, len(x), bs):
        f = model.forward_features(normalize(x[i:i + bs]))
        out.append(f.mean((2, 3)))
    return torch.cat(out)


def knn(trf, trl, vaf, val, k=20, T=0.07):
    trf = F.normalize(trf, dim=1)
    vaf = F.normalize(vaf, dim=1)
    sim = vaf @ trf.T
    s, i = sim.topk(k, dim=1)
    votes = torch.zeros(len(vaf), 10).scatter_add_(1, trl[i], (s / T).exp())
    return (votes.argmax(1) == val).float().mean().item() * 100


def pretrain(a, imgs_pool, knn_sets):
    torch.manual_seed(a.seed)
    model = FCMAE("convnextv2_atto", in_chans=1, mask_ratio=a.mask_ratio, decoder_dim=a.dec_dim,
                  decoder_depth=a.dec_depth, backend="packed", patch_size=a.patch, norm_pix_loss=not a.no_norm_pix)
    assert model.patch_size == a.patch, model.patch_size
    opt = torch.optim.AdamW(param_groups(model, 0.05, no_decay_names=["decoder.mask_token"]), lr=a.pt_lr,
                            betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(a.seed + 1)
    n = len(imgs_pool)
    spe = n // a.pt_bs
    total = spe * a.pt_epochs
    step = 0
    traj = []
    t0 = time.time()
    if knn_sets is not None:
        traj.append((0, knn(*knn_feats(model.encoder, knn_sets))))
    for ep in range(a.pt_epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        model.train()
        for s in range(spe):
            lr = cosine(step, total, int(a.pt_warm * spe), a.pt_lr)
            for pg in opt.param_groups:
                pg["lr"] = lr
            x = normalize(rrc(imgs_pool[perm[s * a.pt_bs:(s + 1) * a.pt_bs]], a.pt_min_scale, g))
            mask = model.random_mask(x, generator=g)
            loss, _, _ = model(x, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
            step += 1
        if knn_sets is not None and ((ep + 1) % a.knn_every == 0 or ep + 1 == a.pt_epochs):
            traj.append((ep + 1, knn(*knn_feats(model.encoder, knn_sets))))
        print(f"  pt ep {ep + 1} loss {tot / spe:.4f} {time.time() - t0:.0f}s"
              + (f" knn {traj[-1][1]:.1f}" if traj and traj[-1][0] == ep + 1 else ""), flush=True)
    return model.encoder.state_dict(), traj, tot / spe, time.time() - t0


def knn_feats(enc, sets):
    trx, trl, vax, val = sets
    f1, f2 = pooled(enc, trx), pooled(enc, vax)
    enc.train()
    return f1, trl, f2, val


def finetune(a, enc_sd, tr_x, tr_y, va_x, va_y, seed):
    torch.manual_seed(seed)
    model = create_convnextv2("convnextv2_atto", patch_size=a.patch, num_classes=10, in_chans=1,
                              drop_path_rate=a.ft_dp)
    assert encoder_patch_size(model) == a.patch
    if enc_sd is not None:
        missing, unexpected = model.load_state_dict(enc_sd, strict=False)
        assert set(missing) <= {"head.fc.weight", "head.fc.bias"}, missing
        assert not unexpected, unexpected
    with torch.no_grad():
        model.head.fc.weight.mul_(0.001)
        model.head.fc.bias.mul_(0.001)
    opt = torch.optim.AdamW(ld_groups(model, a.ft_wd, a.ft_ld), lr=a.ft_lr, betas=(0.9, 0.999))
    ema = ModelEmaV3(model, decay=a.ft_ema)
    g = torch.Generator().manual_seed(seed + 7)
    n = len(tr_x)
    spe = math.ceil(n / a.ft_bs)
    total = spe * a.ft_epochs
    step = 0
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    curve = []
    for ep in range(a.ft_epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in range(spe):
            lr = cosine(step, total, int(a.ft_warm * spe), a.ft_lr)
            for pg in opt.param_groups:
                pg["lr"] = lr * pg.get("lr_scale", 1.0)
            idx = perm[s * a.ft_bs:(s + 1) * a.ft_bs]
            x = normalize(rrc(tr_x[idx], a.ft_min_scale, g))
            loss = crit(model(x), tr_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model, step=step)
            step += 1
        if a.ft_eval_every and (ep + 1) % a.ft_eval_every == 0 and ep + 1 < a.ft_epochs:
            curve.append((ep + 1, top1(model, va_x, va_y)))
    res = {"top1": top1(model, va_x, va_y), "ema_top1": top1(ema.module, va_x, va_y)}
    if curve:
        res["curve"] = curve
    return res


def standardised_features(a, enc_sd, imgs):
    """(N, C) pooled features of every digit under an encoder (random init if enc_sd is None), standardised."""
    torch.manual_seed(0)
    m = create_convnextv2("convnextv2_atto", patch_size=a.patch, num_classes=10, in_chans=1)
    if enc_sd is not None:
        m.load_state_dict(enc_sd, strict=False)
    f = pooled(m, eval_images(imgs, a.size)).numpy()
    return (f - f.mean(0)) / (f.std(0) + 1e-6)


def linear_probe(feats, labels, per_class, C=0.5):
    """top-1 on the held-out digits of a logistic regression on the frozen features of per_class labeled digits per
    class (a second diagnostic beside the kNN, with as few labels as fine-tuning)."""
    from sklearn.linear_model import LogisticRegression

    tr, va = digits_split(per_class, 500)
    clf = LogisticRegression(C=C, max_iter=3000).fit(feats[tr], labels[tr].numpy())
    return clf.score(feats[va], labels[va].numpy()) * 100


@torch.no_grad()
def top1(m, va_x, va_y):
    m.eval()
    pred = torch.cat([m(normalize(va_x[i:i + 250])).argmax(1) for i in range(0, len(va_x), 250)])
    return (pred == va_y).float().mean().item() * 100


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--dec-dim", type=int, default=128)
    p.add_argument("--dec-depth", type=int, default=1)
    p.add_argument("--pt-epochs", type=int, default=20)
    p.add_argument("--pt-bs", type=int, default=64)
    p.add_argument("--pt-lr", type=float, default=1.5e-3)
    p.add_argument("--pt-warm", type=float, default=1.0)
    p.add_argument("--pt-min-scale", type=float, default=0.5)
    p.add_argument("--pt-pool", default="nonval", choices=["nonval", "all"])
    p.add_argument("--ft-epochs", type=int, default=10)
    p.add_argument("--ft-bs", type=int, default=32)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-wd", type=float, default=0.05)
    p.add_argument("--ft-ld", type=float, default=0.9)
    p.add_argument("--ft-ema", type=float, default=0.9)
    p.add_argument("--ft-dp", type=float, default=0.0)
    p.add_argument("--ft-warm", type=float, default=1.0)
    p.add_argument("--ft-min-scale", type=float, default=0.5)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--ft-eval-every", type=int, default=0, help="also record top-1 every N fine-tune epochs")
    p.add_argument("--seeds", default="0")
    p.add_argument("--knn-every", type=int, default=5)
    p.add_argument("--no-scratch", action="store_true")
    p.add_argument("--no-finetune", action="store_true", help="pretraining (and its diagnostics) only")
    p.add_argument("--no-norm-pix", action="store_true", help="pixel loss on raw (not per-patch normalised) targets")
    p.add_argument("--lp", action="store_true",
                   help="also a logistic-regression probe on 5 and 10 labels per class, random init and pretrained")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--ft-variants", default="", help="';'-separated 'k=v,k=v' fine-tune overrides (attr names)")
    p.add_argument("--save", default="")
    p.add_argument("--load", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    imgs, labels = load_digits(a.size, in_chans=1)
    va = digits_split(a.per_class, 500)[1]
    vaset = set(va)
    pool_idx = [i for i in range(len(imgs)) if i not in vaset] if a.pt_pool == "nonval" else list(range(len(imgs)))
    va_x = eval_images(imgs[va], a.size)
    va_y = labels[va]
    # kNN reference set: the labels of every pretraining digit (a diagnostic; fine-tuning sees only per_class of them)
    knn_tr = [i for i in pool_idx if i not in vaset]
    knn_sets = (eval_images(imgs[knn_tr], a.size), labels[knn_tr], va_x, va_y)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        a.seed = seed
        if a.load:
            sd, traj, ploss, pt_time = torch.load(a.load.format(seed=seed), weights_only=True), [], 0, 0
        else:
            sd, traj, ploss, pt_time = pretrain(a, imgs[pool_idx], knn_sets)
        if a.save:
            torch.save(sd, a.save.format(seed=seed))
        if a.lp:
            feats = {"random": standardised_features(a, None, imgs), "pretrained": standardised_features(a, sd, imgs)}
            lp = {f"{init} {pc}/class": round(linear_probe(f, labels, pc), 1)
                  for init, f in feats.items() for pc in (5, 10)}
            print("LP", json.dumps({"seed": seed, "lp": lp, "knn": traj, "pt_loss": ploss, "pt_time": pt_time}),
                  flush=True)
        if a.no_finetune:
            continue
        for var in (a.ft_variants.split(";") if a.ft_variants else [""]):
            b = copy.copy(a)
            for kv in filter(None, var.split(",")):
                k, v = kv.split("=")
                setattr(b, k, type(getattr(a, k))(v))
            t1 = time.time()
            b_tr = digits_split(b.per_class, 500)[0]  # the labeled digits (a variant may change per_class)
            pre = finetune(b, sd, imgs[b_tr], labels[b_tr], va_x, va_y, seed)
            scr = None if a.no_scratch else finetune(b, None, imgs[b_tr], labels[b_tr], va_x, va_y, seed)
            row = {"seed": seed, "var": var, "pre": pre, "scratch": scr, "knn": traj, "pt_loss": ploss,
                   "pt_time": pt_time, "ft_time": time.time() - t1}
            print("ROW", json.dumps(row), flush=True)
            rows.append(row)
    d = [r["pre"]["top1"] - r["scratch"]["top1"] for r in rows if r["scratch"]]
    print("SUMMARY", a.tag, vars(a), "pre", [r["pre"]["top1"] for r in rows],
          "scratch", [r["scratch"]["top1"] for r in rows if r["scratch"]], "gain", d, flush=True)


if __name__ == "__main__":
    main()
