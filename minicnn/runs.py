"""Reading a run directory back: ``run = load_run("runs/x")`` for notebooks, plots and the CLI."""
import json
import os
from dataclasses import dataclass

from .errors import DataError
from .trace import read_trace


@dataclass
class Run:
    path: str
    config: dict          # config.json: {"config": TrainConfig fields, "spec": ..., ...}
    steps: dict           # steps.csv as column -> numpy array
    evals: dict           # evals.csv as column -> numpy array
    summary: dict         # summary.json ({} while a run is still going or was killed hard)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))


def load_run(path):
    """Load config, per-step trace, evaluations and summary of a run directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise DataError(f"not a run directory: {path} (no config.json); give a folder written by 'minicnn train --out'")
    with open(cfg_path) as f:
        config = json.load(f)
    summary = {}
    if os.path.isfile(os.path.join(path, "summary.json")):
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
    steps = read_trace(os.path.join(path, "steps.csv")) if os.path.isfile(os.path.join(path, "steps.csv")) else {}
    evals = read_trace(os.path.join(path, "evals.csv")) if os.path.isfile(os.path.join(path, "evals.csv")) else {}
    return Run(path, config, steps, evals, summary)
