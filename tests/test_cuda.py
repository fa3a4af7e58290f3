"""The sparse backends on a GPU: packed == masked in fp32 on CUDA and under bf16 autocast (the compiled train step on
CUDA is in test_packed.py).

Skipped, with the reason shown, on machines without CUDA (CI); run them on a GPU machine with
`python -m pytest tests/test_cuda.py -rs`.
"""
import copy

import pytest
import torch

from conftest import randomize_grn, rel_err
from fcmae import FCMAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL_TINY = dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128))  # timm's tiny structure (Linear MLP), made small


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 convs/matmuls (cuDNN's default) would hide a 1e-5 difference under their own 1e-3 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def grads(model: FCMAE) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,kwargs", [("convnextv2_atto", {}), ("convnextv2_tiny", SMALL_TINY)])
def test_packed_matches_masked_on_cuda(name, kwargs):
    """On the GPU, packed equals masked (fp32), and both equal the CPU masked oracle."""
    cpu = randomize_grn(FCMAE(name, decoder_dim=64, backend="masked", **kwargs))
    imgs = torch.randn(3, 3, 96, 160)
    mask = cpu.random_mask(imgs)
    losses, preds, all_grads = {}, {}, {}
    for key, device, backend in [("cpu", "cpu", "masked"), ("masked", "cuda", "masked"), ("packed", "cuda", "packed")]:
        model = copy.deepcopy(cpu).to(device)
        model.backend = backend
        loss, pred, _ = model(imgs.to(device), mask.to(device))
        loss.backward()
        losses[key], preds[key], all_grads[key] = loss.item(), pred.cpu(), {n: g.cpu() for n, g in grads(model).items()}
    for key in ("masked", "packed"):
        assert abs(losses[key] - losses["cpu"]) <= 1e-5 * abs(losses["cpu"]), key
        assert rel_err(preds[key], preds["cpu"]) <= 1e-5, key
        assert all_grads[key].keys() == all_grads["cpu"].keys()
        for n, g in all_grads["cpu"].items():
            assert rel_err(all_grads[key][n], g) <= 1e-4, (key, n)


def test_bf16_autocast_train_step_on_cuda():
    """A bf16 autocast step of packed: bf16 really used, finite, loss within 5% of fp32, same as masked in bf16."""
    model = randomize_grn(FCMAE("convnextv2_tiny", decoder_dim=128, **SMALL_TINY)).cuda()
    imgs = torch.randn(4, 3, 128, 128, device="cuda").to(memory_format=torch.channels_last)
    mask = model.random_mask(imgs)
    with torch.no_grad():
        loss_fp32, _, _ = model(imgs, mask)
    results = {}
    for backend in ("masked", "packed"):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, pred, _ = model(imgs, mask)
        assert pred.dtype == torch.bfloat16, backend
        loss.backward()
        assert torch.isfinite(loss), backend
        assert all(torch.isfinite(g).all() for g in grads(model).values()), backend
        results[backend] = loss.item()
    assert abs(results["packed"] - loss_fp32.item()) <= 0.05 * loss_fp32.item()
    assert abs(results["packed"] - results["masked"]) <= 0.05 * results["masked"]



def test_pretraining_steps_do_not_wait_for_the_gpu(tmp_path):
    """Real pretraining steps (the loop's own `accumulate` and `optimizer_step`: loader batch, normalisation, mask and
    visible indices from the host, packed forward/backward under bf16 autocast, fused AdamW with its on-device skip)
    under torch.cuda.set_sync_debug_mode("error"): any host sync inside a step raises."""
    from fcmae.config import load_config
    from fcmae.engine.distributed import DistInfo
    from fcmae.engine.loop import accumulate, optimizer_step
    from fcmae.engine.optim import build_adamw, skips_on_device
    from fcmae.pretrain import PretrainTask
    from fcmae.pretrain_config import PretrainConfig
    from imagegen import make_imagefolder

    make_imagefolder(str(tmp_path / "data"), classes=1, per_class=32, size=96)
    cfg = load_config(PretrainConfig, None, [
        "device=cuda", f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "model.decoder_dim=64",
        "data.image_size=64", "data.batch_size=8", "data.num_workers=0", "model.patch_size=16"])
    info = DistInfo(device=torch.device("cuda", torch.cuda.current_device()))
    task = PretrainTask(cfg, info)
    model = task.model.to(info.device)
    optimizer = build_adamw(task.param_groups(0.05), 1e-3, (0.9, 0.95), info.device)
    assert skips_on_device(optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batches = iter(task.batches(0, 0))

    def step(i: int) -> torch.Tensor:
        stats, _ = accumulate(task, model, model, batches, scaler, torch.bfloat16, info, 1, 0, i, i, None)
        optimizer_step(optimizer, scaler, model, stats, None, skip_on_device=True)
        return stats

    step(0)  # the first step makes the normalisation constants and cuDNN's plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [step(i) for i in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = torch.stack(stats)[:, 0].tolist()
    assert all(0 < x < 10 for x in losses), losses
