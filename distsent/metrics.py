"""Metrics: one evaluation implementation (torchmetrics) for training-time evaluation and distsent-evaluate, and
the running training sums behind each logged row.

Keys, everywhere (metrics.jsonl with a val/ or test/ prefix, W&B, distsent-evaluate's JSON): n, loss, acc, macro_f1,
ece (top-label expected calibration error over 15 equal-width bins, as torchmetrics bins it), precision/<class>,
recall/<class>, f1/<class>, support/<class>, confusion (rows: true class, columns: predicted; W&B gets it as a chart,
for validation); for two classes also f1 and roc_auc of the positive class (the second class, label 1, whatever its
name), tp, fp, tn, fn, and acc_<head> for each classifier head when there is more than one. Two classes: a review is
called positive when its logit is above 0 (probability above 0.5); C classes: the most probable class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .model import predicted_class

ECE_BINS = 15


class Calibration(Metric):
    """Top-label calibration in float64, summed over processes: per confidence bin ([k/15, (k+1)/15), and 1.0
    alone) the reviews, their summed confidence and their correct predictions. The ECE and the reliability table
    both come from these sums. (torchmetrics' MulticlassCalibrationError rounds confidences to float32: one above
    1 - 3e-8 fell into the 1.0 bin there and into the last bin of the table, and the two disagreed.)"""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sums", torch.zeros(3, ECE_BINS + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        conf, pred = probs.double().max(dim=1)
        edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64, device=conf.device)
        which = torch.bucketize(conf, edges, right=True) - 1
        self.sums.index_add_(1, which, torch.stack([torch.ones_like(conf), conf, (pred == target).double()]))

    def compute(self) -> torch.Tensor:
        """The ECE: each bin's |mean confidence - accuracy| weighted by its share of the reviews."""
        n, confidence, correct = self.sums
        return (confidence - correct).abs().sum() / n.sum().clamp(min=1)

    def table(self) -> list[dict]:
        """Per bin that holds reviews: its edges, reviews, mean confidence and accuracy."""
        n, confidence, correct = self.sums.cpu()
        return [{"lo": b / ECE_BINS, "hi": min(b + 1, ECE_BINS) / ECE_BINS, "n": int(n[b]),
                 "confidence": float(confidence[b] / n[b]), "accuracy": float(correct[b] / n[b])}
                for b in range(ECE_BINS + 1) if n[b] > 0]


class EvalMetrics:
    """One evaluation pass. Each process updates with its own reviews; compute() gathers the states of every
    process (torchmetrics syncs over torch.distributed), so every process gets the same figures."""

    def __init__(self, device, classes: list[str], head_names: tuple[str, ...] = ("rnn",)):
        from torchmetrics import SumMetric
        from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryConfusionMatrix, MulticlassAccuracy,
                                                 MulticlassConfusionMatrix)

        self.classes, self.binary = list(classes), len(classes) == 2
        c = len(classes)
        # validate_args=False, nan_strategy="disable": their checks read values on the host, a GPU sync per batch
        self.confusion = (BinaryConfusionMatrix(validate_args=False) if self.binary else
                          MulticlassConfusionMatrix(num_classes=c, validate_args=False)).to(device)
        # exact (thresholds=None): ties count half, as in the rank statistic
        self.auroc = BinaryAUROC(validate_args=False).to(device) if self.binary else None
        if self.auroc is not None:  # typed from the start: a process given no reviews (a split smaller than the
            # number of processes) would otherwise send float32 placeholders to the others' float64, and gloo aborts
            self.auroc.update(torch.empty(0, dtype=torch.float64, device=device),
                              torch.empty(0, dtype=torch.long, device=device))
        # top-label calibration: confidence = the largest class probability (two classes: [1 - p, p])
        self.ece = Calibration().to(device)
        # float64: 25,000 reviews' losses summed in float32 would lose digits
        self.loss = SumMetric(nan_strategy="disable").to(device).set_dtype(torch.float64)
        def accuracy():
            return (BinaryAccuracy(validate_args=False) if self.binary else
                    MulticlassAccuracy(num_classes=c, average="micro", validate_args=False))

        self.heads = {name: accuracy().to(device).set_dtype(torch.float64)
                      for name in head_names} if len(head_names) > 1 else {}

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, head_logits: torch.Tensor | None = None) -> None:
        """logits of the model ([n], or [n, C] for C classes), labels [n] class indices, head_logits [n, heads]
        (or [n, heads, C]) when there are several heads."""
        # probabilities, never logits: torchmetrics would take a batch of logits that happen to lie in [0, 1] for
        # probabilities; in float64, where float32 would round confident ones to exactly 1 and tie them
        logits, target = logits.double(), labels.long()
        c = len(self.classes)
        self.confusion.update(predicted_class(logits, c), target)  # the model's own rule, as training's accuracy
        if self.binary:
            p = torch.sigmoid(logits)
            # ROC-AUC depends on the logits' order only: asinh keeps it (and the sigmoid the scores inside (0, 1),
            # as torchmetrics wants) where the sigmoid alone rounds every logit above about 37 to 1.0, a tie
            self.auroc.update(torch.sigmoid(torch.asinh(logits)), target)
            self.ece.update(torch.stack([1 - p, p], dim=1), target)
            self.loss.update(F.binary_cross_entropy_with_logits(logits, target.double(), reduction="sum"))
        else:
            self.ece.update(torch.softmax(logits, dim=1), target)
            self.loss.update(F.cross_entropy(logits, target, reduction="sum"))
        for i, metric in enumerate(self.heads.values()):
            metric.update(predicted_class(head_logits[:, i].double(), c), target)

    def compute(self) -> dict:
        """Collective under DDP: every process must call it."""
        cm = self.confusion.compute().long().cpu()  # [true class, predicted class]
        out = {**per_class(cm, self.classes), "loss": float(self.loss.compute()) / max(int(cm.sum()), 1),
               "ece": float(self.ece.compute())}
        if self.binary:  # the binary keys: f1 and ROC-AUC of the positive class, the four counts
            (tn, fp), (fn, tp) = cm.tolist()
            out.update({"f1": 2 * tp / max(1, 2 * tp + fp + fn), "roc_auc": None, "tp": tp, "fp": fp, "tn": tn,
                        "fn": fn})
            if 0 < tp + fn < out["n"]:  # ROC-AUC needs both classes
                out["roc_auc"] = float(_in_float64(self.auroc.compute))
        out.update({f"acc_{name}": float(m.compute()) for name, m in self.heads.items()})
        return out


def _in_float64(compute):
    """compute() with float64 as torch's default dtype: torchmetrics builds the ROC curve's rates in the default
    dtype, and in float32 a perfectly separated split scores 0.99999988."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return compute()
    finally:
        torch.set_default_dtype(default)


def per_class(cm: torch.Tensor, classes: list[str]) -> dict:
    """n, accuracy, macro-F1, each class's precision / recall / F1 / support, and the confusion matrix (rows: true
    class, columns: predicted) from a C x C confusion matrix. A class never predicted has precision 0 (and never
    present, recall 0), as in scikit-learn's zero_division=0. Macro-F1 averages the classes that occur in the
    labels or the predictions, as scikit-learn does: a class absent from both (a small test file without any
    example of it) is not counted as an F1 of 0."""
    cm = cm.double()
    tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    n = int(cm.sum())
    seen = (actual > 0) | (predicted > 0)
    out = {"n": n, "acc": float(tp.sum()) / max(n, 1), "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0}
    for i, name in enumerate(classes):
        out.update({f"precision/{name}": float(precision[i]), f"recall/{name}": float(recall[i]),
                    f"f1/{name}": float(f1[i]), f"support/{name}": int(actual[i])})
    out["confusion"] = cm.long().tolist()
    return out


def score_logits(logits, labels, classes: list[str], head_logits=None, head_names: tuple[str, ...] = ("rnn",)) -> dict:
    """The metrics of a model's logits ([n] for two classes, [n, C] for more) against class indices in one process,
    as training computes them (with each head's accuracy, given head_logits), plus the reliability table behind
    the ECE (Calibration.table)."""
    m = EvalMetrics("cpu", classes, head_names)
    m.update(torch.as_tensor(np.asarray(logits, np.float64)), torch.as_tensor(np.asarray(labels, np.int64)),
             None if head_logits is None else torch.as_tensor(head_logits))
    return {**m.compute(), "reliability": m.ece.table()}


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

    def add_step(self, norm: torch.Tensor, max_norm: float, share: float) -> None:
        """An optimizer step's gradient norm before clipping, this process counting `share` of the step. A step the
        fp16 scaler skips has an inf norm: it is counted in skipped_steps and left out of grad_norm, clip_fraction."""
        counted = torch.isfinite(norm).double() * share
        self.add(grad_norm=norm.nan_to_num(0.0, 0.0, 0.0) * counted, clipped=(norm > max_norm).double() * counted,
                 steps=counted)

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
        """The main process holds the saved totals, the others start from zero: totals() adds them up. Tokens
        start from zero: they count towards throughput, which a launch measures over its own samples and seconds."""
        self.reset()
        if self.acc.is_main_process:
            for k, v in saved.items():  # a checkpoint of an earlier version may lack a key: it stays 0
                if k != "tokens":
                    self.sums[k] += v


# Exit status of distsent-train when a non-finite loss or gradient stopped the run (2: a bad config, data or
# checkpoint; 75: preempted).
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm; the message names the step and the quantity."""

    exit_code = EXIT_NONFINITE


class NonFiniteWatch:
    """The first step whose training loss or gradient norm was not finite, kept on the device, so that a step
    never waits for the host; check() reads it where the run synchronizes anyway (a logged row, an evaluation, a
    checkpoint), before anything is written from the weights."""

    QUANTITIES = ("training loss", "gradient norm")

    def __init__(self, accelerator):
        self.acc = accelerator
        # under fp16 the gradient scaler skips steps with inf/NaN gradients instead (counted as skipped_steps); the
        # loss, computed from fp32 logits before any scaling, is watched still: a NaN there is no scaler's to fix
        self.watch_grads = accelerator.scaler is None
        self.first = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # 0: none so far

    def see(self, step: int, loss: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None) -> None:
        for i, value in enumerate((loss, grad_norm if self.watch_grads else None)):
            if value is not None:
                bad = ~torch.isfinite(value.detach())
                self.first[i] = torch.where(bad & (self.first[i] == 0), float(step), self.first[i])

    def check(self) -> None:
        """Collective: NonFiniteError on every process if any process saw a non-finite value."""
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


def epoch_row(epoch_s: float, eval_s: float, samples: int, tokens: int, whole: bool) -> dict:
    """An epoch's throughput on the training clock (its `eval_s` of evaluation left out), and its duration when
    this launch ran `whole` of it (not resumed midway)."""
    train_s = epoch_s - eval_s
    row = {"throughput/epoch_samples_per_s": samples / train_s, "throughput/epoch_tokens_per_s": tokens / train_s}
    return row | ({"time/epoch_s": epoch_s, "time/epoch_train_s": train_s} if whole else {})
