"""Every load line fcmae prints or documents runs as printed, pasted into a fresh Python process, and gives the logits
and the top-1 of `fcmae eval` on the same images: `fcmae convert`'s for 1 / 3 / 4 channels x patch 32 / 16 / 8,
`fcmae finetune`'s (the demo recipe: grey, patch 16) and README's; `local-dir:` reads the fine-tune's run folder."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import randomize_grn, rel_err
from convnextv2 import create_convnextv2
from fcmae.cli import main
from fcmae.config import from_dict
from fcmae.evaluate import EvalConfig, eval_dataset, load_classifier
from fresh import logits_script, run_fresh
from imagegen import make_imagefolder
from readme import code_block

LAYOUTS = [(in_chans, patch) for patch in (32, 16, 8) for in_chans in (1, 3, 4)]
K = 3  # classes
DIGITS = ["data.format=digits", "data.digits_per_class=2", "data.digits_val=50"]


def eval_inputs(data: dict, in_chans: int, path: str) -> torch.Tensor:
    """The images `fcmae eval` reads with these data keys, as it transforms them -> saved to `path`; their labels."""
    dataset, _ = eval_dataset(from_dict(EvalConfig, {"data": data}).data, None, in_chans)
    items = [dataset[i] for i in range(len(dataset))]
    torch.save(torch.stack([item[0] for item in items]), path)
    return torch.tensor([int(item[1]) for item in items])


def eval_top1(argv: list[str], capsys, said: str = "") -> float:
    """`fcmae eval ARGV`'s top-1 (its output must contain `said`)."""
    assert main(["eval", *argv, "data.num_workers=0", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert said in out, out
    return float(out.split("top-1 ", 1)[1].split()[0])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def check_logits(path: str, logits_file: str, inputs_file: str, labels: torch.Tensor, top1_of_eval: float) -> None:
    """The pasted line's logits == those of the model `fcmae eval` loads from `path`; and the same top-1."""
    pasted = torch.load(logits_file)
    model, _ = load_classifier(path)
    with torch.no_grad():
        ours = model.eval()(torch.load(inputs_file))
    assert pasted.shape == ours.shape and rel_err(pasted, ours) <= 1e-6, path
    assert top1(pasted, labels) == pytest.approx(top1_of_eval, abs=0.005), path


def test_convert_lines_run_for_every_layout(tmp_path, capsys):
    """3 classifiers per patch size (1 / 3 / 4 channels, every parameter random), converted; each printed line pasted
    in a fresh process: patch 32's without convnextv2 ever imported, 16's and 8's importing it themselves."""
    images = tmp_path / "val"
    make_imagefolder(str(images), classes=K, per_class=2, size=72)
    data = {"path": str(images), "image_size": 64}
    labels, inputs, jobs = {}, {}, {32: [], 16: [], 8: []}
    for in_chans in (1, 3, 4):
        inputs[in_chans] = str(tmp_path / f"inputs{in_chans}.pt")
        labels[in_chans] = eval_inputs(data, in_chans, inputs[in_chans])
    for in_chans, patch in LAYOUTS:
        model = create_convnextv2("convnextv2_atto", patch, in_chans=in_chans, num_classes=K)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        src, dst = tmp_path / f"src{in_chans}-{patch}.pt", str(tmp_path / f"c{in_chans}-p{patch}.safetensors")
        torch.save(randomize_grn(model).state_dict(), src)
        assert main(["convert", str(src), dst]) == 0
        line = capsys.readouterr().out.split("  load: ", 1)[1].strip()
        assert f"in_chans={in_chans}" in line and line.startswith(
            "import timm;" if patch == 32 else "import convnextv2, timm;"), line
        jobs[patch].append((line, inputs[in_chans], dst + ".logits"))
    for patch, pasted in jobs.items():
        imported = run_fresh(logits_script(pasted), tmp_path).split()
        assert imported == ["False", str(patch != 32)], imported  # plain timm suffices at 32; 16 / 8 import convnextv2
    for in_chans, patch in LAYOUTS:
        dst = str(tmp_path / f"c{in_chans}-p{patch}.safetensors")
        top1_of_eval = eval_top1([dst, f"data.path={images}", "data.image_size=64"], capsys)
        check_logits(dst, dst + ".logits", inputs[in_chans], labels[in_chans], top1_of_eval)


@pytest.fixture(scope="module")
def demo_finetune(tmp_path_factory):
    """`fcmae finetune --config finetune/demo` (grey digits, patch 16) shortened, in its default runs/demo-finetune,
    and the load line it printed."""
    root = tmp_path_factory.mktemp("demo-finetune")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["finetune", "--config", "finetune/demo", "optim.epochs=1", "data.batch_size=20",
                         "data.eval_batch_size=50", *DIGITS]) == 0
    finally:
        os.chdir(cwd)
    return root, out.getvalue().split("load in timm:\n", 1)[1].splitlines()[0].strip()


def test_finetune_line_and_readme_lines_run(demo_finetune, capsys):
    """fine-tune's printed line and README's (local-dir: of the run folder, the EMA file), pasted in one fresh process:
    the logits of `fcmae eval` of model.safetensors / model-ema.safetensors, and its top-1."""
    root, line = demo_finetune
    run = root / "runs" / "demo-finetune"
    assert line.startswith("import convnextv2, timm; model = timm.create_model('convnextv2_atto_s16', in_chans=1, "
                           "num_classes=10, ") and "input_size=(1, 64, 64)" in line
    data = {"format": "digits", "digits_per_class": 2, "digits_val": 50, "image_size": 64, "crop_pct": 0.875}
    labels = eval_inputs(data, 1, str(root / "inputs.pt"))
    readme = code_block("## Fine-tuning and evaluation (`fcmae finetune`, `fcmae eval`)")
    script = logits_script([(line, "inputs.pt", "printed.logits")]) + f"""
from PIL import Image
scope = {{}}
exec({readme!r}, scope)
x = torch.load("inputs.pt")
with torch.no_grad():
    torch.save(scope["model"].eval()(x), "readme-local-dir.logits")
    torch.save(scope["ema"].eval()(x), "readme-ema.logits")
print(tuple(scope["transform"](Image.new("L", (90, 70))).shape))
"""
    out = run_fresh(script, root).split("\n")
    assert out[0] == "False True" and out[1] == "(1, 64, 64)", out  # the eval transform read from config.json
    for name, logits in (("model.safetensors", "printed.logits"), ("model.safetensors", "readme-local-dir.logits"),
                         ("model-ema.safetensors", "readme-ema.logits")):
        top1_of_eval = eval_top1([str(run / name), *DIGITS], capsys, said="metadata: 64 px, crop_pct 0.875")
        check_logits(str(run / name), str(root / logits), str(root / "inputs.pt"), labels, top1_of_eval)
