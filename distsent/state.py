"""The train state: where a run stands (step, data position, best model), saved in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    batch_in_epoch: int = 0  # global batches of the current epoch done: the data position a resume continues from
    samples_seen: int = 0
    best_val_acc: float = -1.0  # the selection metric of the model in best/
    best_step: int = -1  # -1: no evaluation yet
    evals_since_best: int = 0  # evaluations in a row without a better model (early stopping)
    stopped_early: bool = False
    world_size: int = 1  # processes that trained the last step
    run_id: str = ""  # the tracker run, continued by a resumed run
    resumed_from: str = ""  # the checkpoint.resume path this run's line descends from (a rollback or a branch)
    world_size_changes: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall-clock seconds of the run's launches up to this checkpoint (time/elapsed_s goes on)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Update in place (holders of this object see the restored values); keys a checkpoint written by an
        earlier version lacks keep their defaults."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"unknown train state keys {unknown}")
        for name, value in saved.items():
            setattr(self, name, value)

    def record_eval(self, acc: float) -> bool:
        """Note one evaluation's selection metric; True if it is the best so far."""
        if acc > self.best_val_acc:
            self.best_val_acc, self.best_step, self.evals_since_best = acc, self.step, 0
            return True
        self.evals_since_best += 1
        return False
