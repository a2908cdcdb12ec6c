"""The training loop on Hugging Face Accelerate: global batches, DDP, mixed precision, clipping, eval, checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import ConfigError, ExperimentConfig, save_config
from .data import PreparedData, TokenizedSplit, prepare
from .model import build_model, cpu_supports_bf16_rnn
from .preemption import EXIT_PREEMPTED, StopFlag
from .sampler import Layout, epoch_batches
from .tracking import RunLog, drop_rows_after, software_versions, write_status

log = logging.getLogger("distsent")


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


def build_accelerator(cfg: ExperimentConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    mp = cfg.train.mixed_precision or None  # None: take the launch config's (ACCELERATE_MIXED_PRECISION)
    # Accelerate's own multi-CPU launch goes through mpirun; under torchrun (accelerate launch --multi_gpu) on a
    # machine without GPUs, cpu=True gives DDP over gloo instead of N unconnected single processes.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # broadcast_buffers=False: the model's only buffer, the n-gram head's ratios, is computed identically on every
    # process and never changes, so DDP need not re-send its 4 MB before every forward
    return Accelerator(cpu=cpu or None, mixed_precision=mp, log_with=list(cfg.log.trackers) or None, project_dir=str(run_dir),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)),
                                        DistributedDataParallelKwargs(broadcast_buffers=False)])


def build_optimizer(cfg, model):
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # fused: one kernel over all parameters; for the tutorial's model on one CPU thread the step takes 10 ms
    # instead of 45 ms with the default (foreach) implementation
    return cls([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas),
               weight_decay=o.weight_decay, fused=True)


def lr_factor(cfg, step: int, total_steps: int) -> float:
    """Linear warmup, then constant / linear / cosine decay to min_lr_ratio at total_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def seed_dropout(seed: int, step: int, rank: int) -> None:
    """Per-process random stream re-derived from (seed, step, rank): used at the start, and after a resume on a
    different number of processes, where saved per-process streams cannot map onto the new processes."""
    torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little"))


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def vocab_sha256(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


class Trainer:
    """Assembles data, model, optimizer and run records, then `fit()` trains, evaluates and tests."""

    def __init__(self, cfg: ExperimentConfig, stop: StopFlag | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ConfigError("train.mixed_precision: fp16 needs a GPU; use 'bf16' or 'no' on a CPU")
        try:
            self.layout = Layout.build(cfg.train.global_batch_size, acc.num_processes, cfg.train.micro_batch_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        acc.gradient_accumulation_steps = self.layout.accum_steps
        torch.set_flush_denormal(cfg.train.flush_denormal)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(cfg.train.threads or max(1, cores // _local_processes()))
        if acc.is_main_process:
            print(f"distsent: run directory {self.run_dir.resolve()}", flush=True)
            log.info("%d process(es) on %d machine(s), device %s, mixed precision %s, global batch %d = %d x %d x %d "
                     "(processes x micro-batch x accumulation), %d threads per process", acc.num_processes,
                     _num_machines(), acc.device, acc.mixed_precision, self.layout.global_batch,
                     self.layout.world_size, self.layout.micro_batch, self.layout.accum_steps, torch.get_num_threads())

        self.resume_from = self._find_resume()
        tok_path = self.run_dir / "tokenizer.json"
        t0 = time.perf_counter()
        with acc.main_process_first():  # main builds the vocabulary and the token cache; the others then read them
            self.data: PreparedData = prepare(cfg.data, tok_path if tok_path.is_file() else None)
        self.prepare_s = time.perf_counter() - t0
        if acc.is_main_process:
            if not tok_path.is_file():
                self.data.tokenizer.save(str(tok_path))
            save_config(cfg, self.run_dir / "config.yaml")
            log.info("data: %d train / %d val / %d test reviews, vocabulary %d (%s)", len(self.data.train),
                     len(self.data.val), len(self.data.test), self.data.tokenizer.get_vocab_size(),
                     "from cache" if self.data.cache_hit else "tokenized now")

        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)  # identical initial weights on every process
        model = build_model(self.data.tokenizer.get_vocab_size(), cfg.model)
        if acc.mixed_precision == "bf16" and acc.device.type == "cpu" and not cpu_supports_bf16_rnn():
            model.rnn_fp32_on_cpu = True
            if acc.is_main_process:
                log.warning("this CPU has no native bf16 for the LSTM (oneDNN): the recurrent layer runs in fp32, "
                            "the rest under bf16 autocast")
        if cfg.model.pretrained_embeddings:
            from .embeddings import init_embedding

            coverage = init_embedding(model.embedding, cfg.model.pretrained_embeddings,
                                      self.data.tokenizer.get_vocab(), cfg.model.freeze_embeddings)
            if acc.is_main_process:
                log.info("embeddings: %.1f%% of the vocabulary initialised from %s", 100 * coverage,
                         cfg.model.pretrained_embeddings)
        if model.ngrams is not None:  # naive-Bayes ratios from the training split: the same on every process
            train = self.data.train
            model.ngrams.fit_ratios(self._cpu_tensors(train, idx) for idx in np.array_split(
                np.arange(len(train)), max(1, len(train) // 256)))
        optimizer = build_optimizer(cfg, model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.steps_per_epoch = len(epoch_batches(self.data.train.lengths, self.layout.global_batch, 0, 0, 1))
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda s: lr_factor(cfg, s, self.total_steps))
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_acc": -1.0, "best_step": -1,
                      "evals_since_best": 0, "samples_seen": 0, "world_size": acc.num_processes, "run_id": "",
                      "world_size_changes": []}
        self.stop = stop or StopFlag(cfg.dist.stop_signals)
        self.sums = _zero_sums(acc.device)  # training metrics since the last log, kept on the device
        self.started = t0  # wall-clock origin of time/elapsed_s
        self.eval_seconds = 0.0

    # --- resume ------------------------------------------------------------------------------------------------

    def _find_resume(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.find_latest(self.run_dir / "checkpoints")
        path = Path(mode)
        ckpt.verify(path)  # an explicitly named checkpoint must be valid: CheckpointError otherwise
        return path

    def _identity(self) -> dict:
        """What a checkpoint must share with the config to be resumed."""
        return {"model": asdict(self.cfg.model), "vocab_sha256": vocab_sha256(self.data.tokenizer),
                "global_batch_size": self.cfg.train.global_batch_size, "seed": self.cfg.train.seed,
                "data": {k: getattr(self.cfg.data, k) for k in ("max_len", "truncate", "limit", "val_fraction",
                                                                "split_seed", "bucket_batches", "strip_html")}}

    def _restore(self, path: Path) -> None:
        acc = self.accelerator
        saved = ckpt.verify(path)
        ckpt.check_compatible(saved["identity"], self._identity(), path)
        ckpt.load_weights(path, self.raw_model, self.optimizer.optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        if acc.scaler is not None and saved.get("scaler"):
            acc.scaler.load_state_dict(saved["scaler"])
        self.state = saved["train_state"]
        if acc.is_main_process:  # the other processes start from zero: the sums are added up over processes
            for k, v in saved.get("log_sums", {}).items():
                self.sums[k] += v
        old = self.state["world_size"]
        if old == acc.num_processes:
            ckpt.load_rng(path, acc.process_index)
        else:
            seed_dropout(self.cfg.train.seed, self.state["step"], acc.process_index)
            event = {"step": self.state["step"], "old_world_size": old, "new_world_size": acc.num_processes}
            self.state["world_size_changes"].append(event)
            self.state["world_size"] = acc.num_processes
            if acc.is_main_process:
                log.warning("world size changed from %d to %d at step %d: the remaining global batches of the epoch "
                            "are split over the new processes; per-process random streams (dropout) are re-derived "
                            "from (seed, step, rank), so the run is exact in data order but not bitwise",
                            old, acc.num_processes, self.state["step"])
        if acc.is_main_process:
            log.info("resumed from %s: step %d, epoch %d, %d global batches into the epoch", path, self.state["step"],
                     self.state["epoch"], self.state["batch_in_epoch"])

    def _save(self) -> Path:
        acc = self.accelerator
        t0 = time.perf_counter()
        state = {"train_state": self.state, "log_sums": self._reduced_sums(), "scheduler": self.scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "identity": self._identity()}
        path = ckpt.save(self.run_dir / "checkpoints", self.state["step"], acc, self.model, self.optimizer, state,
                         self.cfg.checkpoint.keep_last)
        if acc.is_main_process:
            log.info("checkpoint %s written in %.2f s", path.name, time.perf_counter() - t0)
        return path

    # --- batches -----------------------------------------------------------------------------------------------

    @staticmethod
    def _cpu_tensors(split: TokenizedSplit, idx: np.ndarray):
        ids, lengths = split.batch(idx)
        return torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(split.labels[idx]).float()

    def _tensors(self, split: TokenizedSplit, idx: np.ndarray):
        ids, lengths, labels = self._cpu_tensors(split, idx)
        dev = self.accelerator.device
        return ids.to(dev, non_blocking=True), lengths.to(dev), labels.to(dev)

    # --- one optimizer step ------------------------------------------------------------------------------------

    def train_step(self, batch: np.ndarray, sums: dict) -> None:
        """Forward/backward over this rank's micro-batches of one global batch, then one optimizer step.

        Each micro-batch's loss is its summed BCE scaled so that, after Accelerate divides by the accumulation
        steps and DDP averages over processes, the gradient is the mean over the whole global batch, whatever
        the number of processes.
        """
        acc, train = self.accelerator, self.data.train
        scale = self.layout.world_size * self.layout.accum_steps / len(batch)
        for idx in self.layout.micro_batches(batch, acc.process_index):
            weight = 1.0
            if len(idx) == 0:  # a short last batch left this rank nothing: a zero-weight dummy keeps DDP in step
                idx, weight = batch[:1], 0.0
            ids, lengths, labels = self._tensors(train, idx)
            with acc.accumulate(self.model):
                # each classifier head has its own loss: the n-gram head fits the training set within an epoch,
                # and a loss on their sum alone would leave the recurrent head almost no gradient after that
                heads = self.model(ids, lengths, heads=True)
                losses = F.binary_cross_entropy_with_logits(heads, labels.unsqueeze(1).expand_as(heads),
                                                            reduction="none").sum(1)
                logits = self.raw_model.combine(heads.detach())
                acc.backward(losses.sum() * (scale * weight))
                if acc.sync_gradients:
                    max_norm = self.cfg.optim.clip_grad_norm or float("inf")
                    norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                    # every process sees the same norm: count each step once in the sum over processes
                    share = 1.0 / acc.num_processes
                    sums["grad_norm"] += norm.detach().double() * share
                    sums["clipped"] += (norm > max_norm).double() * share
                    sums["steps"] += share
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # running sums stay on the device: no host sync until the next log
                sums["loss"] += losses.detach().sum() * weight
                sums["correct"] += ((logits.detach() > 0).float() == labels).float().sum() * weight
                sums["samples"] += len(idx) * weight
                sums["tokens"] += lengths.sum().float() * weight
            if self.cfg.train.debug_records and weight:
                self._record_ids(train.ids[idx])

    def _debug_path(self, kind: str) -> Path:
        return self.run_dir / "debug" / f"{kind}-rank{self.accelerator.process_index}.jsonl"

    def _record_ids(self, ids: np.ndarray) -> None:
        with open(self._debug_path("samples"), "a") as f:
            f.write(json.dumps({"step": self.state["step"] + 1, "epoch": self.state["epoch"],
                                "ids": ids.tolist()}) + "\n")

    # --- evaluation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: TokenizedSplit) -> dict:
        """Loss, accuracy, F1 and confusion counts over the whole split; every review counted once.

        Reviews are sorted by length (little padding) and dealt to the processes one by one, so every process gets
        the same number of reviews and nearly the same number of tokens; each process sums its counts and one
        all-reduce adds them up, so there are no padded duplicates to remove.
        """
        t0 = time.perf_counter()
        acc, model = self.accelerator, self.raw_model
        was_training = model.training
        model.eval()
        mine = np.argsort(split.lengths, kind="stable")[acc.process_index:: acc.num_processes]
        bs = self.cfg.train.eval_batch_size
        chunks = [mine[i: i + bs] for i in range(0, len(mine), bs)]
        head_names = ["rnn", "ngram"][: 1 + (model.ngrams is not None)]
        # loss, n, tp, fp, tn, fn, then the number each head alone gets right
        counts = torch.zeros(6 + len(head_names), dtype=torch.float64, device=acc.device)
        for idx in chunks:
            ids, lengths, labels = self._tensors(split, idx)
            with acc.autocast():
                heads = model(ids, lengths, heads=True)
            logits = model.combine(heads)
            pred = logits > 0
            pos = labels > 0.5
            counts += torch.cat([torch.stack([
                F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"),
                torch.tensor(float(len(idx)), device=acc.device), (pred & pos).sum(), (pred & ~pos).sum(),
                (~pred & ~pos).sum(), (~pred & pos).sum()]), ((heads > 0) == pos.unsqueeze(1)).sum(0)]).double()
        loss, n, tp, fp, tn, fn, *right = acc.reduce(counts, reduction="sum").tolist()
        model.train(was_training)
        f1 = 2 * tp / max(1.0, 2 * tp + fp + fn)
        out = {"loss": loss / max(n, 1), "acc": (tp + tn) / max(n, 1), "f1": f1, "n": int(n), "tp": int(tp),
               "fp": int(fp), "tn": int(tn), "fn": int(fn), "samples_per_s": n / (time.perf_counter() - t0)}
        if len(head_names) > 1:  # what each head alone scores: shows what the pair is worth over either
            out.update({f"acc_{name}": r / max(n, 1) for name, r in zip(head_names, right)})
        return out

    def _validate(self, runlog: RunLog) -> None:
        t0 = time.perf_counter()
        metrics = self.evaluate(self.data.val)
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        step = self.state["step"]
        runlog.log({f"val/{k}": v for k, v in metrics.items()} | {
            "epoch": self._epoch_float(), "time/elapsed_s": time.perf_counter() - self.started}, step)
        runlog.log_wandb(lambda wandb: self._eval_media(wandb, metrics), step)
        if metrics["acc"] > self.state["best_val_acc"]:
            self.state.update(best_val_acc=metrics["acc"], best_step=step, evals_since_best=0)
            self._save_best()
            runlog.summary({"best/val_acc": metrics["acc"], "best/step": step})
        else:
            self.state["evals_since_best"] += 1
        if self.accelerator.is_main_process:
            log.info("step %d: val loss %.4f acc %.4f f1 %.4f (best %.4f at step %d)", step, metrics["loss"],
                     metrics["acc"], metrics["f1"], self.state["best_val_acc"], self.state["best_step"])

    def _eval_media(self, wandb, metrics: dict, examples: int = 16) -> dict:
        """A confusion matrix and a table of example predictions (the text as the model reads it)."""
        truth = [0] * (metrics["tn"] + metrics["fp"]) + [1] * (metrics["fn"] + metrics["tp"])
        preds = [0] * metrics["tn"] + [1] * metrics["fp"] + [0] * metrics["fn"] + [1] * metrics["tp"]
        val = self.data.val
        idx = np.arange(min(examples, len(val)))
        ids, lengths, labels = self._tensors(val, idx)
        model = self.raw_model
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            probs = torch.sigmoid(model(ids, lengths).float()).tolist()
        model.train(was_training)
        table = wandb.Table(columns=["text", "label", "p_positive", "correct"])
        for i, p in zip(idx, probs):
            words = val.tokens[val.offsets[i]: val.offsets[i + 1]].tolist()
            label = int(val.labels[i])
            table.add_data(self.data.tokenizer.decode(words, skip_special_tokens=False), label, p, (p >= 0.5) == label)
        return {"val/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=preds,
                                                                    class_names=["negative", "positive"]),
                "val/examples": table}

    def _save_best(self) -> None:
        """<run>/best/: weights (safetensors), tokenizer and config, replaced atomically."""
        acc = self.accelerator
        if acc.is_main_process:
            import shutil

            from safetensors.torch import save_file

            tmp, best = self.run_dir / ".best.tmp", self.run_dir / "best"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in self.raw_model.state_dict().items()},
                      tmp / "model.safetensors")
            self.data.tokenizer.save(str(tmp / "tokenizer.json"))
            save_config(self.cfg, tmp / "config.yaml")
            (tmp / "meta.json").write_text(json.dumps({"step": self.state["step"], "val_acc": self.state["best_val_acc"],
                                                       "vocab_size": self.data.tokenizer.get_vocab_size()}))
            old = self.run_dir / ".best.old"
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                os.rename(best, old)
            os.rename(tmp, best)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _epoch_float(self) -> float:
        return self.state["epoch"] + self.state["batch_in_epoch"] / self.steps_per_epoch

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        if self.resume_from is not None:
            self._restore(self.resume_from)
            state = self.state
        else:
            seed_dropout(cfg.train.seed, 0, acc.process_index)
        if cfg.train.debug_records:
            (self.run_dir / "debug").mkdir(exist_ok=True)
            drop_rows_after(self._debug_path("samples"), state["step"])
        if not state["run_id"]:
            state["run_id"] = _new_run_id(acc)
        runlog = RunLog(cfg, self.run_dir, acc, state["run_id"], state["step"] if self.resume_from else None,
                        {**cfg.to_dict(), "launch": self._topology()})
        # a resumed run logs its start-up rows at its first new step: the checkpoint's step is already in W&B
        first_step = state["step"] + (1 if self.resume_from else 0)
        start_row = {"data/prepare_s": self.prepare_s, "data/cache_hit": int(self.data.cache_hit)}
        for event in state["world_size_changes"]:
            if event["step"] == state["step"]:
                start_row.update({"event/world_size_old": event["old_world_size"],
                                  "event/world_size_new": event["new_world_size"]})
        runlog.log(start_row, first_step)
        if acc.is_main_process:
            write_status(self.run_dir, state="running", step=state["step"], pid=os.getpid())
        try:
            self._epochs(runlog)
        except Preempted:
            if acc.is_main_process:
                write_status(self.run_dir, state="preempted", step=state["step"], exit_code=EXIT_PREEMPTED)
            runlog.finish()
            raise
        if cfg.train.debug_records:
            with open(self._debug_path("weights"), "a") as f:
                f.write(json.dumps({"step": state["step"], "sha256": weights_sha256(self.raw_model)}) + "\n")
        result = self._test(runlog)
        runlog.finish()
        if acc.is_main_process:
            write_status(self.run_dir, state="finished", step=state["step"], exit_code=0)
        return result

    def _epochs(self, runlog: RunLog) -> None:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.model.train()
        t_last, samples_last = time.perf_counter(), state["samples_seen"]
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not acc.is_main_process, unit="step",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        while state["epoch"] < cfg.train.epochs and not self._max_steps_reached():
            epoch_start, eval_before = time.perf_counter(), self.eval_seconds
            epoch_samples = epoch_tokens = 0
            batches = epoch_batches(self.data.train.lengths, self.layout.global_batch, cfg.train.seed,
                                    state["epoch"], cfg.data.bucket_batches)
            while state["batch_in_epoch"] < len(batches) and not self._max_steps_reached():
                batch = batches[state["batch_in_epoch"]]
                self.train_step(batch, self.sums)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["samples_seen"] += len(batch)
                epoch_samples += len(batch)
                epoch_tokens += int(self.data.train.lengths[batch].sum())
                bar.update(1)
                step = state["step"]
                if step % cfg.train.log_every == 0:
                    now = time.perf_counter()
                    metrics = self._train_metrics(now - t_last, state["samples_seen"] - samples_last)
                    runlog.log(metrics, step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/acc']:.3f}")
                    self.sums, t_last, samples_last = _zero_sums(acc.device), now, state["samples_seen"]
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    self._validate(runlog)
                stopping = self.stop.agreed(acc)
                if stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    self._save()
                if stopping:
                    bar.close()
                    if acc.is_main_process:
                        log.warning("stopped by a signal at step %d after writing its checkpoint; exit code %d",
                                    step, EXIT_PREEMPTED)
                    raise Preempted()
            if state["batch_in_epoch"] >= len(batches):
                if not (cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0):
                    self._validate(runlog)
                epoch_s = time.perf_counter() - epoch_start
                train_s = epoch_s - (self.eval_seconds - eval_before)
                runlog.log({"time/epoch_s": epoch_s, "time/epoch_train_s": train_s,
                            "throughput/epoch_samples_per_s": epoch_samples / train_s,
                            "throughput/epoch_tokens_per_s": epoch_tokens / train_s}, state["step"])
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                self._save()
        bar.close()

    def close(self) -> None:
        """Tear the process group down explicitly: left to interpreter exit, gloo's threads can abort the process
        ("terminate called without an active exception") after a run that otherwise finished."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.state["step"] >= self.cfg.train.max_steps

    def _reduced_sums(self) -> dict:
        keys = list(self.sums)
        return dict(zip(keys, self.accelerator.reduce(torch.stack([self.sums[k] for k in keys]), "sum").tolist()))

    def _train_metrics(self, seconds: float, samples: int) -> dict:
        totals = self._reduced_sums()
        steps = max(1.0, totals["steps"])
        return {"train/loss": totals["loss"] / max(totals["samples"], 1),
                "train/acc": totals["correct"] / max(totals["samples"], 1),
                "grad_norm": totals["grad_norm"] / steps, "clip_fraction": totals["clipped"] / steps,
                "lr": self.scheduler.get_last_lr()[0], "epoch": self._epoch_float(),
                "throughput/samples_per_s": samples / max(seconds, 1e-9),
                "throughput/tokens_per_s": totals["tokens"] / max(seconds, 1e-9)}

    def _test(self, runlog: RunLog) -> dict:
        if self.state["best_step"] < 0:  # stopped by max_steps before any evaluation
            self._validate(runlog)
        from safetensors.torch import load_file

        self.accelerator.wait_for_everyone()
        self.raw_model.load_state_dict(load_file(self.run_dir / "best" / "model.safetensors"))
        metrics = self.evaluate(self.data.test)
        runlog.log({f"test/{k}": v for k, v in metrics.items()}, self.state["step"])
        runlog.summary({f"test/{k}": v for k, v in metrics.items()})
        runlog.log_model(self.run_dir / "best", f"model-{self.state['run_id']}",
                         {"step": self.state["best_step"], "val_acc": self.state["best_val_acc"],
                          "test_acc": metrics["acc"]})
        if self.accelerator.is_main_process:
            log.info("test (best model, step %d): acc %.4f f1 %.4f loss %.4f on %d reviews", self.state["best_step"],
                     metrics["acc"], metrics["f1"], metrics["loss"], metrics["n"])
        return metrics

    def _topology(self) -> dict:
        acc = self.accelerator
        topo = {"num_processes": acc.num_processes, "num_machines": _num_machines(), "device": str(acc.device),
                "mixed_precision": acc.mixed_precision, "micro_batch": self.layout.micro_batch,
                "accum_steps": self.layout.accum_steps, "threads_per_process": torch.get_num_threads(),
                "python": sys.version.split()[0], **software_versions()}
        for var in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT"):
            if var in os.environ:
                topo[var.lower()] = os.environ[var]
        return topo


def _zero_sums(device) -> dict:
    keys = ("loss", "correct", "samples", "tokens", "grad_norm", "clipped", "steps")
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}


def _new_run_id(acc) -> str:
    """One run id for all processes (the tracker run continues under it after a resume)."""
    import secrets

    rid = [secrets.token_hex(4) if acc.is_main_process else ""]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(rid, from_process=0)
    return rid[0]


def _local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _num_machines() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1")) // _local_processes())
