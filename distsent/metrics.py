"""Metrics: one evaluation implementation (torchmetrics) for training-time evaluation and distsent-evaluate, and
the running training sums behind each logged row.

Keys, everywhere (metrics.jsonl with a val/ or test/ prefix, W&B, distsent-evaluate's JSON): n, loss, acc, f1,
roc_auc, ece (top-label expected calibration error over 15 equal-width bins), tp, fp, tn, fn, and acc_<head> for
each classifier head when there is more than one. A review is called positive when its logit is above 0
(probability above 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


class EvalMetrics:
    """One evaluation pass. Each process updates with its own reviews; compute() gathers the states of every
    process (torchmetrics syncs over torch.distributed), so every process gets the same figures."""

    def __init__(self, device, head_names: tuple[str, ...] = ("rnn",)):
        from torchmetrics import SumMetric
        from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryConfusionMatrix,
                                                 MulticlassCalibrationError)

        # validate_args=False, nan_strategy="disable": their checks read values on the host, a GPU sync per batch
        self.confusion = BinaryConfusionMatrix(validate_args=False).to(device)
        # exact (thresholds=None): ties count half, as in the rank statistic
        self.auroc = BinaryAUROC(validate_args=False).to(device)
        # top-label calibration: the classes' probabilities [1 - p, p], confidence = the larger one
        self.ece = MulticlassCalibrationError(num_classes=2, n_bins=ECE_BINS, norm="l1", validate_args=False).to(device)
        # float64: 25,000 reviews' losses summed in float32 would lose digits
        self.loss = SumMetric(nan_strategy="disable").to(device).set_dtype(torch.float64)
        self.heads = {name: BinaryAccuracy(validate_args=False).to(device).set_dtype(torch.float64)
                      for name in head_names} if len(head_names) > 1 else {}

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, head_logits: torch.Tensor | None = None) -> None:
        """logits [n] of the model, labels [n] in {0, 1}, head_logits [n, heads] when there are several heads."""
        # probabilities, never logits: torchmetrics would take a batch of logits that happen to lie in [0, 1] for
        # probabilities; in float64, where float32 would round confident ones to exactly 1 and tie them
        logits, target = logits.double(), labels.long()
        p = torch.sigmoid(logits)
        self.confusion.update(p, target)
        self.auroc.update(p, target)
        self.ece.update(torch.stack([1 - p, p], dim=1), target)
        self.loss.update(F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum"))
        for i, metric in enumerate(self.heads.values()):
            metric.update(torch.sigmoid(head_logits[:, i].float()), target)

    def compute(self) -> dict:
        """Collective under DDP: every process must call it."""
        (tn, fp), (fn, tp) = self.confusion.compute().tolist()
        n = tn + fp + fn + tp
        out = {"n": n, "loss": float(self.loss.compute()) / max(n, 1), "acc": (tp + tn) / max(n, 1),
               "f1": 2 * tp / max(1, 2 * tp + fp + fn), "roc_auc": None, "ece": float(self.ece.compute()),
               "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        if 0 < tp + fn < n:  # ROC-AUC needs both classes
            out["roc_auc"] = float(self.auroc.compute())
        out.update({f"acc_{name}": float(m.compute()) for name, m in self.heads.items()})
        return out


def score(p_positive, labels) -> dict:
    """The metrics of probabilities against labels in one process, plus the reliability table behind the ECE."""
    p, y = torch.as_tensor(np.asarray(p_positive, np.float64)), torch.as_tensor(np.asarray(labels, np.int64))
    m = EvalMetrics("cpu")
    m.update(torch.logit(p, eps=1e-12), y)  # p of exactly 0 or 1 keeps a finite loss
    return {**m.compute(), "reliability": reliability(p, y)}


def reliability(p_positive: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per confidence bin (the ECE's bins: [k/15, (k+1)/15), and 1.0 alone): reviews, mean confidence, accuracy.
    The bin-share-weighted gap between the last two is the ECE (tested against torchmetrics' figure)."""
    p, y = p_positive.double(), labels.long()
    pred = (p > 0.5).long()
    conf = torch.where(pred == 1, p, 1 - p)
    edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64)
    which = torch.bucketize(conf, edges, right=True) - 1
    table = []
    for b in which.unique().tolist():
        m = which == b
        table.append({"lo": float(edges[b]), "hi": float(edges[min(b + 1, ECE_BINS)]), "n": int(m.sum()),
                      "confidence": float(conf[m].mean()), "accuracy": float((pred[m] == y[m]).double().mean())})
    return table


class TrainSums:
    """Training metrics since the last logged row, summed on the device so that a step never waits for the host;
    added up over processes when a row is logged. Saved in checkpoints so a resumed run logs the same rows."""

    KEYS = ("loss", "correct", "samples", "tokens", "grad_norm", "clipped", "steps", "skipped")

    def __init__(self, accelerator):
        self.acc = accelerator
        self.reset()

    def reset(self) -> None:
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=self.acc.device) for k in self.KEYS}

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] += v

    def totals(self) -> dict:
        """Collective: the sums over all processes."""
        reduced = self.acc.reduce(torch.stack([self.sums[k] for k in self.KEYS]), "sum")
        return dict(zip(self.KEYS, reduced.tolist()))

    def row(self, seconds: float, samples: int) -> dict:
        """Collective: the logged training metrics since the last reset, over `seconds` and `samples`."""
        totals = self.totals()
        steps, n = max(1.0, totals["steps"]), max(totals["samples"], 1)
        return {"train/loss": totals["loss"] / n, "train/acc": totals["correct"] / n,
                "grad_norm": totals["grad_norm"] / steps, "clip_fraction": totals["clipped"] / steps,
                "skipped_steps": totals["skipped"],  # fp16 steps the gradient scaler skipped (inf/NaN gradients)
                "throughput/samples_per_s": samples / max(seconds, 1e-9),
                "throughput/tokens_per_s": totals["tokens"] / max(seconds, 1e-9)}

    def state_dict(self) -> dict:
        return self.totals()

    def load_state_dict(self, saved: dict) -> None:
        """The main process holds the saved totals, the others start from zero: totals() adds them up."""
        self.reset()
        if self.acc.is_main_process:
            for k, v in saved.items():  # a checkpoint of an earlier version may lack a key: it stays 0
                self.sums[k] += v


# Exit status of distsent-train when a non-finite loss or gradient stopped the run (2: a bad config, data or
# checkpoint; 75: preempted).
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm; the message names the step and the quantity."""


class NonFiniteWatch:
    """The first step whose training loss or gradient norm was not finite, kept on the device, so that a step
    never waits for the host; check() reads it where the run synchronizes anyway (a logged row, an evaluation, a
    checkpoint), before anything is written from the weights."""

    QUANTITIES = ("training loss", "gradient norm")

    def __init__(self, accelerator):
        self.acc = accelerator
        # under fp16 the gradient scaler skips steps with inf/NaN gradients instead (counted as skipped_steps)
        self.enabled = accelerator.scaler is None
        self.first = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # 0: none so far

    def see(self, step: int, loss: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None) -> None:
        if not self.enabled:
            return
        for i, value in enumerate((loss, grad_norm)):
            if value is not None:
                bad = ~torch.isfinite(value.detach())
                self.first[i] = torch.where(bad & (self.first[i] == 0), float(step), self.first[i])

    def check(self) -> None:
        """Collective: NonFiniteError on every process if any process saw a non-finite value."""
        if not self.enabled:
            return
        seen = self.acc.gather(self.first.unsqueeze(0)).cpu()  # [processes, quantities]
        found = []
        for i, name in enumerate(self.QUANTITIES):
            steps = seen[:, i][seen[:, i] > 0]
            if steps.numel():
                found.append(f"{name} at step {int(steps.min())}")
        if found:
            raise NonFiniteError(
                "non-finite " + " and ".join(found) + ": the run stopped before writing anything from these weights "
                "(the last checkpoint and best/ are from before). Check the data and any pretrained embeddings, or "
                "lower optim.lr or optim.clip_grad_norm; resuming as it is repeats the same steps.")
