"""The training loop on Hugging Face Accelerate: global batches, DDP, mixed precision, clipping, eval, checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .build import (OPTIMIZER_SETTINGS, announce, apply_optim_settings, batch_tensors, build_accelerator, build_data,
                    build_layout, build_optimizer, build_run_model, build_scheduler, class_weights,
                    close_process_group, lock_run_dir, new_run_id, run_identity, schedule_warning)
from .config import ExperimentConfig
from .configfile import changes_since, save_config
from .files import IntegrityError, WriteError, writing
from .metrics import EvalMetrics, NonFiniteWatch, TrainSums, epoch_row
from .model import clip_gradients, moving_average
from .preemption import Preempted, StopFlag
from .progress import progress_bar
from .randomstate import seed_dropout
from .resume import chosen_checkpoint, in_run, settle
from .sampler import by_length, epoch_batches
from .sources import located, records_digest
from .state import TrainState
from .together import fail_together, stop_reason
from .tokenizer import TokenizedSplit
from .torchsettings import process_settings, restore_process_settings, setup_threads
from .tracking import DebugRecords, RunLog, launch_topology, status_state, write_status

log = logging.getLogger("distsent")


class Trainer:
    """Assembles the run from its config (build.py), then `fit()` trains, evaluates, checkpoints and tests."""

    def __init__(self, cfg: ExperimentConfig, stop: StopFlag | None = None):
        self.cfg, self.run_dir, self.settings_before, self.lock = cfg, Path(cfg.output_dir), process_settings(), None
        try:
            with writing(self.run_dir):  # a read-only filesystem: one line naming it
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self.accelerator = acc = build_accelerator(cfg, self.run_dir)
            self.layout = build_layout(cfg, acc)
            self.lock = lock_run_dir(self.run_dir, acc)  # a second launch into this directory stops here
            self._assemble(cfg, acc, stop)
        except BaseException:  # a start that fails (a directory in use, bad data, a refused checkpoint) frees the
            if self.lock is not None:  # directory and puts the process's settings back, as close() does
                self.lock.release()
            restore_process_settings(self.settings_before)
            raise

    def _assemble(self, cfg: ExperimentConfig, acc, stop: StopFlag | None) -> None:
        """Data, model, optimizer, schedule, checkpoints and records, once the run directory is this run's."""
        setup_threads(cfg)
        announce(acc, self.layout, self.run_dir)
        self.resume_from = chosen_checkpoint(cfg.checkpoint, acc, self.run_dir / "checkpoints")
        # one of the run's own checkpoints; a branch (another run's) takes its vocabulary and records afresh, as a
        # fresh start does: a tokenizer.json or metrics left by a start that died early may come from other settings
        self.own_resume = self.resume_from is not None and in_run(self.resume_from, self.run_dir / "checkpoints")
        self.data, self.prepare_s = build_data(cfg, acc, self.run_dir, resuming=self.own_resume)
        model = build_run_model(cfg, acc, self.data, resuming=self.resume_from is not None)
        self.model, self.optimizer = acc.prepare(model, build_optimizer(cfg, model))
        self.raw_model = acc.unwrap_model(self.model)
        self.ema = moving_average(self.raw_model, cfg.train.ema_decay)
        self.eval_model = self.ema.module if self.ema is not None else self.raw_model  # validated, exported, tested
        self.steps_per_epoch = len(epoch_batches(self.data.train.lengths, self.layout.global_batch, 0, 0, 1))
        self.total_steps = min(self.steps_per_epoch * cfg.train.epochs, cfg.train.max_steps or 1 << 62)
        self.scheduler = build_scheduler(cfg, self.optimizer.optimizer, self.total_steps)
        self.state = TrainState(world_size=acc.num_processes)
        self.sums, self.watch = TrainSums(acc), NonFiniteWatch(acc)
        self.checkpoints = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint, acc, self.model, self.optimizer, {
            "train_state": self.state, "log_sums": self.sums, "scheduler": self.scheduler, "scaler": acc.scaler},
            averaged=self.ema, lock=self.lock)
        self.identity, self.class_weights = run_identity(cfg, self.data), class_weights(cfg, self.data, acc.device)
        self.stop = stop or StopFlag(cfg.dist.stop_signals)
        self.debug = DebugRecords(self.run_dir, acc.process_index, cfg.train.debug_records)
        self.started, self.eval_seconds = time.perf_counter() - self.prepare_s, 0.0  # time/elapsed_s's origin; evals
        self.failure_recorded = self.marked_running = False  # in status.json: why it stopped; running, by this launch

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        runlog = bar = None
        try:
            runlog = self._start()
            self._open(runlog)
            bar = progress_bar(self.total_steps, state.step, acc.is_main_process and not self.ended_before)
            self.model.train()
            if self.ended_before and acc.is_main_process:  # a relaunch after the end (a requeue, say)
                log.info("the run is at step %d, at or past its end: testing the best model again", state.step)
            self.logged = (time.perf_counter() - self.eval_seconds, state.samples_seen)  # last row's clock, samples
            while not self._done():
                batches = epoch_batches(self.data.train.lengths, self.layout.global_batch, cfg.train.seed,
                                        state.epoch, cfg.data.bucket_batches)
                t_epoch, eval_before, samples, tokens = time.perf_counter(), self.eval_seconds, 0, 0
                whole = state.batch_in_epoch == 0  # an epoch resumed midway ran partly in an earlier launch
                while not self._done():
                    batch = batches[state.batch_in_epoch]
                    self.train_step(batch)
                    state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
                    state.samples_seen += len(batch)
                    samples, tokens = samples + len(batch), tokens + int(self.data.train.lengths[batch].sum())
                    bar.update(1)
                    if row_due := state.step % cfg.train.log_every == 0 or state.step == self.total_steps:  # and last
                        self._log_train_row(runlog, bar)
                    epoch_end = state.batch_in_epoch == len(batches)
                    # train.max_steps ending the run mid-epoch: its last steps are evaluated and saved like an epoch's
                    last = epoch_end or state.step == cfg.train.max_steps
                    if last or (cfg.train.eval_every and state.step % cfg.train.eval_every == 0):
                        self.watch.check()
                        self._validate(runlog)
                        if state.stopped_early and not row_due:  # an early stop's last steps too
                            self._log_train_row(runlog, bar)
                    if epoch_end:  # the epoch's figures without the time spent evaluating
                        epoch_s = time.perf_counter() - t_epoch
                        runlog.log(epoch_row(epoch_s, self.eval_seconds - eval_before, samples, tokens, whole),
                                   state.step)
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    # one tiny all-reduce: every process stops at the same step, on a signal, a failed write or
                    # the run directory taken over by another launch while this one was stalled
                    stopping = self.stop.agreed(acc, runlog.failure or self.lock.lost,  # only this process knows
                                                f"keep the run's records (metrics.jsonl, run.lock) in {self.run_dir}")
                    if stopping or last or state.stopped_early or self.checkpoints.due(state.step):
                        self.watch.check()
                        state.elapsed_s = time.perf_counter() - self.started
                        self.checkpoints.save(state.step, self.identity)
                        self._write_records(runlog, state="running", step=state.step, pid=os.getpid())  # its progress
                    if stopping:
                        raise Preempted()
                    if epoch_end:
                        break
            self.watch.check()  # the last steps, before the weights are tested and exported
            bar.close()
            self.debug.weights(state.step, self.raw_model)
            result = self._test(runlog)
            self._write_records(runlog, state="finished", step=state.step, exit_code=0)
        except BaseException as exc:
            if bar is not None:
                bar.close()
            if exc is not self.lock.lost:  # status.json and W&B learn how it ended (a lost run's are the new owner's)
                code = self._record_failure(exc)
                if runlog is not None:  # W&B started (a failed restore comes before); a finished run's stays so
                    runlog.finish(code if self.failure_recorded else 0)
            raise
        runlog.finish()
        return result

    def _log_train_row(self, runlog: RunLog, bar) -> None:
        """Collective: the training row of the steps since the last one, on the training clock."""
        self.watch.check()  # nothing is logged, evaluated or saved from non-finite weights
        now, (t_log, samples_log) = time.perf_counter() - self.eval_seconds, self.logged
        row = self.sums.row(now - t_log, self.state.samples_seen - samples_log) | {
            "lr": self.scheduler.get_last_lr()[0], "epoch": self._epoch_float()}
        runlog.log(row, self.state.step)
        self.sums.reset()
        self.logged = (now, self.state.samples_seen)
        # refresh=False: the bar redraws on its own clock, not at every log row
        bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['train/acc']:.3f}", refresh=False)

    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return (self.state.epoch >= self.cfg.train.epochs or self.state.stopped_early
                or bool(max_steps and self.state.step >= max_steps))

    def train_step(self, batch: np.ndarray) -> None:
        """Forward/backward over this rank's micro-batches of one global batch, then one optimizer step.

        Each micro-batch's loss is its summed loss (BCE, or cross-entropy for C classes) scaled so that, after
        Accelerate divides by the accumulation steps and DDP averages over processes, the gradient is the mean over
        the whole global batch, whatever the number of processes. Every micro-batch's loss is watched: under fp16 a
        NaN in one would only make the scaler skip the step."""
        acc, train = self.accelerator, self.data.train
        loss_scale = self.layout.world_size * self.layout.accum_steps / len(batch)
        for idx in self.layout.micro_batches(batch, acc.process_index):
            weight = 1.0
            if len(idx) == 0:  # a short last batch left this rank nothing: a zero-weight dummy keeps DDP in step
                idx, weight = batch[:1], 0.0
            ids, lengths, labels = batch_tensors(train, idx, acc.device)
            with acc.accumulate(self.model):
                # each classifier head has its own loss: the n-gram head fits the training set within an epoch,
                # and a loss on their sum alone would leave the recurrent head almost no gradient after that
                heads = self.model(ids, lengths, heads=True)
                losses = self.raw_model.head_losses(heads, labels, self.cfg.train.label_smoothing)
                if self.class_weights is not None:
                    losses = losses * self.class_weights[labels.long()]
                logits = self.raw_model.combine(heads.detach())
                acc.backward(losses.sum() * (loss_scale * weight))
                self.watch.see(self.state.step + 1, losses.detach().sum())
                if acc.sync_gradients:
                    max_norm = self.cfg.optim.clip_grad_norm or float("inf")
                    norm = clip_gradients(acc, self.raw_model, max_norm).detach().double()
                    self.watch.see(self.state.step + 1, grad_norm=norm)
                    share = 1.0 / acc.num_processes  # every process sees the same norm: count each step once
                    self.sums.add_step(norm, max_norm, share)
                    # fp16: the scaler skips a step with inf/NaN gradients and lowers its scale; compared on the
                    # device (Accelerate's step_was_skipped cannot see it with fused Adam, which skips in-kernel)
                    scale_before = acc.scaler._scale.clone() if acc.scaler is not None else None
                    self.optimizer.step()
                    if scale_before is not None:
                        self.sums.add(skipped=(acc.scaler._scale < scale_before).double().sum() * share)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update_parameters(self.raw_model)
            with torch.no_grad():  # running sums stay on the device: no host sync until the next log
                self.sums.add(loss=losses.detach().sum() * weight, samples=len(idx) * weight,
                              correct=(self.raw_model.predicted(logits) == labels.long()).float().sum() * weight,
                              tokens=lengths.sum().float() * weight)
            if weight:
                self.debug.samples(self.state.step + 1, self.state.epoch, train.ids[idx])

    # --- evaluation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: TokenizedSplit) -> dict:
        """metrics.EvalMetrics over the whole split, every review counted once, plus reviews per second. Reviews are
        sorted by length (little padding) and dealt to the processes in turn: equal shares, nearly equal tokens."""
        acc, model = self.accelerator, self.eval_model
        scores = EvalMetrics(acc.device, self.data.label_names, model.head_names)
        t0 = time.perf_counter()  # after building the metrics: the first one imports torchmetrics' classes (~1 s)
        was_training = model.training
        model.eval()
        for idx in by_length(split.lengths, self.cfg.train.eval_batch_size, acc.process_index, acc.num_processes):
            ids, lengths, labels = batch_tensors(split, idx, acc.device)
            with acc.autocast():
                heads = model(ids, lengths, heads=True)
            scores.update(model.combine(heads), labels, heads)
        model.train(was_training)
        out = scores.compute()
        return {**out, "samples_per_s": out["n"] / (time.perf_counter() - t0)}

    def _record_failure(self, exc: BaseException) -> int:
        """status.json (Python API too) for a run stopping early: preempted, or failed with the CLI's line; returns the
        exit code. A finished run's record stays unless this launch marked it running or began a rollback or branch."""
        (error, code), preempted = stop_reason(exc), isinstance(exc, Preempted)
        if preempted and self.accelerator.is_main_process:
            log.warning("stopped by a signal at step %d after writing its checkpoint; exit %d", self.state.step, code)
        if self.stop.received is not None and not isinstance(exc, KeyboardInterrupt):  # before its checkpoint
            error += (f"; a stop signal ({signal.Signals(self.stop.received).name}) came but no checkpoint was "
                      f"written for it: a restart resumes from the latest complete checkpoint")
        status = {"state": "preempted", "exit_code": code} | ({} if preempted else {"state": "failed", "error": error})
        self.failure_recorded = (self.marked_running or not getattr(self, "continues", True)
                                 or status_state(self.run_dir) != "finished")
        if self.accelerator.is_main_process and self.failure_recorded and not self.lock.check():  # taken over: not ours
            try:
                write_status(self.run_dir, step=self.state.step, **status)
            except WriteError as write_exc:  # already stopping on an error: say this one too, do not mask it
                log.error("%s (the run's state: %s)", write_exc, status)
        return code

    def _write_records(self, runlog: RunLog, config: bool = False, **status) -> None:
        """Collective: the status (with config, also config.yaml and launches.jsonl) on the main process, failing
        on every process if it or metrics.jsonl could not be written (a run whose records are lost is not reported
        finished)."""
        failure = runlog.failure or self.lock.check()  # taken over after the last step: the new owner's records
        if self.accelerator.is_main_process and failure is None:
            try:
                if config:
                    save_config(self.cfg, self.run_dir / "config.yaml")
                    runlog.record_launch()
                write_status(self.run_dir, **status)
            except WriteError as exc:
                failure = exc
        fail_together(self.accelerator, failure, f"finish the run's records in {self.run_dir}")

    def _validate(self, runlog: RunLog) -> None:
        t0 = time.perf_counter()
        metrics = self.evaluate(self.data.val)
        self.eval_seconds += time.perf_counter() - t0
        state, patience = self.state, self.cfg.train.early_stop_patience
        runlog.log({f"val/{k}": v for k, v in metrics.items()} | {
            "epoch": self._epoch_float(), "time/elapsed_s": time.perf_counter() - self.started}, state.step)
        runlog.log_eval_media(metrics, self.data, "val", self.eval_model, state.step)
        select = self.cfg.train.select_metric
        if state.record_eval(metrics[select]):
            cfg = replace(self.cfg, data=located(self.cfg.data))  # the folder names its data's place
            self.checkpoints.export_best(self.eval_model, self.data.tokenizer, cfg, {
                "step": state.step, f"val_{select}": state.best_val_acc,
                "vocab_size": self.data.tokenizer.get_vocab_size(), "label_names": self.data.label_names,
                "val_texts": records_digest(self.data.val) if runlog.active else ""},
                write=runlog.active)  # the main process, unless the run directory was taken over
            runlog.summary({f"best/val_{select}": metrics[select], "best/step": state.step})
        elif patience and state.evals_since_best >= patience:
            state.stopped_early = True
        if self.accelerator.is_main_process:
            log.info("step %d: val loss %.4f acc %.4f macro-F1 %.4f (best %s %.4f at step %d)%s", state.step,
                     metrics["loss"], metrics["acc"], metrics["macro_f1"], select, state.best_val_acc, state.best_step,
                     f"; stopping early: {patience} evaluations without a better model" if state.stopped_early else "")

    def _test(self, runlog: RunLog) -> dict:
        """The best model (best/, verified) on the test split, once."""
        if self.state.best_step < 0:  # no evaluation yet (resumed at or past a lowered train.max_steps)
            self._validate(runlog)
        best, failure = self.run_dir / "best", None
        if self.accelerator.is_main_process:  # checks (and after a crash, repairs) it once, for every process
            try:
                ckpt.verify_model_folder(best)
            except IntegrityError as exc:  # damaged: every process stops with one line, not out of a barrier
                failure = exc
        fail_together(self.accelerator, failure, f"check {best}")
        ckpt.load_weights(best, self.eval_model)
        metrics, state = self.evaluate(self.data.test), self.state
        runlog.log({f"test/{k}": v for k, v in metrics.items()}, state.step)
        runlog.summary({f"test/{k}": v for k, v in metrics.items()})
        runlog.log_eval_media(metrics, self.data, "test", self.eval_model, state.step)
        runlog.log_model(best, f"model-{state.run_id}", {
            "step": state.best_step, f"val_{self.cfg.train.select_metric}": state.best_val_acc,
            "test_acc": metrics["acc"], "test_macro_f1": metrics["macro_f1"]})
        if self.accelerator.is_main_process:
            log.info("test (best model, step %d): acc %.4f macro-F1 %.4f loss %.4f on %d texts", state.best_step,
                     metrics["acc"], metrics["macro_f1"], metrics["loss"], metrics["n"])
        return metrics

    # --- run records -------------------------------------------------------------------------------------------

    def _start(self) -> RunLog:
        """Restore the latest checkpoint (or seed a fresh run) and open the run's logs (W&B's run)."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        if self.resume_from is not None:
            failure = None
            try:  # every process reads its own random state: one missing (say) stops them all with one line each
                self.checkpoints.restore(self.resume_from, self.identity, cfg.train.seed)
            except Exception as exc:
                failure = exc
            fail_together(acc, failure, f"restore {self.resume_from}")
            changed = apply_optim_settings(cfg, self.optimizer.optimizer, self.scheduler, self.total_steps)
            # the rest against the last launch's config (the optimizer's: from the checkpoint; output_dir: this folder)
            changed += changes_since(self.run_dir / "config.yaml", cfg, OPTIMIZER_SETTINGS + ("output_dir",))
            if changed and acc.is_main_process:  # a run past its end trains no further: it is only tested again
                log.warning("%s at step %d with changed settings: %s", "testing the ended run again" if self._done()
                            else "resuming", state.step, ", ".join(changed))
            self.continues = cfg.checkpoint.resume == "auto"  # if settling a named one fails, the run is not as it was
            self.continues = not settle(acc, state, cfg.checkpoint.resume, self.resume_from, self.run_dir, self._done())
            self.started -= state.elapsed_s  # the time of the launches before, up to the checkpoint resumed from
        else:
            seed_dropout(cfg.train.seed, 0, acc.process_index)
            self.continues = False
        if (warning := schedule_warning(cfg, self.total_steps)) and acc.is_main_process:  # after a resume's checks
            log.warning(warning)
        self.debug.resume(state.step)
        state.run_id = state.run_id or new_run_id(acc)
        runlog = RunLog(cfg, self.run_dir, acc, state.run_id, state.step if self.own_resume else -1,
                        {**cfg.to_dict(), "launch": launch_topology(acc, self.layout, state.step, state.resumed_from)},
                        self.lock, history_after=state.step if self.continues else -1)
        fail_together(acc, runlog.start_error, "start W&B")  # before any step: a run with no dashboard is no use
        return runlog

    def _open(self, runlog: RunLog) -> None:
        """Collective, once W&B has started (inside fit's try: a failure here is reported to W&B and status.json
        like any other): start-up rows, and the run marked running with its config.yaml."""
        cfg, state = self.cfg, self.state
        runlog.begin()
        if state.batch_in_epoch >= self.steps_per_epoch:
            # saved by an earlier version at an epoch's last step, before that epoch's evaluation (unless a periodic
            # one fell on the step): evaluate now, so that the epoch's model is a candidate for best/
            if not (cfg.train.eval_every and state.step % cfg.train.eval_every == 0):
                self._validate(runlog)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        # a resumed run logs its start-up rows at its first new step: the checkpoint's step is already in W&B; a
        # relaunch after the end has none: its rows go to metrics.jsonl (and W&B's summary), not W&B's history
        self.ended_before = self.resume_from is not None and self._done()
        row = {"data/prepare_s": self.prepare_s, "data/cache_hit": int(self.data.cache_hit)}
        for e in (e for e in state.world_size_changes if e["step"] == state.step):  # resumed on another number
            row.update({"event/world_size_old": e["old_world_size"], "event/world_size_new": e["new_world_size"]})
        runlog.log(row, state.step + (1 if self.resume_from and not self.ended_before else 0))
        # the resolved config.yaml only now: a refused resume leaves the directory's config as it was
        self._write_records(runlog, config=True, state="running", step=state.step, pid=os.getpid())
        self.marked_running = True

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / self.steps_per_epoch

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the DDP wrapper and the optimizer while the interpreter is fully alive, then destroy the process
        group (left to interpreter exit, gloo's threads could still hold the last all-reduce's tensors when they are
        freed: "terminate called without an active exception", 3 of 6 two-process runs); then the lock, the signal
        handlers and the process-wide settings as they were."""
        import gc

        if self.model is None:  # closed already: the process settings may be another Trainer's by now
            return
        self.accelerator.free_memory()
        self.model = self.optimizer = self.checkpoints = self.ema = self.eval_model = None
        gc.collect()
        close_process_group()
        self.lock.release()
        self.stop.restore()
        restore_process_settings(self.settings_before)
