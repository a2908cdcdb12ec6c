"""Evaluation of a trained model folder: accuracy, macro-F1, per-class precision / recall / F1, ROC-AUC (two
classes) and calibration (ECE, metrics.py), with PNG figures.

    distsent-evaluate --model runs/imdb_lstm/best --split test            # the run's own data config
    distsent-evaluate --model runs/imdb_lstm/best --file labeled.jsonl    # .parquet, .jsonl or .csv (text, label)
    distsent-evaluate ... --out runs/imdb_lstm/eval-test                  # metrics.json, confusion.png, reliability.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import skip_final_collection
from .config import ConfigError
from .files import EXIT_WRITE, WriteError, atomic_write, writing
from .labels import class_label_names, digit_names, encode_labels, integers_are_positions, label_lookup
from .metrics import score_logits
from .readers import read_file
from .records import DataError
from .sources import folder_files, load_splits, records_digest


def report(result: dict, classes: list[str]) -> str:
    """The per-class table (precision, recall, F1, support: texts of the class, predicted: texts given it), then
    accuracy and macro-F1, whose average leaves out a class with neither (marked)."""
    width = max(len(c) for c in classes + ["macro-F1"])
    lines = [f"{'':{width}}  precision  recall      f1  support  predicted"]
    for i, c in enumerate(classes):
        predicted = sum(row[i] for row in result["confusion"])
        absent = "  (not in macro-F1: no texts, none predicted)" if not (predicted or result[f"support/{c}"]) else ""
        lines.append(f"{c:{width}}  {result[f'precision/{c}']:9.4f}  {result[f'recall/{c}']:6.4f}  "
                     f"{result[f'f1/{c}']:6.4f}  {result[f'support/{c}']:7d}  {predicted:9d}{absent}")
    wrong = result["n"] - round(result["acc"] * result["n"])
    lines.append(f"{'accuracy':{width}}  {result['acc']:.4f} of {result['n']} ({wrong} wrong)")
    lines.append(f"{'macro-F1':{width}}  {result['macro_f1']:.4f}")
    return "\n".join(lines)


def save_png(fig, path: Path) -> None:
    """Rendered in memory, written atomically: a full disk leaves no half-written image."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_figures(result: dict, classes: list[str], out: Path) -> list[Path]:
    """confusion.png and reliability.png (matplotlib; RuntimeError naming it where it cannot be imported)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the figures need matplotlib (a dependency of distsent: pip install matplotlib)") from exc
    out.mkdir(parents=True, exist_ok=True)
    cm, c = np.array(result["confusion"]), len(classes)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * c, 2.5 + 0.6 * c))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="actual",
           title=f"accuracy {result['acc']:.4f}\nmacro-F1 {result['macro_f1']:.4f}")  # fits 2 classes' width
    ax.set_xticklabels(classes, rotation=45 if c > 2 else 0, ha="right" if c > 2 else "center")
    ax.set_yticklabels(classes)
    save_png(fig, out / "confusion.png")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    rel = result["reliability"]
    low = 1 / c  # the top-label confidence is at least 1 / classes
    ax.plot([low, 1], [low, 1], "--", color="grey", label="perfect calibration")
    # each bar over its bin, inside the axes (the bin holding 1 / classes whole); the bin of exactly 1.0 is a point
    bars = [b for b in rel if b["hi"] > b["lo"]]
    ax.bar([b["lo"] for b in bars], [b["accuracy"] for b in bars], width=[0.9 * (b["hi"] - b["lo"]) for b in bars],
           align="edge", alpha=0.7, label="accuracy in bin")
    low = min([low] + [b["lo"] for b in rel])
    ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", color="C3", label="per bin")
    ax.set(xlim=(low, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"reliability (ECE {result['ece']:.4f})")
    ax.legend(loc="lower right", fontsize=8)
    save_png(fig, out / "reliability.png")
    return [out / "confusion.png", out / "reliability.png"]


def by_name(labels: np.ndarray, data_names: list[str], names: list[str]) -> np.ndarray:
    """Class indices among `data_names` as indices among the model's `names`: the same classes may come in another
    order (a hub data set's ClassLabel order against a CSV copy's sorted names)."""
    if data_names == names:
        return labels
    if sorted(data_names) != sorted(names):
        raise DataError(f"the data's classes {data_names} are not the model's {names}")
    return np.array([names.index(n) for n in data_names], dtype=np.int64)[labels]


def file_labels(split, names: list[str], cfg, where: str) -> np.ndarray:
    """The class indices of a --file's labels, read as training reads files (sources.load_splits): a ClassLabel
    file's integers (saved by datasets, a hub data set's own parquet) as its names; strings by name; other integers
    as labels.integers_are_positions says, and for a model trained on a hub data set without data.label_names (a
    model folder records where its data was, sources.located: no place is the hub) as the hub's positions unless the
    classes are digits ("1", "2": a file's 2 is class "2", as written)."""
    if split.class_label is not None:
        split.labels = class_label_names(split, where)
    hub = not (cfg.path or cfg.train_file or cfg.test_file) and not cfg.label_names
    positions = integers_are_positions(names, bool(cfg.label_names), hub and not digit_names(names))
    return encode_labels(split, names, label_lookup(names, positions), where)


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    parser = argparse.ArgumentParser(prog="distsent-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder, e.g. runs/imdb_lstm/best")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--split", choices=["train", "val", "validation", "dev", "test"],
                       help="a split of the data the model was trained with (val, validation and dev are the same)")
    where.add_argument("--file", type=Path, help="labeled texts: .csv, .jsonl or .parquet with the columns the model "
                       "was trained with (data.text_column, data.label_column: text, label)")
    parser.add_argument("--text-column", help="the text column of --file or of --data-path's files (default: the "
                        "model's data.text_column)")
    parser.add_argument("--label-column", help="the label column of --file or of --data-path's files (default: the "
                        "model's data.label_column)")
    parser.add_argument("--data-path", help="read --split from this folder instead of the model config's data "
                        "(data.path, or the files data.train_file etc. name)")
    parser.add_argument("--out", type=Path, help="folder for metrics.json, confusion.png and reliability.png")
    args = parser.parse_args(argv)
    if (args.text_column or args.label_column) and not (args.file or args.data_path):
        parser.error("--text-column and --label-column are for --file or --data-path (a folder of other files)")
    if args.data_path and args.file:
        parser.error("--data-path is for --split (a --file is read as it is)")
    if args.out and args.out.exists() and not args.out.is_dir():  # found before the scoring, not after
        parser.error(f"--out {args.out}: a file; --out names a folder for metrics.json and the figures")
    from .predict import Predictor

    try:
        predictor = Predictor.load(args.model)
        names, cfg = predictor.label_names, predictor.cfg.data
        columns = replace(cfg, text_column=args.text_column or cfg.text_column,
                          label_column=args.label_column or cfg.label_column)
        split_name = "val" if args.split in ("validation", "dev") else args.split
        folder = folder_files(Path(args.data_path).expanduser(), "--data-path") if args.data_path else {}
        # a folder's file of the split is read whole, as a --file (its classes the model's, whatever its train file
        # holds); a validation carved from a train file needs the model's data settings
        if args.file or (file := folder.get({"val": "validation"}.get(split_name, split_name))):
            split = read_file(args.file or file, columns)
            split.labels = file_labels(split, names, cfg, str(args.file or file))
        else:
            if args.data_path:  # the folder replaces every file the config names, which find_source would prefer;
                # its integer labels (aclImdb's) are the model's classes
                cfg = replace(columns, path=args.data_path, train_file="", validation_file="", test_file="",
                              label_names=list(names))
            try:
                splits, data_names = load_splits(cfg)
            except DataError as exc:
                if args.data_path:
                    raise
                raise DataError(f"{exc} (the model's own data settings; --data-path DIR reads the splits from a "
                                f"folder)") from exc
            split = splits[split_name]
            split.labels = by_name(split.labels, data_names, names)
        chosen_on = predictor.meta.get("val_texts")  # model folders of earlier versions: not known
        if split_name == "val" and chosen_on and records_digest(predictor.tokenized(split)) != chosen_on:
            data = f"the data in {args.data_path}" if args.data_path else "the data or its settings changed since"
            raise DataError(f"--split {args.split}: the validation texts read now are not those {args.model} was "
                            f"chosen on ({data}: other texts, or a validation carved from a training file that "
                            "changed, which holds texts the model trained on); score --split test, or a --file")
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:  # as predict's; DataError, IntegrityError too
        print(f"distsent-evaluate: {exc}", file=sys.stderr)
        return 2
    import torch

    heads = torch.from_numpy(predictor.logits(split.texts, heads=True)[0])
    model = predictor.model
    result = score_logits(model.combine(heads), split.labels, names, heads, model.head_names)
    summary = {k: v for k, v in result.items() if k != "reliability"}
    try:
        print(json.dumps(summary), flush=True)
    except OSError as exc:  # stdout on a full disk, or closed (a reader that stopped early)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"distsent-evaluate: cannot write the metrics: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_WRITE
    print(report(result, names), file=sys.stderr)
    if args.out:
        try:
            with writing(args.out):
                args.out.mkdir(parents=True, exist_ok=True)
            scored = {"model": str(Path(args.model).resolve()), "step": predictor.meta.get("step")} | (
                {"file": str(Path(args.file).resolve())} if args.file else {"split": split_name} | (
                    {"data_path": str(Path(args.data_path).resolve())} if args.data_path else {}))
            atomic_write(args.out / "metrics.json", json.dumps(scored | result, indent=1))  # and what was scored
            print(f"wrote {args.out / 'metrics.json'}", file=sys.stderr)
            for f in write_figures(result, names, args.out):
                print(f"wrote {f}", file=sys.stderr)
        except WriteError as exc:
            print(f"distsent-evaluate: {exc}", file=sys.stderr)
            return exc.exit_code
        except RuntimeError as exc:  # the metrics are written; say what is missing in one line
            print(f"distsent-evaluate: no figures: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
