"""Run assembly: the accelerator, threads and batch layout, data, model, optimizer and schedule, from the config."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from . import files
from .config import ConfigError, ExperimentConfig, resume_identity
from .data import PreparedData, cache_root, prepare, size_warnings
from .runlock import RunLock, RunLockedError
from .model import build_model, members
from .precision import bf16_rnn_runs_on, resolve, run_device
from .sampler import Layout
from .tokenizer import TokenizedSplit
from .together import fail_together, forget_group, from_main, set_group_timeout
from .tracking import WANDB_ENV, num_machines

log = logging.getLogger("distsent")


def check_trackers(log_cfg) -> None:
    """A misspelt tracker name would stop Accelerator() with a traceback, and one whose package is missing would log
    nothing with only a warning: a ConfigError naming it instead, from --check too; W&B's settings as wandb validates
    them."""
    names = log_cfg.trackers
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known, installed = [t.value for t in LoggerType], [t.value for t in get_available_trackers()]
    for name in names:
        if name not in known:
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; Accelerate's are {', '.join(known)}")
        if name not in installed and name != "all":  # "all": those installed
            raise ConfigError(f"log.trackers: {name!r} is not installed in this Python environment (pip install "
                              f"{name.replace('_', '-')}, or leave it out)")
    if {"wandb", "all"} & set(names) and "wandb" in installed:
        check_wandb_settings(log_cfg.wandb)


# log.wandb's keys and the wandb.Settings fields that validate them
_WANDB_FIELDS = {"project": "project", "entity": "entity", "name": "run_name", "group": "run_group",
                 "notes": "run_notes", "mode": "mode", "tags": "run_tags"}


def check_wandb_settings(wandb_cfg) -> None:
    """The W&B settings in effect (a WANDB_* variable wins over the YAML), each validated by wandb.Settings itself:
    one wandb refuses (a '/' in the project, a tag of 65 characters, WANDB_MODE=ofline) would stop the run at its
    start, and --check should say so first; and no spaces around a tag (wandb keeps them: another tag). A variable
    exported empty counts: wandb reads it so (WANDB_MODE='' is no mode)."""
    try:
        import wandb
    except Exception as exc:  # installed but broken (a protobuf it cannot use, say): it would fail at the start
        raise ConfigError(f"log.trackers: wandb is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                          "repair it, or leave wandb out of log.trackers") from None
    for key, field in _WANDB_FIELDS.items():
        env = "WANDB_TAGS" if key == "tags" else WANDB_ENV[key]
        from_env = os.environ.get(env)  # None: not set; '' counts
        where = f"{env}={from_env!r} (environment)" if from_env is not None else f"log.wandb.{key}"
        value = from_env if from_env is not None else getattr(wandb_cfg, key)
        if key == "tags":  # wandb reads WANDB_TAGS as written, empty tags included
            value = tuple(value.split(",") if from_env is not None else value)
            if spaced := next((tag for tag in value if tag != tag.strip()), None):
                raise ConfigError(f"{where}: tag {spaced!r} has spaces around it, which W&B keeps (another tag than "
                                  "the word)" + (": separate tags by commas alone" if from_env else ""))
        if not value and from_env is None:
            continue
        try:
            wandb.Settings(**{field: value})
        except Exception as exc:  # wandb's UsageError, or pydantic's ValidationError, whose errors() hold the why
            why = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise ConfigError(f"{where}: W&B refuses it: {why}") from None


def build_accelerator(cfg: ExperimentConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    check_trackers(cfg.log)
    set_group_timeout(cfg.dist.timeout_s)
    if cfg.train.deterministic:
        # before the first CUDA call: cuBLAS needs a fixed workspace for deterministic results
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel (in evaluation metrics, say) warns instead of failing
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # None: take the launch config's (ACCELERATE_MIXED_PRECISION)
    mp, why = resolve(cfg.train.mixed_precision, run_device(), cfg.model.cell)
    mp = mp or None
    # Accelerate's own multi-CPU launch goes through mpirun; under torchrun (accelerate launch --multi_gpu) on a
    # machine without GPUs, cpu=True gives DDP over gloo instead of N unconnected single processes.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # broadcast_buffers=False: the model's only buffer, the n-gram head's ratios, is computed identically on every
    # process and never changes, so DDP need not re-send its 4 MB before every forward. PyTorch 2.13 deprecates the
    # argument (for forward_sync_buffers), but Accelerate passes it to DDP whatever its value: its FutureWarning,
    # printed twice per process at every start, tells the user of nothing they can change.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    acc = Accelerator(cpu=cpu or None, mixed_precision=mp, log_with=list(cfg.log.trackers) or None,
                      project_dir=str(run_dir),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)),
                                       DistributedDataParallelKwargs(broadcast_buffers=False)])
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use 'bf16' or 'no' on a CPU")
    if cfg.train.mixed_precision == "auto" and acc.is_main_process:
        log.info("mixed precision auto -> %s: %s", acc.mixed_precision, why)
    return acc


def layout_for(cfg: ExperimentConfig, world_size: int) -> Layout:
    """The batch layout over `world_size` processes; ConfigError where the global batch does not split over them."""
    try:
        return Layout.build(cfg.train.global_batch_size, world_size, cfg.train.micro_batch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_layout(cfg: ExperimentConfig, acc) -> Layout:
    """How each global batch splits over processes and micro-batches; Accelerate accumulates accordingly."""
    layout = layout_for(cfg, acc.num_processes)
    acc.gradient_accumulation_steps = layout.accum_steps
    warning = layout_warning(layout, cfg.train.micro_batch_size)
    if warning and acc.is_main_process:
        log.warning(warning)
    return layout


def layout_warning(layout: Layout, micro_batch_cap: int) -> str | None:
    """A micro-batch cap that each process's share of the global batch divides badly: it still trains the same
    steps, but through many tiny micro-batches (74 over 2 processes under a cap of 32: 37 micro-batches of 1)."""
    if not micro_batch_cap or layout.micro_batch * 2 > micro_batch_cap:
        return None
    return (f"train.micro_batch_size {micro_batch_cap}: the {layout.global_batch // layout.world_size} texts of "
            f"each process divide only into {layout.accum_steps} micro-batches of {layout.micro_batch}; a global "
            f"batch that is a multiple of {layout.world_size * micro_batch_cap} (processes x micro-batch) would run "
            f"in full ones")


def announce(acc, layout: Layout, run_dir: Path) -> None:
    """The start-up lines: where the run writes, and how it is laid out over processes and threads."""
    if acc.is_main_process:
        print(f"distsent: run directory {run_dir.resolve()}", flush=True)
        log.info("%d process(es) on %d machine(s), device %s, mixed precision %s, global batch %d = %d x %d x %d "
                 "(processes x micro-batch x accumulation), %d thread(s) per process", acc.num_processes,
                 num_machines(), acc.device, acc.mixed_precision, layout.global_batch, layout.world_size,
                 layout.micro_batch, layout.accum_steps, torch.get_num_threads())


def build_data(cfg: ExperimentConfig, acc, run_dir: Path, resuming: bool) -> tuple[PreparedData, float]:
    """The tokenized splits (and the seconds it took). The run keeps its tokenizer.json, so a resume from one of its
    own checkpoints (`resuming`) keeps its vocabulary; a fresh start or a branch builds the vocabulary from the data
    (a tokenizer.json left by a start that failed before its first checkpoint may come from other data)."""
    tok_path, t0 = run_dir / "tokenizer.json", time.perf_counter()
    # In three turns: the main process builds the vocabulary and the token cache; then one process per other machine
    # reads it, or builds it once where $DISTSENT_CACHE is local to each machine (not each of its processes at once,
    # with their memory); then the rest read it. If a turn fails (bad data, a full disk), every process stops with it
    # in one line instead of failing out of a collective.
    data = None
    for my_turn in (acc.is_main_process, acc.is_local_main_process, True):
        failure = None
        if my_turn and data is None:
            try:
                data = _prepare_here(cfg, acc, tok_path, resuming)
            except Exception as exc:  # raised by fail_together, on this process, with its traceback
                failure = exc
        fail_together(acc, failure, "prepare the data")
    seconds = time.perf_counter() - t0
    if acc.is_main_process:
        log.info("data: %d train / %d val / %d test texts, vocabulary %d (%s), classes %s", len(data.train),
                 len(data.val), len(data.test), data.tokenizer.get_vocab_size(),
                 "from cache" if data.cache_hit else "tokenized now", ", ".join(data.label_names))
        said = size_warnings(data.train.labels, data.val.labels, data.label_names, cfg.train.global_batch_size,
                             data.test.labels, bool(cfg.data.label_names)) + [data.wordless_warning(cfg.data.symbols)]
        for warning in filter(None, said):
            log.warning(warning)
    return data, seconds


def _prepare_here(cfg: ExperimentConfig, acc, tok_path: Path, resuming: bool) -> PreparedData:
    """This process's data: the main process saves the run's tokenizer.json (unless a resume has one), which the
    others then read, so that every process has the run's vocabulary."""
    if acc.is_main_process:
        data = prepare(cfg.data, tok_path if resuming and tok_path.is_file() else None)
        if not (resuming and tok_path.is_file()):
            files.atomic_write(tok_path, data.tokenizer.to_str())
        return data
    data = prepare(cfg.data, tok_path if tok_path.is_file() else None)
    if not data.cache_hit:
        log.warning("data: no token cache for it under %s on %s: prepared here (a cache the machines share saves "
                    "each one this)", cache_root(cfg.data), socket.gethostname())
    return data


def batch_tensors(split: TokenizedSplit, idx: np.ndarray, device="cpu"):
    """(ids, lengths, labels) of reviews `idx`: right-padded ids, true lengths, float labels."""
    ids, lengths = split.batch(idx)
    return (torch.from_numpy(ids).to(device, non_blocking=True), torch.from_numpy(lengths).to(device),
            torch.from_numpy(split.labels[idx]).float().to(device))


def check_new_model(cfg: ExperimentConfig) -> None:
    """What a new run's model refuses (a resumed one keeps what it was trained with)."""
    if cfg.model.freeze_embeddings and not cfg.model.pretrained_embeddings:
        raise ConfigError("model.freeze_embeddings: needs model.pretrained_embeddings (random embeddings kept fixed "
                          "would never learn)")


def build_run_model(cfg: ExperimentConfig, acc, data: PreparedData, resuming: bool = False):
    """The model with identical initial weights on every process, pretrained embeddings and n-gram ratios set. A
    resume does not read the vectors' file (the checkpoint's weights replace them; the file may have moved)."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    model = build_model(data.tokenizer.get_vocab_size(), cfg.model, data.num_classes)
    if acc.mixed_precision == "bf16" and not bf16_rnn_runs_on(acc.device.type):
        for member in members(model):
            member.rnn_fp32 = True
        if acc.is_main_process:
            why = ("on a GPU, autocast would run it in fp16, unscaled" if acc.device.type == "cuda" else
                   "this CPU's oneDNN has no bf16 recurrent layer")
            log.warning("bf16: the recurrent layer runs in fp32 (%s), the rest under bf16 autocast", why)
    if not resuming:
        check_new_model(cfg)
    if cfg.model.pretrained_embeddings and resuming:
        for member in members(model):
            member.embedding.weight.requires_grad_(not cfg.model.freeze_embeddings)
    elif cfg.model.pretrained_embeddings:
        from .embeddings import init_embedding

        coverage = init_embedding([m.embedding for m in members(model)], cfg.model.pretrained_embeddings,
                                  data.tokenizer.get_vocab(), cfg.model.freeze_embeddings)
        if acc.is_main_process:
            log.info("embeddings: %.1f%% of the vocabulary initialised from %s", 100 * coverage,
                     cfg.model.pretrained_embeddings)
    if model.ngrams is not None:  # naive-Bayes ratios from the training split: the same on every process
        train = data.train
        model.ngrams.fit_ratios(batch_tensors(train, idx) for idx in np.array_split(
            np.arange(len(train)), max(1, len(train) // 256)))
    return model


def build_optimizer(cfg: ExperimentConfig, model):
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # fused: one kernel over all parameters; for the tutorial's model on one CPU thread the step takes 10 ms
    # instead of 45 ms with the default (foreach) implementation
    return cls([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas),
               weight_decay=o.weight_decay, fused=True)


def lr_factor(cfg: ExperimentConfig, step: int, total_steps: int) -> float:
    """Linear warmup, then constant / linear / cosine decay to min_lr_ratio at total_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def schedule_warning(cfg: ExperimentConfig, total_steps: int) -> str | None:
    """A warmup that outlasts the run (a recipe's warmup on a small data set): the learning rate never reaches
    optim.lr and the schedule never decays."""
    o = cfg.optim
    if o.warmup_steps < total_steps:
        return None
    return (f"optim.warmup_steps={o.warmup_steps} is not below the run's {total_steps} steps: the learning rate never "
            f"reaches optim.lr={o.lr}" + ("" if o.schedule == "constant" else f" and the {o.schedule} decay never "
                                           f"starts") + "; lower optim.warmup_steps (to a tenth of the steps, say)")


def build_scheduler(cfg: ExperimentConfig, optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total_steps))


OPTIMIZER_SETTINGS = ("optim.lr", "optim.betas", "optim.weight_decay")  # read back from the optimizer on a resume


def apply_optim_settings(cfg: ExperimentConfig, optimizer, scheduler, total_steps: int) -> list[str]:
    """After a resume: the config's optimizer (adam or adamw), lr, betas and weight decay, which loading the
    checkpoint's optimizer and scheduler state replaced with the values it was saved with, and the rate of the
    config's schedule (another train.epochs or max_steps moves a decaying schedule's end). Returns what changed.
    Unchanged settings give back the very same floats, so an exact resume stays bitwise."""
    o, changed = cfg.optim, []
    saved_next_lr, saved_lr = scheduler.get_last_lr()[0], optimizer.param_groups[0]["initial_lr"]
    settings = {"lr": ("initial_lr", o.lr), "betas": ("betas", tuple(o.betas)),
                "weight_decay": ("weight_decay", o.weight_decay)}
    for name, (key, value) in settings.items():
        before = optimizer.param_groups[0][key]
        before = tuple(before) if name == "betas" else before  # a list once loaded from a checkpoint
        if before != value:
            changed.append(f"optim.{name} {before} -> {value}")
        for group in optimizer.param_groups:
            group[key] = value
    for group in optimizer.param_groups:  # AdamW is Adam with this flag, which a checkpoint's param groups carry
        group["decoupled_weight_decay"] = o.name == "adamw"
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    # the rate of the next step, as LambdaLR would have set it at its last step
    scheduler._last_lr = [o.lr * lr_factor(cfg, scheduler.last_epoch, total_steps)] * len(optimizer.param_groups)
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    # the schedule's factor moved (not only the peak rate it multiplies)
    if not math.isclose(scheduler._last_lr[0] / o.lr, saved_next_lr / saved_lr, rel_tol=1e-9):
        changed.append(f"the next step's learning rate {saved_next_lr:.6g} -> {scheduler._last_lr[0]:.6g} (the "
                       f"{o.schedule} schedule over {total_steps} steps)")
    return changed


def run_identity(cfg: ExperimentConfig, data: PreparedData) -> dict:
    """What a checkpoint must share with this run to be resumed: the config's resume identity, the vocabulary, the
    classes and the training data's content (data_content: the same texts and labels, wherever they lie now)."""
    vocab = hashlib.sha256(json.dumps(sorted(data.tokenizer.get_vocab().items())).encode()).hexdigest()
    return {**resume_identity(cfg), "vocab_sha256": vocab, "label_names": data.label_names,
            "data_content": data.content}


def class_weights(cfg: ExperimentConfig, data: PreparedData, device) -> torch.Tensor | None:
    """Per-class loss weights over the training split: balanced = n / (classes x count of the class); sqrt = its
    square root, rescaled so that the mean weight of a training review stays 1 (the learning rate keeps its
    meaning), as balanced's already is."""
    if cfg.train.class_weights == "none":
        return None
    counts = np.bincount(np.asarray(data.train.labels), minlength=data.num_classes)
    weights = len(data.train) / (data.num_classes * counts)
    if cfg.train.class_weights == "sqrt":
        weights = np.sqrt(weights)
        weights = weights * len(data.train) / (weights * counts).sum()
    return torch.tensor(weights, dtype=torch.float32, device=device)


def new_run_id(acc) -> str:
    """One run id for all processes (the tracker run continues under it after a resume)."""
    import secrets

    return from_main(acc, secrets.token_hex(4) if acc.is_main_process else "")


def lock_run_dir(run_dir: Path, acc) -> RunLock:
    """The main process takes the run directory's lock; every process raises its RunLockedError if it is refused
    (or its WriteError if it cannot be written), so that all of them stop together, before anything is written."""
    lock, refused = RunLock(run_dir), None
    if acc.is_main_process:
        try:
            lock.acquire()
        except (RunLockedError, files.WriteError) as exc:
            refused = exc
    try:
        refused = from_main(acc, refused)
    except BaseException:  # a peer lost (or Ctrl-C) while the refusal is shared: the lock must not outlive this
        lock.release()
        raise
    if refused is not None:
        raise refused
    return lock


def close_process_group() -> None:
    """Destroy the process group, if there is one, before the interpreter exits (see Trainer.close)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        forget_group()
        dist.destroy_process_group()
