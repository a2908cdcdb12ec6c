"""Initialise word embeddings from a local pretrained file (word2vec / GloVe text format)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .records import DataError


def load_vectors(path: str | Path, vocab: dict[str, int], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors [len(vocab), dim], found mask) for the vocabulary's words present in the file.

    Reads `word v1 v2 ... v_dim` lines; a word2vec header line (`count dim`), blank lines and a byte-order mark
    are skipped. A word is matched as it is, else lower-cased; an exact match wins over a lower-cased one whatever
    their order (frequency-ordered files often list "US" before "us"). The vector is the last `dim` fields, so a
    word holding spaces (GloVe 840B has some) is read, and skipped: vocabulary words have none. The first line's
    count of values, or any line with too few, is an error naming the file and line; so is a file that covers no
    vocabulary word.
    """
    path = Path(path).expanduser()  # as --check reads it
    if not path.is_file():
        raise DataError(f"model.pretrained_embeddings: {path} does not exist")
    if path.suffix.lower() in (".gz", ".zip", ".bz2", ".xz", ".bin"):  # read as text, its bytes would be no vectors
        raise DataError(f"model.pretrained_embeddings: {path} is compressed or binary; give the text file (word "
                        f"and values separated by spaces, one word a line)")
    vectors = torch.zeros(len(vocab), dim)
    match = torch.zeros(len(vocab), dtype=torch.int8)  # 0: none yet, 1: lower-cased, 2: exact
    first = True
    # lines end at \n only: a stray \r inside a line (a web-crawled word) would otherwise cut it in two
    with open(path, encoding="utf-8-sig", errors="replace", newline="\n") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if not line.strip() or (n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts)):
                continue  # a blank line, the word2vec header
            if len(parts) < dim + 1 or (first and len(parts) != dim + 1):
                tabs = " (values are separated by spaces; this line has tabs)" if "\t" in line else ""
                raise DataError(f"{path}:{n}: {len(parts) - 1} values, model.embedding_dim is {dim}{tabs}")
            first, word = False, " ".join(parts[:-dim])
            idx, rank = vocab.get(word), 2
            if idx is None:
                idx, rank = vocab.get(word.lower()), 1
            if idx is None or match[idx] >= rank:
                continue
            try:
                vectors[idx] = torch.tensor([float(v) for v in parts[-dim:]])
            except ValueError:
                raise DataError(f"{path}:{n}: not a number among the values") from None
            if not torch.isfinite(vectors[idx]).all():
                raise DataError(f"{path}:{n}: {word!r} has a non-finite value (nan or inf)")
            match[idx] = rank
    if not match.any():  # the wrong file (another language, a header alone): the run would learn from random ones
        raise DataError(f"model.pretrained_embeddings: {path} holds a vector for none of the vocabulary's "
                        f"{len(vocab)} words (matched as written or lower-cased)")
    return vectors, match > 0


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
