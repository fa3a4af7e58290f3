"""Layer decay scales against the tables of docs/method.md's fine-tuning table, written out by hand for tiny (single) and base (group)."""
import pytest
import torch

from convnextv2 import create_encoder
from fcmae.layer_decay import param_groups


def scales_by_name(model, ld, scheme):
    out = {}
    for g in param_groups(model, 0.05, ld, scheme):
        for n in g["param_names"]:
            out[n] = (g["lr_scale"], g["weight_decay"])
    return out


def test_tiny_single_09():
    model = create_encoder("convnextv2_tiny", num_classes=10)  # depths 3,3,9,3 -> 18 layers, head id 19
    s = scales_by_name(model, 0.9, "single")
    assert s["stem.0.weight"][0] == pytest.approx(0.9 ** 18)            # stem id 1
    assert s["stages.0.blocks.0.conv_dw.weight"][0] == pytest.approx(0.9 ** 18)
    assert s["stages.0.blocks.2.mlp.fc1.weight"][0] == pytest.approx(0.9 ** 16)  # id 3
    assert s["stages.1.downsample.1.weight"][0] == pytest.approx(0.9 ** 15)      # = stage 1 block 0, id 4
    assert s["stages.1.blocks.0.mlp.fc2.weight"][0] == pytest.approx(0.9 ** 15)
    assert s["stages.2.downsample.1.weight"][0] == pytest.approx(0.9 ** 12)      # id 7
    assert s["stages.2.blocks.8.conv_dw.weight"][0] == pytest.approx(0.9 ** 4)   # id 15
    assert s["stages.3.blocks.2.mlp.fc2.weight"][0] == pytest.approx(0.9 ** 1)   # id 18
    assert s["head.fc.weight"][0] == 1.0 and s["head.norm.weight"][0] == 1.0     # id 19


def test_base_group_06():
    model = create_encoder("convnextv2_base", num_classes=10)  # depths 3,3,27,3; 12 groups, head 13
    s = scales_by_name(model, 0.6, "group")
    expect = {
        "stem.0.weight": 13, "stages.0.blocks.2.conv_dw.weight": 12, "stages.1.downsample.1.weight": 11,
        "stages.1.blocks.2.mlp.fc1.weight": 11, "stages.2.downsample.1.weight": 10,
        "stages.2.blocks.0.mlp.fc1.weight": 10, "stages.2.blocks.2.mlp.fc1.weight": 10,
        "stages.2.blocks.3.mlp.fc1.weight": 9, "stages.2.blocks.26.mlp.fc1.weight": 2,
        "stages.3.downsample.1.weight": 1, "stages.3.blocks.2.mlp.fc2.weight": 1, "head.fc.weight": 0,
    }
    for name, power in expect.items():
        assert s[name][0] == pytest.approx(0.6 ** power), name


def test_no_weight_decay_on_bias_norm_grn():
    model = create_encoder("convnextv2_atto", num_classes=10)
    s = scales_by_name(model, 0.9, "single")
    for name, p in model.named_parameters():
        wd = s[name][1]
        if name.endswith(".bias") or ".grn." in name or p.ndim == 1:
            assert wd == 0.0, name
        else:
            assert wd == 0.05, name
    assert s["stages.0.blocks.0.mlp.grn.weight"][1] == 0.0
    assert s["stages.0.blocks.0.mlp.fc1.weight"][1] == 0.05


def test_every_trainable_param_in_exactly_one_group():
    model = create_encoder("convnextv2_atto", num_classes=10)
    groups = param_groups(model, 0.05, 0.9, "single")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


def test_bad_scheme_and_decay():
    model = create_encoder("convnextv2_atto", num_classes=10)
    with pytest.raises(ValueError, match="unknown layer decay scheme 'layer'"):
        param_groups(model, 0.05, 0.9, "layer")
    with pytest.raises(ValueError, match="layer_decay must be in"):
        param_groups(model, 0.05, 1.5, "single")
