"""The Weights & Biases tracker (`log.wandb=true`; fcmae.engine.trackers): a run of its own (`reinit="create_new"`),
so a run the user has open in the same process (wandb.init) is left alone; its files are in {output_dir}/wandb/."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import wandb

from fcmae.engine.trackers import run_name

if TYPE_CHECKING:
    from fcmae.engine.config import RunConfig


class WandbTracker:
    """Config: the resolved config (nested; a resumed run's changes update it); history `{kind}/{name}` at the
    optimizer step (W&B's `_step`) and the pictures as `wandb.Image`s; the final files' paths in the summary
    (`output/NAME`)."""
    label = "W&B tracking"

    def __init__(self, cfg: RunConfig, config: dict[str, Any], stored: dict[str, Any] | None):
        project = cfg.log.experiment
        run_id = stored.get("id") if stored and stored.get("project") == project else None
        self.reopened = run_id is not None
        self.run = wandb.init(project=project, name=run_name(cfg), dir=cfg.output_dir, id=run_id,
                              resume="allow" if self.reopened else None, config=None if self.reopened else config,
                              reinit="create_new")
        if self.reopened:
            self.run.config.update(config, allow_val_change=True)
        self.state = {"id": self.run.id, "project": project}
        where = os.path.dirname(self.run.dir) if self.run.offline else self.run.url  # dir: the run folder's files/
        print(f"W&B run {self.run.id} ({'continued' if self.reopened else 'new'}) in project {project!r}: {where}",
              flush=True)

    def log(self, kind: str, step: int, numbers: dict[str, float], images: dict[str, str]) -> None:
        row: dict[str, Any] = {f"{kind}/{k}": v for k, v in numbers.items()}
        row.update({name: wandb.Image(path) for name, path in images.items()})
        self.run.log(row, step=step)

    def log_outputs(self, paths: dict[str, str]) -> None:
        self.run.summary.update({f"output/{k}": v for k, v in paths.items()})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
