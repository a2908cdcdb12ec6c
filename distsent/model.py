"""The sentiment classifier: embedding -> LSTM/GRU -> pooling over the real tokens -> dropout -> linear, optionally
beside an n-gram logistic-regression head whose logit is added to it; optionally an ensemble of such models."""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def predicted_class(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The predicted class: for two classes the second when its logit is above 0 (not its probability above 0.5,
    which rounds to exactly 0.5 below a logit of about 1e-16); for more, the largest logit."""
    return logits.argmax(-1) if num_classes > 2 else (logits > 0).long()


class SentimentRNN(nn.Module):
    """The tutorial's SentimentLSTM, without its padding defect and with options.

    Inputs are right-padded id batches plus each review's true length. The classifier never reads a state that
    has seen padding: `last` pooling gathers the output at position length-1 (and, when bidirectional, the
    backward direction reads each review reversed within its own length), `mean`/`max`/`attention` mask the pads.
    A review's logit therefore does not depend on how long the other reviews of its batch are.
    Packed sequences would do the same, but on CPU they push PyTorch's LSTM off its fast oneDNN path.
    """

    def __init__(self, vocab_size: int, cfg: ModelConfig, num_classes: int = 2, pad_id: int = 0):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=pad_id)
        self.embedding_dropout = nn.Dropout(cfg.embedding_dropout)
        rnn_cls = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        between = cfg.dropout if cfg.num_layers > 1 else 0.0
        if cfg.bidirectional:
            # one (forward, backward) pair per layer, so the backward pass can start at each review's true end
            self.layers = nn.ModuleList(
                nn.ModuleList(rnn_cls(cfg.embedding_dim if i == 0 else 2 * cfg.hidden_dim, cfg.hidden_dim,
                                      batch_first=True) for _ in range(2))
                for i in range(cfg.num_layers))
        else:
            # one module per layer with nn.Dropout between them, not the module's own `dropout`: on a GPU, cuDNN
            # draws that dropout from a generator state of its own, which no checkpoint saves (a resume would not be
            # exact); nn.Dropout draws from torch's generator, which checkpoints restore
            self.rnn = nn.ModuleList(rnn_cls(cfg.embedding_dim if i == 0 else cfg.hidden_dim, cfg.hidden_dim,
                                             batch_first=True) for i in range(cfg.num_layers))
            self._register_load_state_dict_pre_hook(_stacked_layer_keys)
        self.between = nn.Dropout(between)
        out_dim = cfg.hidden_dim * (2 if cfg.bidirectional else 1)
        if cfg.pooling == "attention":
            self.attention = nn.Linear(out_dim, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        # two classes: the tutorial's single logit (sigmoid, BCE); more: one logit per class (softmax, cross-entropy)
        self.fc = nn.Linear(out_dim, 1 if num_classes == 2 else num_classes)
        self.ngrams = NgramHead(vocab_size, cfg, num_classes) if cfg.ngram_max_n else None
        self.head_names = ("rnn", "ngram") if self.ngrams is not None else ("rnn",)
        if cfg.cell == "lstm" and cfg.forget_bias:
            self._init_forget_bias(cfg.forget_bias)
        # Set by the trainer where the device cannot run the recurrent layer under bf16 autocast (a CPU whose oneDNN
        # lacks native bf16; a GPU, whose autocast would run cuDNN's in fp16): it then runs in fp32 while the rest
        # keeps the autocast dtype.
        self.rnn_fp32 = False

    def _init_forget_bias(self, value: float) -> None:
        """PyTorch orders LSTM gates (input, forget, cell, output): the second quarter of each bias is the forget
        gate. The forget gate sees b_ih + b_hh, so each gets half."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "bias_ih" in name or "bias_hh" in name:
                    h = p.shape[0] // 4
                    p[h: 2 * h].fill_(value / 2)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, heads: bool = False) -> torch.Tensor:
        """Two classes: one logit per review; with heads=True, one column per classifier head ([batch, 1] or
        [batch, 2] with the n-gram head), which the trainer gives each its own loss. C classes: [batch, C] logits,
        with heads=True [batch, heads, C]."""
        lengths = lengths.to(input_ids.device).clamp(min=1)
        x = self.embedding_dropout(self.embedding(input_ids))
        if self.rnn_fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                out = self._recurrent(x.float(), lengths)
        else:
            out = self._recurrent(x, lengths)
        logits = self.fc(self.dropout(self._pool(out, lengths))).float()  # [batch, 1] or [batch, C]
        per_head = [logits if self.num_classes == 2 else logits.unsqueeze(1)]  # the heads along dimension 1
        if self.ngrams is not None:
            per_head.append(self.ngrams(input_ids, lengths).unsqueeze(1))
        logits = torch.cat(per_head, dim=1) if len(per_head) > 1 else per_head[0]
        return logits if heads else self.combine(logits)

    def combine(self, head_logits: torch.Tensor) -> torch.Tensor:
        """The model's logit(s) from the per-head logits ([batch, heads] or [batch, heads, C]): recurrent +
        ngram_weight * n-gram."""
        if head_logits.shape[1] == 1:
            return head_logits[:, 0]
        return head_logits[:, 0] + self.cfg.ngram_weight * head_logits[:, 1]

    def head_losses(self, heads: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """Each review's loss, summed over the heads: BCE of each head's logit (two classes), cross-entropy (C).

        smoothing (label smoothing, as in torch's cross_entropy): the target puts 1 - smoothing on the true class and
        spreads smoothing evenly over all classes; for two classes the BCE target moves from y to
        y (1 - smoothing) + smoothing / 2, the same distribution."""
        if self.num_classes > 2:
            return sum(F.cross_entropy(heads[:, h], labels.long(), reduction="none", label_smoothing=smoothing)
                       for h in range(heads.shape[1]))
        targets = labels if not smoothing else labels * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(heads, targets.unsqueeze(1).expand_as(heads), reduction="none").sum(1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, classes] probabilities from the model's logits (two classes: [1 - p, p], p = sigmoid)."""
        if self.num_classes > 2:
            return torch.softmax(logits.double(), dim=-1)
        p = torch.sigmoid(logits.double())
        return torch.stack([1 - p, p], dim=-1)

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        return predicted_class(logits, self.num_classes)

    def _recurrent(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.cfg.bidirectional:
            for i, layer in enumerate(self.rnn):
                x = layer(self.between(x) if i else x)[0]
            return x
        rev = _reverse_index(lengths, x.shape[1])
        for i, (fwd, bwd) in enumerate(self.layers):
            if i:
                x = self.between(x)
            back = bwd(_gather_time(x, rev))[0]
            x = torch.cat([fwd(x)[0], _gather_time(back, rev)], dim=-1)
        return x

    def _pool(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pooling = self.cfg.pooling
        if pooling == "last":
            last = _gather_time(out, (lengths - 1).unsqueeze(1)).squeeze(1)
            if self.cfg.bidirectional:  # the backward direction ends at position 0
                h = self.cfg.hidden_dim
                last = torch.cat([last[:, :h], out[:, 0, h:]], dim=-1)
            return last
        mask = torch.arange(out.shape[1], device=out.device).unsqueeze(0) < lengths.unsqueeze(1)
        if pooling == "mean":
            return (out * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1).to(out.dtype)
        if pooling == "max":
            return out.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        scores = self.attention(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores.float(), dim=1).to(out.dtype).unsqueeze(-1) * out).sum(1)


class NgramHead(nn.Module):
    """A second classifier beside the recurrent one: NBSVM-style logistic regression over the review's word n-grams.

    Features are binary (does the review contain this word / n-gram?) and each is scaled by its naive-Bayes
    log-count ratio r = log((p / |p|) / (q / |q|)), counted over the positive (p) and negative (q) training reviews
    with add-one smoothing (Wang & Manning 2012). With C classes there is one such regression per class, one
    against the rest (p: the class's reviews, q: all others), giving C logits, as multi-class NBSVM does. The
    logit is the sum of r * w over the distinct n-grams present, plus a bias; w is learned. Word n-grams
    (n = 2..max_n) are hashed from the word ids into a fixed number of buckets, so the head needs no n-gram
    vocabulary and works on the token ids the recurrent layer reads, in training and in prediction. `fit_ratios`
    fills r from the training split before the first step; r is a buffer, so checkpoints and exported models
    carry it.
    """

    # A polynomial hash of the word ids, reduced modulo a prime after each word so it never leaves int64.
    _MULTIPLIER, _PRIME = 1_000_003, (1 << 31) - 1

    def __init__(self, vocab_size: int, cfg: ModelConfig, num_classes: int = 2):
        super().__init__()
        self.vocab_size, self.max_n, self.buckets = vocab_size, cfg.ngram_max_n, cfg.ngram_buckets
        self.num_classes = num_classes
        rows = vocab_size + (cfg.ngram_buckets if cfg.ngram_max_n > 1 else 0)
        shape = (rows,) if num_classes == 2 else (num_classes, rows)  # one regression, or one per class
        # zero: the head starts at its bias. r then sets how fast each feature's effective weight r * w moves
        # (Adam steps w by about lr whatever its gradient's size), so features with strong evidence learn first.
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape[:-1]))
        self.register_buffer("ratio", torch.zeros(shape))

    def ngram_ids(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids [batch, positions] of every word and n-gram, and a mask of those lying inside the review."""
        width = input_ids.shape[1]
        pos = torch.arange(width, device=input_ids.device).unsqueeze(0)
        ids, masks = [input_ids], [pos < lengths.unsqueeze(1)]
        key = input_ids
        for n in range(2, self.max_n + 1):
            if width < n:
                break
            key = (key[:, :-1] * self._MULTIPLIER + input_ids[:, n - 1:]).remainder(self._PRIME)
            ids.append(self.vocab_size + key.remainder(self.buckets))
            masks.append(pos[:, : width - n + 1] + n <= lengths.unsqueeze(1))
        return torch.cat(ids, dim=1), torch.cat(masks, dim=1)

    def present(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted row ids per review and a mask keeping each distinct id of the review once (binary features).
        Row 0, the padding word, is never a feature: an empty review (one <pad> token) scores the bias alone."""
        ids, mask = self.ngram_ids(input_ids, lengths)
        ids = ids.masked_fill(~mask, -1).sort(dim=1).values
        first = torch.ones_like(mask)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return ids.clamp(min=0), first & (ids > 0)

    @torch.no_grad()
    def fit_ratios(self, batches) -> None:
        """Set r from (input_ids, lengths, labels) batches of the training split."""
        rows = self.ratio.shape[-1]
        counts = torch.zeros(self.num_classes, rows, dtype=torch.float64)  # reviews of each class with each feature
        for input_ids, lengths, labels in batches:
            ids, keep = self.present(input_ids, lengths)
            for label in range(self.num_classes):
                present = keep & (labels == label).unsqueeze(1)
                counts[label] += torch.bincount(ids[present], minlength=rows).double()

        def ratio(c: int) -> torch.Tensor:  # class c against the rest, add-one smoothed
            p, q = counts[c] + 1, counts.sum(0) - counts[c] + 1
            return ((p / p.sum()) / (q / q.sum())).log()

        if self.num_classes == 2:
            self.ratio.copy_(ratio(1).float())
        else:
            self.ratio.copy_(torch.stack([ratio(c) for c in range(self.num_classes)]).float())

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[batch] logits (two classes), or [batch, C]."""
        ids, keep = self.present(input_ids, lengths)
        if self.num_classes == 2:
            return (self.ratio[ids] * self.weight[ids] * keep).sum(1) + self.bias
        return (self.ratio[:, ids] * self.weight[:, ids] * keep).sum(-1).T + self.bias


def _stacked_layer_keys(state_dict: dict, prefix: str, *args) -> None:
    """Load-time renaming for weights saved before a one-direction model kept one module per layer: the single
    module's `rnn.weight_ih_l1` is layer 1's `rnn.1.weight_ih_l0` (the values and their order are the same)."""
    for key in [k for k in state_dict if k.startswith(prefix + "rnn.")]:
        found = re.fullmatch(r"(\w+)_l(\d+)", key[len(prefix) + 4:])
        if found:
            state_dict[f"{prefix}rnn.{found[2]}.{found[1]}_l0"] = state_dict.pop(key)


def _reverse_index(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the time index that reverses the first `length` steps and leaves the padding after them."""
    t = torch.arange(width, device=lengths.device).unsqueeze(0)
    return torch.where(t < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - t, t)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Ensemble(nn.Module):
    """model.members independently initialised SentimentRNNs (a deep ensemble, Lakshminarayanan et al. 2017).

    Every member reads the same batches and is trained by its own loss: the heads are laid side by side along
    dimension 1, so the trainer's per-head losses give each member the gradient of its own loss alone. With the
    n-gram head there is one, shared: it starts at zero from ratios set by the data alone, so copies of it would
    stay identical; member i's logit is rnn_i + ngram_weight * ngram, as in a single model. The ensemble's
    prediction averages the members' class probabilities; its logits are those of that average (log-probabilities
    for C classes, log-odds for two), so metrics, calibration and prediction read it like any model. Member i's
    state lives under "members.i." in checkpoints and model folders, the n-gram head's under "ngrams.".
    """

    def __init__(self, vocab_size: int, cfg: ModelConfig, num_classes: int = 2):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        rnn_only = dataclasses.replace(cfg, ngram_max_n=0, members=1)
        self.members = nn.ModuleList(SentimentRNN(vocab_size, rnn_only, num_classes) for _ in range(cfg.members))
        self.ngrams = NgramHead(vocab_size, cfg, num_classes) if cfg.ngram_max_n else None
        self.head_names = tuple(f"rnn{i}" for i in range(cfg.members)) + (("ngram",) if self.ngrams else ())

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, heads: bool = False) -> torch.Tensor:
        per_head = [m(input_ids, lengths, heads=True) for m in self.members]  # [batch, 1] or [batch, 1, C] each
        if self.ngrams is not None:
            per_head.append(self.ngrams(input_ids, lengths).unsqueeze(1))
        head_logits = torch.cat(per_head, dim=1)
        return head_logits if heads else self.combine(head_logits)

    def combine(self, head_logits: torch.Tensor) -> torch.Tensor:
        """The logits of the members' mean probabilities, from all heads side by side."""
        k = len(self.members)
        logits = head_logits[:, :k]  # [batch, members(, C)]
        if self.ngrams is not None:
            logits = logits + self.cfg.ngram_weight * head_logits[:, k:]
        if self.num_classes > 2:
            return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(k)
        # log p - log(1 - p) of the mean p, in log space so that confident members do not round to 0 or 1
        return torch.logsumexp(F.logsigmoid(logits), dim=1) - torch.logsumexp(F.logsigmoid(-logits), dim=1)

    def head_losses(self, heads: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return self.members[0].head_losses(heads, labels, smoothing)  # summed over all the heads

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.members[0].probabilities(logits)

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        return self.members[0].predicted(logits)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameters each gradient clip covers: each member's, and the n-gram head's, apart, so that no member's
        gradient is scaled down by another's (a single model clips its recurrent and n-gram parts together)."""
        return [list(m.parameters()) for m in self.members] + ([list(self.ngrams.parameters())] if self.ngrams else [])


def clip_gradients(acc, model, max_norm: float) -> torch.Tensor:
    """Clip the gradients' norm to max_norm and return it as it was before: Accelerate's clip over all parameters,
    or, for an ensemble, each member (and the shared n-gram head) on its own, as it would be clipped alone; the
    norm returned is then the largest of theirs."""
    if not isinstance(model, Ensemble):
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    acc.unscale_gradients()  # fp16: once, as acc.clip_grad_norm_ does before it clips
    return torch.stack([torch.nn.utils.clip_grad_norm_(group, max_norm) for group in model.clip_groups()]).max()


def members(model: nn.Module) -> list[SentimentRNN]:
    """The SentimentRNNs of a model: its ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def build_model(vocab_size: int, cfg: ModelConfig, num_classes: int = 2) -> SentimentRNN | Ensemble:
    if cfg.members > 1:
        return Ensemble(vocab_size, cfg, num_classes)
    return SentimentRNN(vocab_size, cfg, num_classes)


def moving_average(model: nn.Module, decay: float):
    """train.ema_decay: torch's AveragedModel keeping an exponential moving average of `model`'s weights (its first
    update copies them); None when off. Every process updates its own from identical weights, so they agree. The
    decay warms up as (1 + n) / (10 + n) after n updates (TensorFlow's rule for it): at a fixed 0.999 the first
    step's weights would still be 37% of the average 1,000 steps later, and 84% at a first evaluation 176 steps in."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        d = min(decay, (1 + float(n_averaged)) / (10 + float(n_averaged)))  # AveragedModel syncs on it already
        torch._foreach_lerp_(averaged, current, 1 - d)  # as torch's own get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=update)
