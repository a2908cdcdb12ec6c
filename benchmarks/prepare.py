"""Data preparation at scale: wall time and memory of preparing IMDB with N copies of its training split (a cold
token cache), then of loading it from the cache as every training process does, each in a fresh process.

    python benchmarks/prepare.py --data ../shared/data/imdb --copies 1 10

Memory: the peak resident set of the process (ru_maxrss), and at the end, after reading every training token as
an epoch does, its anonymous memory (private to it) and its file-backed memory (memory-mapped cache files: pages
of the page cache that all processes of the node share).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from distsent.config import DataConfig
from distsent.data import prepare

t = time.perf_counter()
data = prepare(DataConfig(path=sys.argv[1], cache_dir=sys.argv[2]))
seconds = time.perf_counter() - t
total = int(data.train.tokens.sum())  # touch every training token
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kb = lambda key: int(status[key].split()[0]) / 1024
print(json.dumps({"seconds": seconds, "cache_hit": data.cache_hit, "train_reviews": len(data.train),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": kb("RssAnon"), "file_mb": kb("RssFile")}))
"""


def copies_of(src: Path, n: int, out: Path) -> Path:
    """train.parquet repeated n times (the reviews numbered apart), test.parquet as it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    train = pq.read_table(src / "train.parquet").select(["text", "label"])
    pq.write_table(pa.concat_tables([train] * n), out / "train.parquet")
    pq.write_table(pq.read_table(src / "test.parquet").select(["text", "label"]), out / "test.parquet")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="IMDB as train.parquet / test.parquet")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.copies:
            data = copies_of(args.data, n, Path(tmp) / f"x{n}")
            cache = Path(tmp) / f"cache{n}"
            for phase in ("prepare (cold cache)", "load (cached)"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(cache)], capture_output=True,
                                     text=True, check=True)
                row = json.loads(out.stdout.splitlines()[-1])
                print(f"IMDB x{n:<3} {phase:21s} {row['train_reviews']:>7} train reviews  {row['seconds']:6.2f} s  "
                      f"peak RSS {row['peak_rss_mb']:7.0f} MB  at the end: anonymous {row['anon_mb']:6.0f} MB, "
                      f"file-backed {row['file_mb']:6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
