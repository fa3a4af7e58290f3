"""Pretraining and fine-tuning from Python, with the commands' own config loading:

    from fcmae.api import pretrain, finetune
    run = pretrain("pretrain/tiny", output_dir="runs/tiny", data={"path": "/data/train"}, optim={"epochs": 100})
    ft = finetune("tiny", model={"init": run.checkpoint}, data={"path": "/data/imagenet"}, output_dir="runs/ft")
    ft.metrics["top1"], ft.files["model"]

`config` is what `--config` takes (a YAML path or a recipe name); keyword arguments are top-level keys, a section
as a dict (`optim={"epochs": 1}`); `overrides` takes dotted keys ({"optim.epochs": 1}). Both become the commands'
`key=value` overrides, so a bad key or value fails the same way, with the same message, before anything runs.
(These live in fcmae.api, not as `fcmae.pretrain`: that name is the library module they call.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """What a run left: its directory, final metrics (the command's summary) and resolved config.

    metrics: pretrain: epoch, step, loss (last epoch's mean), skipped; finetune adds top1, top5, ema_top1,
    ema_top5, best_top1, best_ema_top1 and `best` (the best epochs).
    """
    run_dir: Path
    metrics: dict[str, Any]
    config: Any
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        """The run's last checkpoint (`model.init` of a fine-tuning takes it as it is)."""
        return self.run_dir / "last.pt"


def as_overrides(overrides: dict[str, Any] | None = None, **keys: Any) -> list[str]:
    """{"optim.epochs": 1}, optim={"lr": 1e-3} -> ["optim.epochs=1", "optim.lr=0.001"] (values as JSON, which the
    commands read as YAML: strings, numbers, lists, null survive exactly)."""
    def flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
        if isinstance(value, dict):
            return [kv for k, v in value.items() for kv in flat(f"{prefix}.{k}", v)]
        return [(prefix, value)]

    pairs = [kv for k, v in {**(overrides or {}), **keys}.items() for kv in flat(k, v)]
    return [f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in pairs]


def _config(schema: type, kind: str, config: str | Path | None, overrides: dict | None, keys: dict) -> Any:
    from fcmae.config import load_config
    from fcmae.recipes import find_config

    path = find_config(config, kind) if config is not None else None
    return load_config(schema, path, as_overrides(overrides, **keys))


def pretrain(config: str | Path | None = None, overrides: dict[str, Any] | None = None, **keys: Any) -> Run:
    """`fcmae pretrain --config CONFIG key=value ...` in this process -> Run (run_dir = output_dir)."""
    from fcmae.pretrain import pretrain as run
    from fcmae.pretrain_config import PretrainConfig

    cfg = _config(PretrainConfig, "pretrain", config, overrides, keys)
    metrics = run(cfg)
    return Run(Path(cfg.output_dir), metrics, cfg, {"last": Path(cfg.output_dir) / "last.pt"})


def finetune(config: str | Path | None = None, overrides: dict[str, Any] | None = None, **keys: Any) -> Run:
    """`fcmae finetune --config CONFIG key=value ...` in this process -> Run; files: the exported weights
    (model, ema) and the best checkpoints."""
    from fcmae.finetune import finetune as run
    from fcmae.finetune_config import FinetuneConfig

    cfg = _config(FinetuneConfig, "finetune", config, overrides, keys)
    metrics = run(cfg)
    out = Path(cfg.output_dir)
    files = {k: Path(v) for k, v in metrics.get("exported", {}).items()}
    files.update({name: out / f"{name}.pt" for name in ("best", "best-ema", "last") if (out / f"{name}.pt").exists()})
    return Run(out, metrics, cfg, files)
