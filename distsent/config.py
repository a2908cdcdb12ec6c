"""The experiment configuration's schema: nested, documented dataclasses with strict checks; which settings are
a run's identity and which enter the token cache's keys. Reading and writing config files: configfile.py."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the full key path."""

    exit_code = 2  # as distsent-train exits on it


def _doc(text: str, default, resume=False, cache: str = "", cache_if_set: bool = False):
    """A dataclass field that carries its documentation (shown by `distsent-train --help-config`).

    resume=True: part of the run's identity, which a resumed run must keep unchanged (`resume_identity`); a
    function (bool): what it makes of the value is, instead of the value itself.
    cache: the stage of data preparation the setting changes ("split", "vocab" or "cut"), so that it enters the
    token cache's key for that stage (`DataConfig.stage_settings`). cache_if_set: a setting added after the cache
    existed enters the key only away from its default, so that entries prepared before it stay valid.
    """
    metadata = {"doc": text, "resume": resume, "cache": cache, "cache_if_set": cache_if_set}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    path: str = _doc("Local data: a folder with train / test files (and optionally validation, valid, val or dev), "
                     "each .csv, .jsonl or .parquet; or an aclImdb folder. Empty: data.train_file etc., else the "
                     "DISTSENT_DATA_PATH environment variable (a local copy of the default hub data set, IMDB), "
                     "else the Hugging Face hub.", "")
    train_file: str = _doc("Training file (.csv, .jsonl or .parquet), when the files are named one by one.", "")
    validation_file: str = _doc("Validation file; empty: validation is carved from training (data.val_fraction).", "")
    test_file: str = _doc("Test file (needed with data.train_file).", "")
    text_column: str = _doc("Column (or JSON key) holding the text.", "text", cache="split")
    label_column: str = _doc("Column (or JSON key) holding the label: an integer or a string.", "label",
                             cache="split")
    label_names: list[str] = _doc("The class names in order. String labels are looked up by name; integer labels are "
                                  "indices into it (matched by value where the names are integers), except under a "
                                  "datasets ClassLabel (a hub data set's, a parquet file's saved by datasets), which "
                                  "names them. Empty: the training data's ClassLabel names (all of them, in its "
                                  "order), else the sorted training labels (integer labels 0/1: negative, "
                                  "positive).", [], cache="split")
    hub_name: str = _doc("Hub dataset used when no local path is given.", "stanfordnlp/imdb")
    hub_config: str = _doc("Configuration of the hub dataset (empty: its default).", "", cache="split")
    hub_train_split: str = _doc("Hub split to train on.", "train", cache="split")
    hub_validation_split: str = _doc("Hub split for validation; empty: carved from training.", "", cache="split")
    hub_test_split: str = _doc("Hub split to test on.", "test", cache="split")
    limit: int = _doc("Use at most this many texts of the training file (a seeded random subset; a validation "
                      "carved from it comes out of them); 0 = all.", 0, resume=True, cache="split")
    test_limit: int = _doc("Use at most this many test texts (the same ones whatever the seeds); 0 = all.", 0,
                           cache="split")
    val_fraction: float = _doc("Share of the training texts held out for validation (model selection).", 0.1,
                               resume=True, cache="split")
    split_seed: int = _doc("Seed of the subset and validation carving (kept apart from the training seed).", 0,
                            resume=True, cache="split")
    stratify: bool = _doc("Carve validation (and the data.limit subset) with each class in its share of the "
                          "training data, so that a rare class is not left out of validation by chance.", False,
                          resume=True, cache="split", cache_if_set=True)
    max_len: int = _doc("Tokens kept per text.", 256, resume=True, cache="cut")
    truncate: str = _doc("Which tokens a long text keeps: 'head' (the first max_len) or 'tail' (the last).", "head",
                          resume=True, cache="cut")
    min_freq: int = _doc("A word needs this many occurrences in the training split to enter the vocabulary.", 5,
                          resume=True, cache="vocab")
    lowercase: bool = _doc("Lower-case text before splitting into words.", True, resume=True, cache="vocab")
    strip_html: bool = _doc("Replace HTML line breaks (<br />, frequent in IMDB) by spaces before splitting.", False,
                             resume=True, cache="vocab")
    symbols: bool = _doc("Keep punctuation and symbols, emoji among them, as tokens of one character each ('!', "
                         "'?', ':', ')', '\U0001F621'), where they carry meaning (tweets); off, they only separate "
                         "words, as in the reference pipeline.", False, resume=True, cache="vocab", cache_if_set=True)
    cache_dir: str = _doc("Where tokenized data is cached; empty: $DISTSENT_CACHE or ~/.cache/distsent.", "")
    bucket_batches: int = _doc("Length-aware batching: sort each pool of this many global batches by length "
                               "before cutting batches (less padding); 1 = no sorting.", 50, resume=True)

    def __post_init__(self):
        _check_choice("data.truncate", self.truncate, ("head", "tail"))
        _check_range("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("data.max_len", self.max_len, 1, 2**31 - 1)
        _check_min("data.min_freq", self.min_freq, 1)
        _check_min("data.bucket_batches", self.bucket_batches, 1)
        _check_min("data.limit", self.limit, 0)
        _check_min("data.test_limit", self.test_limit, 0)
        _check_min("data.split_seed", self.split_seed, 0)  # numpy's default_rng takes any other
        for name in ("text_column", "label_column", "hub_train_split", "hub_test_split"):  # an unset shell variable
            if not getattr(self, name).strip():  # ("" read ",text,label"'s unnamed index column: numbers as texts)
                raise ConfigError(f"data.{name}: empty; name the {name.replace('hub_', '').replace('_', ' ')}")

    def stage_settings(self, stage: str) -> dict:
        """The settings that change one stage of data preparation ("split", "vocab" or "cut"): its cache key."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("cache") == stage
                and not (f.metadata.get("cache_if_set") and getattr(self, f.name) == f.default)}


@dataclass
class ModelConfig:
    """Every model setting is part of the resume identity: a checkpoint's weights only fit the model they came from."""

    cell: str = _doc("Recurrent cell: 'lstm' or 'gru'.", "lstm", resume=True)
    embedding_dim: int = _doc("Word embedding size.", 128, resume=True)
    hidden_dim: int = _doc("Recurrent state size (per direction).", 256, resume=True)
    num_layers: int = _doc("Stacked recurrent layers.", 2, resume=True)
    dropout: float = _doc("Dropout between recurrent layers and before the classifier.", 0.5, resume=True)
    embedding_dropout: float = _doc("Dropout on the word embeddings.", 0.0, resume=True)
    bidirectional: bool = _doc("Read each text in both directions.", False, resume=True)
    pooling: str = _doc("How the text vector is formed: 'last' (state at the true end), 'mean', 'max' or "
                        "'attention' over the real tokens.", "last", resume=True)
    forget_bias: float = _doc("Initial LSTM forget-gate bias (PyTorch's default init is near 0; 1.0 helps an LSTM "
                              "carry information across long texts from the first steps). A GRU, which has no forget "
                              "gate, ignores it.", 0.0, resume=True)
    pretrained_embeddings: str = _doc("Local word2vec/GloVe text file to initialise the embeddings from; empty = "
                                      "random init. Read by a fresh start only: a resume takes the checkpoint's "
                                      "weights (whether vectors were used is the run's identity, not the path: the "
                                      "file may have moved).", "", resume=bool)
    freeze_embeddings: bool = _doc("Keep pretrained embeddings fixed during training (a new run refuses it without "
                                   "model.pretrained_embeddings).", False, resume=True)
    ngram_max_n: int = _doc("Longest word n-gram of a second classifier head beside the recurrent one: NBSVM-style "
                            "logistic regression over the text's distinct words and word n-grams, each scaled by "
                            "its naive-Bayes log-count ratio from the training split (2 = words and bigrams); "
                            "0 = no such head.", 0, resume=True)
    ngram_weight: float = _doc("Weight of the n-gram head's logit in the model's logit (recurrent + weight x "
                               "n-gram). Each head is trained by its own loss, so the weight only sets how much each "
                               "one's vote counts.", 1.0, resume=True)
    ngram_buckets: int = _doc("Hash buckets shared by the n-grams longer than one word.", 1 << 18, resume=True)
    members: int = _doc("Independently initialised copies of the recurrent model (an ensemble), trained side by "
                        "side on the same batches, each by its own loss and gradient clip; the model's prediction "
                        "averages their class probabilities. They share the n-gram head, if any, and start from the "
                        "same pretrained embeddings, if any. Costs members x the compute of one model.", 1,
                        resume=True)

    def __post_init__(self):
        _check_choice("model.cell", self.cell, ("lstm", "gru"))
        _check_choice("model.pooling", self.pooling, ("last", "mean", "max", "attention"))
        for name, high in (("embedding_dim", 2**16), ("hidden_dim", 2**16), ("num_layers", 256),
                           ("ngram_buckets", 2**31 - 1), ("members", 256)):  # beyond: torch's errors, or no memory
            _check_range(f"model.{name}", getattr(self, name), 1, high)
        _check_range("model.ngram_max_n", self.ngram_max_n, 0, 4)
        _check_min("model.ngram_weight", self.ngram_weight, 0.0)
        _check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        _check_range("model.embedding_dropout", self.embedding_dropout, 0.0, 1.0, high_open=True)
        _check_finite("model.forget_bias", self.forget_bias)


@dataclass
class OptimConfig:
    name: str = _doc("Optimizer: 'adam' or 'adamw'.", "adam")
    lr: float = _doc("Peak learning rate.", 1e-3)
    weight_decay: float = _doc("Weight decay (decoupled for adamw).", 0.0)
    betas: list[float] = _doc("Adam betas.", [0.9, 0.999])
    schedule: str = _doc("Learning-rate shape after warmup: 'constant', 'linear' or 'cosine' decay to min_lr_ratio.",
                         "constant")
    warmup_steps: int = _doc("Linear warmup from 0 over this many optimizer steps.", 0)
    min_lr_ratio: float = _doc("Final learning rate as a share of lr for the decaying schedules.", 0.0)
    clip_grad_norm: float = _doc("Clip the global gradient norm to this value; 0 = no clipping.", 5.0)

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("adam", "adamw"))
        _check_choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        _check_range("optim.lr", self.lr, 0.0, 10.0, low_open=True)
        _check_min("optim.weight_decay", self.weight_decay, 0.0)
        _check_min("optim.warmup_steps", self.warmup_steps, 0)
        _check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        # negative: every clip factor is negative and each step climbs the loss; 0 (not -1) means no clipping
        _check_min("optim.clip_grad_norm", self.clip_grad_norm, 0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)


@dataclass
class TrainConfig:
    epochs: int = _doc("Passes over the training split.", 5)
    global_batch_size: int = _doc("Samples per optimizer step, summed over all processes; the per-process batch "
                                  "and accumulation follow from the number of processes.", 64, resume=True)
    micro_batch_size: int = _doc("Largest per-process batch; 0 = global_batch_size / processes. Smaller values "
                                 "add gradient accumulation.", 0)
    eval_batch_size: int = _doc("Per-process batch for evaluation and prediction.", 256)
    mixed_precision: str = _doc("'auto' (fp16 with its gradient scaler on a GPU; bf16 on a CPU that runs the LSTM "
                                "natively in bf16; else fp32, a GRU on a CPU too; the run logs which and why), 'no' "
                                "(fp32), 'fp16' (GPU, with a gradient scaler) or 'bf16'; empty = what the launch "
                                "config says.", "")
    deterministic: bool = _doc("Deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic) so "
                               "that a GPU run and its resume are bitwise reproducible, at some speed; CPU runs are "
                               "reproducible without it.", False)
    seed: int = _doc("Seed of initialisation, shuffling and dropout.", 0, resume=True)
    log_every: int = _doc("Log training metrics every this many optimizer steps. train/loss is the training "
                          "objective: with several heads (n-gram head, ensemble members) their losses summed, with "
                          "label smoothing and class weights; val/loss is the model's plain loss.", 20)
    eval_every: int = _doc("Also evaluate every this many steps; 0 = only at epoch ends.", 0)
    max_steps: int = _doc("Stop after this many optimizer steps in all; 0 = run all epochs.", 0)
    early_stop_patience: int = _doc("Stop training after this many evaluations in a row without a better validation "
                                    "score (train.select_metric; the best model is then tested); 0 = never stop "
                                    "early.", 0)
    select_metric: str = _doc("Validation metric that picks the best model (best/) and drives early stopping: 'acc' "
                              "or 'macro_f1' (the mean of the classes' F1, for imbalanced classes).", "acc",
                              resume=True)
    class_weights: str = _doc("'none'; 'balanced': each text's loss weighted by n / (classes x texts of its "
                              "class) over the training split, so rare classes count as much as frequent ones; "
                              "'sqrt': the square root of that, rescaled to a mean of 1 per text (halfway, on a "
                              "log scale).", "none", resume=True)
    label_smoothing: float = _doc("Label smoothing: the training target keeps 1 - this on the true class and spreads "
                                  "this evenly over all classes (0 = plain one-hot targets). train/loss is then the "
                                  "smoothed loss; the val/ and test/ losses stay plain.", 0.0, resume=True)
    ema_decay: float = _doc("Keep an exponential moving average of the weights, updated after every optimizer step "
                            "with this decay (0.999: about the last 1,000 steps; warmed up as (1+n)/(10+n) over the "
                            "first n updates; a step the fp16 loss scaler skips counts too); validation, best/ and "
                            "the test use the averaged weights. 0 = off.", 0.0,
                            resume=True)
    threads: int = _doc("CPU threads per process; 0 = the cores available (or Slurm's SLURM_CPUS_PER_TASK, where "
                        "fewer) divided by the local processes.", 0)
    flush_denormal: bool = _doc("Flush subnormal floats to zero (much faster LSTM backward on some Intel CPUs). "
                                "Keep it the same between a run and its resume.", True)
    debug_records: bool = _doc("Debug: every process appends the ids of the samples it trains on to "
                               "<run>/debug/samples-rankN.jsonl and writes a digest of its final weights.", False)

    def __post_init__(self):
        _check_choice("train.mixed_precision", self.mixed_precision, ("", "auto", "no", "fp16", "bf16"))
        _check_min("train.epochs", self.epochs, 1)
        _check_min("train.global_batch_size", self.global_batch_size, 1)
        _check_min("train.micro_batch_size", self.micro_batch_size, 0)
        _check_min("train.eval_batch_size", self.eval_batch_size, 1)
        _check_min("train.log_every", self.log_every, 1)
        _check_min("train.eval_every", self.eval_every, 0)
        _check_min("train.max_steps", self.max_steps, 0)
        _check_min("train.early_stop_patience", self.early_stop_patience, 0)
        _check_choice("train.select_metric", self.select_metric, ("acc", "macro_f1"))
        _check_choice("train.class_weights", self.class_weights, ("none", "balanced", "sqrt"))
        _check_range("train.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        _check_range("train.ema_decay", self.ema_decay, 0, 1, high_open=True)
        _check_range("train.threads", self.threads, 0, 4096)
        _check_range("train.seed", self.seed, 0, 2**32 - 1)  # numpy's and torch's seeds


@dataclass
class CheckpointConfig:
    every: int = _doc("Write a checkpoint every this many optimizer steps (and at every epoch end); 0 = epoch ends.", 0)
    keep_last: int = _doc("Checkpoints kept; older ones are deleted once a newer one is complete.", 2)
    resume: str = _doc("'auto' (latest valid checkpoint of output_dir, if any), 'never' (a fresh start; refused "
                       "where output_dir holds an earlier run's checkpoints, best/ or metrics), or a checkpoint path.",
                       "auto")

    def __post_init__(self):
        _check_min("checkpoint.every", self.every, 0)
        _check_min("checkpoint.keep_last", self.keep_last, 1)
        if not self.resume:
            raise ConfigError("checkpoint.resume: must be 'auto', 'never' or a checkpoint path, got ''")


@dataclass
class DistConfig:
    timeout_s: int = _doc("Collective timeout: a process whose peer died exits after at most this long.", 600)
    stop_signals: list[str] = _doc("Signals that make the run checkpoint and exit (preemption; SIGINT: Ctrl-C, "
                                   "a second Ctrl-C stops at once without a checkpoint; SIGHUP: the terminal closed, "
                                   "unless a process started with it ignored, as by nohup; torchrun, which runs "
                                   "several processes, forwards it all the same).",
                                   ["SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP"])

    def __post_init__(self):
        _check_range("dist.timeout_s", self.timeout_s, 1, 10**8)  # 3 years; more overflows a timedelta at 8.6e13
        import signal

        for name in self.stop_signals:
            if name not in signal.Signals.__members__:
                raise ConfigError(f"dist.stop_signals: unknown signal {name!r}")
            if name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"dist.stop_signals: {name} cannot be caught, so it cannot ask for a checkpoint")


@dataclass
class WandbConfig:
    project: str = _doc("W&B project.", "distsent")
    entity: str = _doc("W&B entity (team or user); empty = your default.", "")
    name: str = _doc("Run name; empty = the run directory's name.", "")
    group: str = _doc("Run group.", "")
    tags: list[str] = _doc("Run tags.", [])
    notes: str = _doc("Run notes.", "")
    mode: str = _doc("'online', 'offline' (sync later with `wandb sync`) or 'disabled'. WANDB_MODE overrides it.",
                     "offline")
    log_model: bool = _doc("Upload best/ as a W&B artifact at the end.", True)

    def __post_init__(self):
        _check_choice("log.wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LogConfig:
    trackers: list[str] = _doc("Accelerate trackers to log to ('wandb', 'tensorboard', ...); [] = metrics.jsonl only.",
                               ["wandb"])
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"doc": "Weights & Biases settings."})


@dataclass
class ExperimentConfig:
    output_dir: str = _doc("Run directory: config, metrics, checkpoints, best model (a --config .yaml file's default: "
                           "runs/<its name>).", "runs/imdb_lstm")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Model."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer and schedule."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training loop."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "Checkpoints, resume."})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"doc": "Distributed run."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "Metrics and trackers."})

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("output_dir: empty; name the run directory (its checkpoints, metrics and best/)")
        self.output_dir = os.path.expanduser(self.output_dir)  # as every other path (a quoted ~ is not the shell's)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resume_identity(cfg: ExperimentConfig) -> dict:
    """What a resumed run must keep unchanged, by section: every field declared with resume=True.

    The checkpoint check compares these key by key, so a setting marked here is checked without further code.
    """
    out = {}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            # resume=True: the value; resume=a function (bool): what it makes of the value (whether one is set)
            keys = {f.name: f.metadata["resume"](getattr(value, f.name)) if callable(f.metadata["resume"]) else
                    getattr(value, f.name) for f in dataclasses.fields(value) if f.metadata.get("resume")}
            if keys:
                out[section.name] = keys
    return out


# --- checks used by __post_init__ ------------------------------------------------------------------------------

def _check_choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_finite(key, value):
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")


def _check_min(key, value, low):
    _check_finite(key, value)
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")


def _check_range(key, value, low, high, low_open=False, high_open=False):
    _check_finite(key, value)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{key}: must be in {lo}{low}, {high}{hi}, got {value!r}")
