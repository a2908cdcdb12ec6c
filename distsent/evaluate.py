"""Evaluation of a trained model folder: accuracy, F1, ROC-AUC and calibration (ECE), with PNG figures.

    distsent-evaluate --model runs/imdb_lstm/best --split test            # the run's own data config
    distsent-evaluate --model runs/imdb_lstm/best --file labeled.jsonl    # .parquet, .jsonl or .csv: text, label
    distsent-evaluate ... --out runs/imdb_lstm/eval-test                  # metrics.json, confusion.png, reliability.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError
from .data import DataError, RawSplit, carve, checked_split, find_source, read_split


def metrics(p_positive: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Accuracy, F1, ROC-AUC (rank statistic, ties averaged), ECE over `bins` equal-width confidence bins."""
    p, y = np.asarray(p_positive, float), np.asarray(labels, int)
    pred = (p >= 0.5).astype(int)
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    tn, fn = int(((pred == 0) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    auc = None
    if n_pos and n_neg:
        order = np.argsort(p, kind="mergesort")
        ranks = np.empty(len(p))
        sorted_p = p[order]
        # average ranks over ties
        _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
        avg = first + (counts + 1) / 2.0
        ranks[order] = np.repeat(avg, counts)
        auc = float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    conf = np.where(pred == 1, p, 1 - p)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            gap = abs(correct[m].mean() - conf[m].mean())
            ece += m.mean() * gap
            table.append({"lo": edges[b], "hi": edges[b + 1], "n": int(m.sum()), "confidence": float(conf[m].mean()),
                          "accuracy": float(correct[m].mean())})
    return {"n": len(y), "accuracy": float(correct.mean()), "f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "roc_auc": auc, "ece": float(ece), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "reliability": table}


def write_figures(result: dict, out: Path) -> list[Path]:
    """confusion.png and reliability.png (needs matplotlib: pip install 'distsent[plots]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("writing figures needs matplotlib: pip install matplotlib (or 'distsent[plots]')") from exc
    out.mkdir(parents=True, exist_ok=True)
    cm = np.array([[result["tn"], result["fp"]], [result["fn"], result["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["negative", "positive"], yticklabels=["negative", "positive"],
           xlabel="predicted", ylabel="actual", title=f"accuracy {result['accuracy']:.4f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    rel = result["reliability"]
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", label="perfect calibration")
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in rel], [b["accuracy"] for b in rel], width=0.5 / 15 * 0.9,
           alpha=0.7, label="accuracy in bin")
    ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", color="C3", label="per bin")
    ax.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"reliability (ECE {result['ece']:.4f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    return [out / "confusion.png", out / "reliability.png"]


def read_labeled_file(path: Path) -> RawSplit:
    """A file of labeled reviews: .parquet, .jsonl or .csv with `text` and `label` (0/1) columns."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet as pq

    readers = {".parquet": pq.read_table, ".jsonl": pyarrow.json.read_json, ".csv": pyarrow.csv.read_csv}
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .parquet, .jsonl or .csv)")
    try:
        table = readers[path.suffix](path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    for col in ("text", "label"):
        if col not in table.column_names:
            raise DataError(f"{path}: no '{col}' column (columns: {', '.join(table.column_names)})")
    return checked_split(table.column("text"), table.column("label").to_numpy(), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsent-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder, e.g. runs/imdb_lstm/best")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--split", choices=["val", "test"], help="a split of the data the model was trained with")
    where.add_argument("--file", type=Path, help="labeled reviews: .parquet, .jsonl or .csv with text, label")
    parser.add_argument("--data-path", help="override the model config's data.path for --split")
    parser.add_argument("--out", type=Path, help="folder for metrics.json, confusion.png and reliability.png")
    args = parser.parse_args(argv)
    from .predict import Predictor

    try:
        predictor = Predictor.load(args.model)
        if args.file:
            split = read_labeled_file(args.file)
        else:
            cfg = predictor.cfg.data
            if args.data_path:
                cfg.path = args.data_path
            src = find_source(cfg)
            split = carve(cfg, read_split(src, "train"), read_split(src, "test"))[args.split]
    except (FileNotFoundError, ConfigError, DataError) as exc:
        print(f"distsent-evaluate: {exc}", file=sys.stderr)
        return 2
    p_positive, _ = predictor.probabilities(split.texts)
    result = metrics(p_positive, split.labels)
    summary = {k: v for k, v in result.items() if k != "reliability"}
    print(json.dumps(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=1))
        for f in write_figures(result, args.out):
            print(f"wrote {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
