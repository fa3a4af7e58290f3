"""The MLflow tracker (`log.mlflow=true`; fcmae.engine.trackers): an MLflow run through `MlflowClient`, so a
run the user has open in the same process (mlflow.start_run) is left alone."""
from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from fcmae.config import flatten
from fcmae.engine.trackers import run_name

if TYPE_CHECKING:
    from fcmae.engine.config import RunConfig


def as_params(config: dict[str, Any]) -> dict[str, str]:
    """{"optim": {"epochs": 1}} -> {"optim.epochs": "1"}: MLflow params are text (YAML/JSON spelling)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(config).items()}


class MlflowTracker:
    """Params: the resolved config as dotted keys (logged once: MLflow params never change, so a key a resumed run
    changes is the tag `config.KEY`); metrics `{kind}/{name}` at the optimizer step; pictures as artifacts under
    `reconstructions/`; the final files as `output.NAME` tags (their paths)."""
    label = "MLflow tracking"

    def __init__(self, cfg: RunConfig, config: dict[str, Any], stored: dict[str, Any] | None):
        uri = cfg.log.mlflow_uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        self.client = MlflowClient(uri)
        params = as_params(config)
        self.reopened = bool(stored) and stored.get("tracking_uri") == uri and bool(stored.get("run_id"))
        if self.reopened:
            run = self.client.get_run(stored["run_id"])
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.log_changes(params, run.data.params, run.data.tags)
        else:
            experiment = self.experiment_id(cfg.log.experiment)
            self.run_id = self.client.create_run(experiment, run_name=run_name(cfg), tags={
                "fcmae.output_dir": os.path.abspath(cfg.output_dir)}).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.state = {"run_id": self.run_id, "tracking_uri": uri}
        print(f"MLflow run {self.run_id} ({'continued' if self.reopened else 'new'}) in experiment "
              f"{cfg.log.experiment!r} at {uri}", flush=True)

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def log_changes(self, params: dict[str, str], logged: dict[str, str], tags: dict[str, str]) -> None:
        """A resumed run's config: new keys become params, changed ones (and ones changed before) `config.KEY` tags."""
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"config.{k}", v) for k, v in params.items()
                   if k in logged and (v != logged[k] or f"config.{k}" in tags)]
        self.client.log_batch(self.run_id, params=new, tags=changed)

    def log(self, kind: str, step: int, numbers: dict[str, float], images: dict[str, str]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{kind}/{k}", float(v), now, step)
                                                    for k, v in numbers.items()])
        for path in images.values():
            self.client.log_artifact(self.run_id, path, artifact_path="reconstructions")

    def log_outputs(self, paths: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(f"output.{k}", v) for k, v in paths.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status.upper())  # FINISHED / FAILED / KILLED
