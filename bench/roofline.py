"""Roofline of the FCMAE train step: FLOPs and bytes per op class, the predicted floor per step and the MFU.

    python bench/roofline.py --model convnextv2_base --image-size 224 --batch 64 --mask-ratio 0.6 --dtype bf16 \
        --device h100                       # the predicted table: packed / masked / dense, eager and fused
    python bench/roofline.py ... --profile DIR   # + measured against predicted per op class, from the
                                                 #   profile-<backend>.json that `fcmae bench --profile DIR` writes

The model (an estimate, written down so that the first GPU profile can be read against it):
- FLOPs are counted like torch.utils.flop_counter (GEMMs and convolutions only, 2 per multiply-add; backward = input
  gradient + weight gradient, no input gradient for the stem), per op class. tests/test_roofline.py checks the dense
  step's total against FlopCounterMode on the CPU (within 1%). The *useful* FLOPs (the MFU's numerator, as in
  `fcmae bench`) are the dense encoder's times the visible fraction, plus the decoder's.
- Bytes are activation passes: each op reads its inputs and writes its output once per pass (`PASSES`, in units of
  the op's activation tensor). `eager` is one kernel per op (what eager PyTorch runs); `fused` is every pointwise
  chain fused into the GEMM or conv next to it (LayerNorm into fc1's prologue, GELU and GRN's norm into fc1's
  epilogue, GRN's scale into fc2's prologue, the residual into fc2's epilogue, packed's gather into LayerNorm and its
  scatter into the residual): what torch.compile can approach. Weights count once per GEMM pass; the optimizer is
  fused AdamW in both (as fcmae runs it on CUDA): 28 bytes per parameter (read param, grad, 2 moments; write param,
  2 moments), against ~80 for the multi-tensor (foreach) kernel it replaced.
- Per op class the floor is max(FLOPs / peak, bytes / bandwidth); the step floor is their sum (kernels run one after
  another). Peak and bandwidth are the ones measured on the machine (`DEVICES`; the datasheet values are printed too).
Backends: `dense` runs every position; `masked` runs every position plus its mask multiplies; `packed` runs the
per-position ops on the visible positions only and the 7x7 depthwise conv on the zero-filled full grid (plus the
scatter / gather around it).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convnextv2.checkpoint.arch import SIZES  # noqa: E402

# Measured on the lent GPU machines (2026-11): an 8192^3 bf16 matmul, device-to-device copy bandwidth.
DEVICES = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "bf16_tflops": 790.0, "fp32_tflops": 51.0, "tb_s": 3.0,
             "datasheet": "989 TFLOP/s bf16 dense, 3.35 TB/s"},
    "h200": {"name": "NVIDIA H200", "bf16_tflops": 790.0, "fp32_tflops": 51.0, "tb_s": 4.3,
             "datasheet": "989 TFLOP/s bf16 dense, 4.8 TB/s"},
}
CLASSES = ("gemm", "dwconv", "layernorm", "gelu", "grn", "residual", "mask", "gather_scatter", "loss", "optimizer")
# Activation passes (reads + writes, in units of the op's output tensor) forward, backward; eager and fused.
PASSES = {  # class: (eager fwd, eager bwd, fused fwd, fused bwd)
    "layernorm": (2, 4, 0, 1),     # fused: into fc1's prologue; its backward keeps one reduction pass
    "gelu": (2, 3, 0, 0),          # on the 4C-wide hidden tensor; fused into fc1's epilogue / fc2's backward
    "grn": (3, 4, 0, 1),           # 4C wide: norm (read), apply (read, write); fused: one extra read in backward
    "residual": (3, 0, 1, 0),      # read both, write the sum; fused: fc2's epilogue reads the shortcut
    "mask": (2, 2, 0, 0),          # masked's x * keep (read, write), per multiply
}
OPTIMIZER_BYTES = {"fused": 28, "foreach": 80}  # per fp32 parameter: fused AdamW vs the multi-tensor (foreach) one


@dataclass
class Cost:
    """One op class's totals for a whole step (forward + backward)."""
    flops: float = 0.0
    bytes: float = 0.0

    def add(self, flops: float = 0.0, nbytes: float = 0.0) -> None:
        self.flops += flops
        self.bytes += nbytes


@dataclass
class Step:
    """The predicted cost of one train step of one backend, per op class, eager or fused."""
    costs: dict[str, Cost] = field(default_factory=lambda: {c: Cost() for c in CLASSES})

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.costs.values())

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.costs.values())

    def floor_s(self, peak: float, bandwidth: float) -> dict[str, float]:
        return {k: max(c.flops / peak, c.bytes / bandwidth) for k, c in self.costs.items()}


@dataclass(frozen=True)
class Geometry:
    """Sizes of one run: N images of S x S px, patch p, V of L patches visible."""
    model: str
    image_size: int
    batch: int
    mask_ratio: float = 0.6
    patch_size: int = 32
    in_chans: int = 3
    decoder_dim: int = 512
    decoder_depth: int = 1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def visible(self) -> int:
        return int(self.grid ** 2 * (1 - self.mask_ratio))

    @property
    def visible_fraction(self) -> float:
        return self.visible / self.grid ** 2

    def positions(self, stage: int) -> int:
        """Positions of stage `stage`'s full grid over the batch (the stem stride is patch / 8; each stage halves)."""
        side = self.image_size // (self.patch_size // 8) // 2 ** stage
        return self.batch * side * side


def gemm(cost: Cost, m: float, k: int, n: int, act_bytes: int, input_grad: bool = True) -> None:
    """(m x k) @ (k x n): 2mkn forward; backward the input gradient (unless `input_grad` is False) and the weight
    gradient, 2mkn each. Bytes: forward reads the input and the weights and writes the output; backward reads
    the output gradient twice (for both gradients), the input and the weights, writes the input gradient."""
    cost.add(2 * m * k * n * (2 + input_grad), act_bytes * (m * k + m * n) + 2 * k * n
             + act_bytes * (2 * m * n + m * k + m * k * input_grad) + 2 * k * n)


def pointwise(step: Step, cls: str, elements: float, act_bytes: int, fused: bool, times: int = 1) -> None:
    eager_f, eager_b, fused_f, fused_b = PASSES[cls]
    passes = (fused_f + fused_b) if fused else (eager_f + eager_b)
    step.costs[cls].add(nbytes=passes * elements * act_bytes * times)


def block(step: Step, backend: str, c: int, full: float, pw: float, act_bytes: int, fused: bool) -> None:
    """One ConvNeXt V2 block of width c: the depthwise conv on `full` positions, the rest on `pw` positions."""
    dw = 2 * 49 * c * full
    step.costs["dwconv"].add(3 * dw, act_bytes * c * full * 6)  # fwd read+write; bwd grad in (2), weight grad (2)
    if backend == "packed":  # scatter into a zero grid, conv, gather back; forward and backward mirror it
        moved = (full + pw) if fused else (full + 4 * pw)
        step.costs["gather_scatter"].add(nbytes=2 * moved * c * act_bytes)
    pointwise(step, "layernorm", c * pw, act_bytes, fused)
    gemm(step.costs["gemm"], pw, c, 4 * c, act_bytes)
    pointwise(step, "gelu", 4 * c * pw, act_bytes, fused)
    pointwise(step, "grn", 4 * c * pw, act_bytes, fused)
    gemm(step.costs["gemm"], pw, 4 * c, c, act_bytes)
    pointwise(step, "residual", c * pw, act_bytes, fused)
    if backend == "masked":  # GRN's input (4c wide) and the block output are multiplied by the mask
        pointwise(step, "mask", 5 * c * pw, act_bytes, fused)


def predict(g: Geometry, backend: str, fused: bool, act_bytes: int = 2, params: int | None = None,
            encoder_only: bool = False) -> Step:
    """The step's cost per op class. encoder_only: the encoder's forward + backward alone (no decoder, loss,
    optimizer)."""
    depths, dims, _ = SIZES[g.model]
    step = Step()
    f = g.visible_fraction if backend == "packed" else 1.0
    k = g.patch_size // 8
    p0 = g.positions(0)
    image = g.batch * g.in_chans * g.image_size ** 2
    gemm(step.costs["gemm"], p0 * f, k * k * g.in_chans, dims[0], act_bytes, input_grad=False)  # stem conv
    step.costs["gemm"].add(nbytes=4 * image)  # the fp32 image read once more (cast / gather)
    pointwise(step, "layernorm", dims[0] * p0 * f, act_bytes, fused)
    for s, (depth, c) in enumerate(zip(depths, dims)):
        full = g.positions(s)
        pw = full * f
        if s > 0:  # LayerNorm + conv 2x2/2
            pointwise(step, "layernorm", dims[s - 1] * 4 * pw, act_bytes, fused)
            gemm(step.costs["gemm"], pw, 4 * dims[s - 1], c, act_bytes)
        if backend == "masked":
            pointwise(step, "mask", c * full, act_bytes, fused)  # the stage input times the mask
        for _ in range(depth):
            block(step, backend, c, full, pw, act_bytes, fused)
    if encoder_only:
        return step
    d, cells = g.decoder_dim, g.batch * g.grid ** 2
    gemm(step.costs["gemm"], cells, dims[-1], d, act_bytes)  # proj 1x1
    pointwise(step, "mask", d * cells, act_bytes, fused)  # mask token mix
    for _ in range(g.decoder_depth):
        block(step, "dense", d, cells, cells, act_bytes, fused)
    gemm(step.costs["gemm"], cells, d, g.patch_size ** 2 * g.in_chans, act_bytes)  # pred 1x1
    # norm-pix target and the MSE: a few fp32 passes over image-sized tensors, forward and backward
    step.costs["loss"].add(nbytes=4 * image * (6 if fused else 12))
    if params:  # fused AdamW, as the training loop runs it on CUDA (foreach: OPTIMIZER_BYTES["foreach"])
        step.costs["optimizer"].add(15 * params, params * OPTIMIZER_BYTES["fused"])
    return step


def useful_flops(g: Geometry) -> float:
    """The MFU's numerator, as `fcmae bench` counts it: dense encoder FLOPs x visible fraction + decoder FLOPs."""
    encoder = predict(g, "dense", False, encoder_only=True).costs
    whole = predict(g, "dense", False).costs
    enc = encoder["gemm"].flops + encoder["dwconv"].flops
    return enc * g.visible_fraction + (whole["gemm"].flops + whole["dwconv"].flops - enc)


def parameter_count(g: Geometry) -> int:
    """Trainable parameters of the FCMAE model (encoder without its head + decoder), from the architecture."""
    depths, dims, _ = SIZES[g.model]
    k, n = g.patch_size // 8, 0
    n += k * k * g.in_chans * dims[0] + 3 * dims[0]
    for s, (depth, c) in enumerate(zip(depths, dims)):
        if s:
            n += 2 * dims[s - 1] + 4 * dims[s - 1] * c + c
        n += depth * (49 * c + c + 2 * c + 8 * c * c + 4 * c + 8 * c + c)
    d = g.decoder_dim
    n += dims[-1] * d + d + d + g.decoder_depth * (49 * d + d + 2 * d + 8 * d * d + 4 * d + 8 * d + d)
    n += d * g.patch_size ** 2 * g.in_chans + g.patch_size ** 2 * g.in_chans
    return n


# ------------------------------------------------------------------------------------------ measured (a profile)
OP_CLASSES = [  # aten op name -> class, first match wins (the profile's rows are aten ops with their device time)
    (r"adamw|_foreach_|fused_adam", "optimizer"),
    (r"\b(addmm|mm|bmm|matmul|linear)\b|_scaled_mm", "gemm"),
    (r"convolution|conv2d|cudnn_convolution|_conv_depthwise", "dwconv"),
    (r"layer_norm", "layernorm"),
    (r"gelu", "gelu"),
    (r"norm|addcmul", "grn"),
    (r"index|scatter|gather|masked_fill|nonzero|zeros|fill_", "gather_scatter"),
    (r"mse|pow|var|mean|sum", "loss"),
    (r"\b(add|add_)\b", "residual"),
    (r"\b(mul|mul_|upsample|interpolate)\b", "mask"),
]


def classify(op: str) -> str:
    name = op.split("::")[-1]
    for pattern, cls in OP_CLASSES:
        if re.search(pattern, name):
            return cls
    return "other"


def measured(profile: dict) -> dict[str, float]:
    """Seconds per step per class from a `fcmae bench --profile` JSON (its self device time; CPU time on a CPU)."""
    key = "self_device_us" if profile.get("device_type") == "cuda" else "self_cpu_us"
    out: dict[str, float] = {}
    for op in profile["ops"]:
        if op["name"].startswith("aten::"):
            cls = classify(op["name"])
            out[cls] = out.get(cls, 0.0) + op[key] * 1e-6 / profile["steps"]
    return out


def report(g: Geometry, device: str, dtype: str, profiles: dict[str, dict] | None = None) -> str:
    spec = DEVICES[device]
    peak = 1e12 * spec[f"{dtype}_tflops"]
    bw = 1e12 * spec["tb_s"]
    act = 2 if dtype == "bf16" else 4
    params = parameter_count(g)
    useful = useful_flops(g)
    lines = [f"{g.model}, {g.image_size} px, batch {g.batch}, patch {g.patch_size}, mask ratio {g.mask_ratio} "
             f"({g.visible}/{g.grid ** 2} visible), {dtype}, {spec['name']}: peak {spec[f'{dtype}_tflops']:.0f} "
             f"TFLOP/s, {spec['tb_s']:.1f} TB/s measured (datasheet {spec['datasheet']})",
             f"useful work {useful / g.batch / 1e9:.1f} GFLOP/img (fwd+bwd) = {1e3 * useful / peak:.2f} ms per step at "
             f"peak; {params / 1e6:.1f} M parameters: fused AdamW {1e3 * params * OPTIMIZER_BYTES['fused'] / bw:.2f} ms, "
             f"foreach {1e3 * params * OPTIMIZER_BYTES['foreach'] / bw:.2f} ms"]
    header = f"{'backend':<8}{'mode':<7}" + "".join(f"{c[:10]:>11}" for c in CLASSES) + f"{'floor ms':>10}{'MFU':>7}{'GB':>7}"
    lines += ["", "predicted floor per op class (ms): max(FLOPs / peak, bytes / bandwidth)", header]
    floors = {}
    for backend in ("packed", "masked", "dense"):
        for mode in ("eager", "fused"):
            step = predict(g, backend, mode == "fused", act, params)
            per = step.floor_s(peak, bw)
            total = sum(per.values())
            floors[backend, mode] = (step, per, total)
            lines.append(f"{backend:<8}{mode:<7}" + "".join(f"{1e3 * per[c]:>11.2f}" for c in CLASSES)
                         + f"{1e3 * total:>10.2f}{100 * useful / total / peak:>6.1f}%{step.bytes / 1e9:>7.1f}")
    ratio = {m: floors["masked", m][2] / floors["packed", m][2] for m in ("eager", "fused")}
    dense = {m: floors["dense", m][2] / floors["packed", m][2] for m in ("eager", "fused")}
    lines.append(f"predicted packed speed-up: {ratio['eager']:.2f}x masked, {dense['eager']:.2f}x dense (eager); "
                 f"{ratio['fused']:.2f}x masked, {dense['fused']:.2f}x dense (fused)")
    for backend, prof in (profiles or {}).items():
        mode = "fused" if prof.get("compile") else "eager"
        _, per, total = floors[backend, mode]
        got = measured(prof)
        lines += ["", f"{backend} ({mode}): measured (profile, per step) against predicted, ms",
                  f"{'class':<16}{'measured':>10}{'predicted':>10}{'x floor':>9}"]
        for c in CLASSES + ("other",):
            m, p = got.get(c, 0.0), per.get(c, 0.0)
            lines.append(f"{c:<16}{1e3 * m:>10.2f}{1e3 * p:>10.2f}{(m / p if p else float('nan')):>9.3g}")
        lines.append(f"{'total':<16}{1e3 * sum(got.values()):>10.2f}{1e3 * total:>10.2f}"
                     f"{sum(got.values()) / total:>9.3g}")
    return "\n".join(lines)


def load_profiles(folder: str) -> dict[str, dict]:
    profiles = {}
    for path in sorted(glob.glob(os.path.join(folder, "profile-*.json"))):
        doc = json.load(open(path))
        profiles[doc["backend"]] = doc
    if not profiles:
        raise SystemExit(f"roofline: error: no profile-<backend>.json in {folder!r}; write them with "
                         "`fcmae bench ... --profile DIR`")
    return profiles


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_base", choices=sorted(SIZES))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--patch-size", type=int, default=32, choices=(32, 16, 8))
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--profile", default=None, metavar="DIR", help="folder of `fcmae bench --profile` JSON files")
    args = p.parse_args(argv)
    if args.image_size % args.patch_size:
        p.error(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    g = Geometry(args.model, args.image_size, args.batch, args.mask_ratio, args.patch_size,
                 decoder_dim=args.decoder_dim)
    print(report(g, args.device, args.dtype, load_profiles(args.profile) if args.profile else None))


if __name__ == "__main__":
    main()
