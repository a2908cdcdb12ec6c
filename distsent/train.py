"""Training entry point.

Workstation, N processes (DDP on gloo for CPU, NCCL for GPUs):
    accelerate launch --config_file launch/cpu_2proc.yaml -m distsent.train --config configs/imdb_lstm.yaml
One process, no launcher:
    distsent-train --config configs/smoke.yaml output_dir=runs/smoke train.epochs=2
Any config key can be overridden as key.sub=value. `--help-config` lists every key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, describe, load_config
from .files import IntegrityError
from .sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsent-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"distsent-train: config error: {exc}", file=sys.stderr)
        return 2

    from .preemption import StopFlag

    stop = StopFlag(cfg.dist.stop_signals)  # before the slow start-up: a stop signal during it is kept, not fatal
    from .build import PeerFailed, close_process_group
    from .metrics import EXIT_NONFINITE, NonFiniteError
    from .runlock import RunLockedError
    from .trainer import Trainer

    # RANK from the launcher, not PartialState(): the Trainer must be first to set up the distributed state
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("accelerate", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(cfg, stop=stop)
        trainer.fit()
    except (ConfigError, DataError, IntegrityError, RunLockedError, PeerFailed) as exc:  # Integrity: checkpoint, best/
        print(f"distsent-train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"distsent-train: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:  # also when the start-up failed after the process group was created
        trainer.close() if trainer is not None else close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
