"""Engine pieces: weight-decay groups and the warmup + cosine schedule (SPEC §2 formulas)."""
import math

from fcmae.engine.optim import build_adamw, cosine_lr, param_groups, scaled_lr
from fcmae.model import FCMAE


def test_no_decay_on_bias_1d_and_mask_token():
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    groups = {g["weight_decay"]: g["param_names"] for g in param_groups(model, 0.05, ["decoder.mask_token"])}
    assert set(groups) == {0.0, 0.05}
    params = dict(model.named_parameters())
    for name in groups[0.05]:
        assert params[name].ndim > 1 and not name.endswith(".bias") and name != "decoder.mask_token"
    assert "decoder.mask_token" in groups[0.0] and "encoder.stages.0.blocks.0.mlp.grn.weight" in groups[0.0]
    assert not any(n.startswith("encoder.head") for g in groups.values() for n in g)  # frozen, unused
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(groups[0.0]) | set(groups[0.05]) == trainable
    opt = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_lr_schedule():
    assert scaled_lr(1.5e-4, 4096) == 1.5e-4 * 16
    base, total, warm = 2.4e-3, 1000, 50
    assert cosine_lr(0, total, warm, base) == 0.0
    assert math.isclose(cosine_lr(25, total, warm, base), base / 2)
    assert math.isclose(cosine_lr(warm, total, warm, base), base)
    mid = warm + (total - warm) // 2
    assert math.isclose(cosine_lr(mid, total, warm, base, 1e-6), 1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(cosine_lr(total, total, warm, base, 1e-6), 1e-6)
