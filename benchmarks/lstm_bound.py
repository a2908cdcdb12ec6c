"""The kernel-only bound of a training step: the tutorial's recurrent layer (LSTM 128 -> 256, 2 layers) forward and
backward alone on a batch of the benchmark's shape, per precision; a step of the whole pipeline can be given as a
multiple of it (what is left above it is data and launch overhead).

    python benchmarks/lstm_bound.py [--device cuda] [--precisions no,bf16,fp16] [--batch 64] [--tokens 183]

Prints one JSON line per precision: milliseconds per forward + backward (mean over --steps after --warmup) and the
samples/s that bound implies. Precision as in distsent: the weights stay fp32, inputs run under autocast (bf16 on a
GPU: the LSTM in fp32, as distsent runs it there).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distsent.precision import bf16_rnn_runs_on

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bound(device: str, precision: str, batch: int, tokens: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(128, 256, num_layers=2, dropout=0.5, batch_first=True).to(device)
    x = torch.randn(batch, tokens, 128, device=device, requires_grad=True)
    # as distsent runs it: autocast, except where the device cannot run the LSTM in bf16 (a GPU, whose autocast would
    # run it in fp16): then the LSTM in fp32
    on = precision in DTYPES and not (precision == "bf16" and not bf16_rnn_runs_on(device))

    def step():
        with torch.autocast(device, dtype=DTYPES.get(precision, torch.bfloat16), enabled=on):
            out = lstm(x)[0]
        out[:, -1].float().sum().backward()
        return out.dtype

    computed = step()  # what the LSTM computed in
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()  # the clock stops when the GPU is done, not when the launches are
    ms = (time.perf_counter() - t0) / steps * 1000
    return {"device": device, "precision": precision, "lstm_dtype": str(computed).removeprefix("torch."),
            "batch": batch, "tokens": tokens, "ms_per_step": ms,
            "samples_per_s": batch / ms * 1000,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="no,bf16,fp16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=183, help="the mean IMDB review is 183 tokens when cut at 256")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    for precision in args.precisions.split(","):
        if precision == "fp16" and args.device == "cpu":
            continue  # fp16 autocast is a GPU precision here, as in distsent
        try:
            row = bound(args.device, precision, args.batch, args.tokens, args.steps, args.warmup)
        except RuntimeError as exc:  # e.g. a bf16 LSTM on a CPU or cuDNN that cannot run it
            row = {"device": args.device, "precision": precision, "error": str(exc).splitlines()[0]}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
