"""A training run's folder, the same for every trainer (VLM adapter, baselines, sentence VAE):

    run_config.json   the run's settings; re-running into the folder resumes only the same run
    checkpoint.pt     what resuming needs: step, trainable tensors, optimiser and schedule state, the log, extras
    train_log.json    per-step records and held-out evaluations (also copied into `best/`, so the store keeps it)
    <plot>.png        the trainer's picture of the log (`loss_curve.png`, `vae_curves.png`)
    best/             the export of the best evaluation so far (the trainer's `export`, through
                      `hub.store.export`: staged beside it and swapped in atomically), which `hub publish` reads
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch

from hub.errors import HubError
from hub.store.layout import TRAIN_LOG
from hub.training.optimization import Optimization

RUN_CONFIG = "run_config.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best"


class RunConfig(Protocol):
    """A trainer's settings, a dataclass; `RESUMES_WITH` names the ones a resumed run must keep."""

    RESUMES_WITH: ClassVar[tuple[str, ...]]
    __dataclass_fields__: ClassVar[dict[str, Any]]


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def best(self) -> Path:
        return self.path / BEST

    def prepare(self, config: RunConfig) -> "RunDir":
        """Create the folder and write `run_config.json`, or check that an existing one holds the same run (so it
        resumes); a clear error before anything is written otherwise."""
        config_path = self.path / RUN_CONFIG
        if config_path.exists():
            self._check_same_run(config, json.loads(config_path.read_text()))
        elif self.path.exists() and any(self.path.iterdir()):
            raise HubError(f"{self.path} exists and is not a run directory; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        return self

    def _check_same_run(self, config: RunConfig, stored: dict[str, Any]) -> None:
        try:
            previous = type(config)(**stored)
        except TypeError:  # settings this version does not know
            raise HubError(f"{self.path} holds another run (written by another version); choose another "
                           f"--out") from None
        differ = [k for k in config.RESUMES_WITH if getattr(config, k) != getattr(previous, k)]
        if differ:
            held = ", ".join(f"{k} {getattr(previous, k)!r}" for k in differ)
            raise HubError(f"{self.path} holds another run ({held}); choose another --out")

    # -- resuming --------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], optimization: Optimization,
                        log: dict[str, Any], **extra: Any) -> None:
        """`checkpoint.pt` (with any `extra` state, e.g. regularisers'), replaced atomically."""
        state = {"step": step, "trainable": trainable, **optimization.state_dict(), "log": log, **extra}
        tmp = self.path / f"{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        tmp.replace(self.path / CHECKPOINT)

    def resume(self, device: torch.device, optimization: Optimization) -> dict[str, Any] | None:
        """Restore the optimiser and schedule from `checkpoint.pt` and return the state (None: a fresh run)."""
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        state = torch.load(path, map_location=device, weights_only=True)
        optimization.load_state_dict(state)
        print(f"resuming {self.path} from step {state['step']}")
        return state

    # -- what a run shows ------------------------------------------------------------------------------------
    def write_log(self, log: dict[str, Any], plot_name: str, plot: Callable[[dict[str, Any]], bytes]) -> None:
        """`train_log.json`, in the folder and in `best/` when there is one (`hub publish` stores it with the
        version: `hub show NAME --plot`), and `plot_name`, the trainer's picture of it."""
        text = json.dumps(log, indent=1)
        (self.path / TRAIN_LOG).write_text(text)
        if self.best.is_dir():
            (self.best / TRAIN_LOG).write_text(text)
        (self.path / plot_name).write_bytes(plot(log))

