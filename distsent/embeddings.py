"""Initialise word embeddings from a local pretrained file (word2vec / GloVe text format)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .readers import DataError


def load_vectors(path: str | Path, vocab: dict[str, int], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors [len(vocab), dim], found mask) for the vocabulary's words present in the file.

    Reads `word v1 v2 ... v_dim` lines; a word2vec header line (`count dim`) is skipped. Words are matched as
    they are, then lower-cased. A line with the wrong number of values is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model.pretrained_embeddings: {path} does not exist")
    vectors = torch.zeros(len(vocab), dim)
    found = torch.zeros(len(vocab), dtype=torch.bool)
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if len(parts) != dim + 1:
                raise DataError(f"{path}:{n}: {len(parts) - 1} values, model.embedding_dim is {dim}")
            for word in (parts[0], parts[0].lower()):
                idx = vocab.get(word)
                if idx is not None and not found[idx]:
                    try:
                        vectors[idx] = torch.tensor([float(v) for v in parts[1:]])
                    except ValueError:
                        raise DataError(f"{path}:{n}: not a number among the values") from None
                    if not torch.isfinite(vectors[idx]).all():
                        raise DataError(f"{path}:{n}: {parts[0]!r} has a non-finite value (nan or inf)")
                    found[idx] = True
    return vectors, found


def init_embedding(embeddings: torch.nn.Embedding | Iterable[torch.nn.Embedding], path: str, vocab: dict[str, int],
                   freeze: bool) -> float:
    """Copy pretrained vectors into the rows they cover of one embedding or of several (an ensemble's; the file
    is read once); other rows keep their random init. Returns the coverage."""
    embeddings = [embeddings] if isinstance(embeddings, torch.nn.Embedding) else list(embeddings)
    vectors, found = load_vectors(path, vocab, embeddings[0].embedding_dim)
    for embedding in embeddings:
        with torch.no_grad():
            embedding.weight[found] = vectors[found]
            if embedding.padding_idx is not None:
                embedding.weight[embedding.padding_idx].zero_()
        embedding.weight.requires_grad_(not freeze)
    return found.float().mean().item()
