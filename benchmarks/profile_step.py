"""Where a training step's time goes: the tutorial's model under DDP over gloo, phase by phase.

    python benchmarks/profile_step.py [--procs 2] [--threads 1] [--batch 64] [--tokens 183] [--vocab 30000] [--steps 20]

Each of --procs processes (--threads threads each) trains on batch / procs random reviews of --tokens tokens and times,
per step: the forward pass, the backward pass with DDP's gradient all-reduce, the same backward without it
(`no_sync`), gradient clipping, and the optimizer step, for Adam's default (foreach) and fused implementations.
Then the all-reduce of a gradient of the model's size on its own, and the forward pass alone (evaluation) at several
batch sizes. Means over --steps steps after two warm-up steps, as seen by process 0.
"""

import argparse
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from distsent.config import ModelConfig
from distsent.model import SentimentRNN


def tutorial_model(vocab: int) -> SentimentRNN:
    return SentimentRNN(vocab, ModelConfig(embedding_dim=128, hidden_dim=256, num_layers=2, dropout=0.5))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(rank: int, args, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tutorial_model(args.vocab)
    ddp = DDP(model)
    g = torch.Generator().manual_seed(rank)
    per_rank = args.batch // args.procs
    # word frequencies fall off like a Zipf law: a batch touches a few thousand embedding rows, as real reviews do
    ids = (torch.rand(per_rank, args.tokens, generator=g) ** 3 * args.vocab).long().clamp(min=2)
    lengths = torch.full((per_rank,), args.tokens)
    labels = torch.randint(0, 2, (per_rank,), generator=g).float()
    rows = []
    for fused in (False, True):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        sums = dict.fromkeys(("forward", "backward + all-reduce", "backward, no all-reduce", "clip", "optimizer"), 0.0)
        for step in range(args.steps + 2):
            marks = [time.perf_counter()]
            loss = F.binary_cross_entropy_with_logits(ddp(ids, lengths), labels)
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            marks.append(time.perf_counter())
            opt.step()
            marks.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            with ddp.no_sync():
                loss = F.binary_cross_entropy_with_logits(ddp(ids, lengths), labels)
                no_sync = _timed(loss.backward)
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                fwd, bwd, clip, optim = (b - a for a, b in zip(marks, marks[1:]))
                for k, v in zip(sums, (fwd, bwd, no_sync, clip, optim)):
                    sums[k] += v / args.steps
        rows.append((f"Adam {'fused' if fused else 'foreach'}", sums))
    grad = torch.zeros(sum(p.numel() for p in model.parameters()))
    dist.barrier()
    allreduce = sum(_timed(lambda: dist.all_reduce(grad)) for _ in range(args.steps)) / args.steps
    if rank == 0:
        print(f"{args.procs} process(es) x {args.threads} thread(s), {per_rank} reviews x {args.tokens} tokens each, "
              f"{grad.numel() / 1e6:.2f}M parameters; ms per step:")
        names = list(rows[0][1])
        print("| optimizer | " + " | ".join(names) + " | step |")
        print("|---" * (len(names) + 2) + "|")
        for name, sums in rows:
            step = sum(v for k, v in sums.items() if k != "backward, no all-reduce")
            print(f"| {name} | " + " | ".join(f"{1e3 * sums[k]:.0f}" for k in names) + f" | {1e3 * step:.0f} |")
        print(f"all-reduce of a {grad.numel() * 4 / 2**20:.1f} MiB gradient alone: {1e3 * allreduce:.1f} ms")
    # the DDP wrapper's reducer holds the group and its last all-reduce's work: freed first (as Trainer.close does),
    # else gloo's threads can still hold that work at exit and abort the process
    del ddp, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def forward_only(args) -> None:
    """Evaluation's cost: the forward pass alone, one process with all threads, by batch size."""
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    model = tutorial_model(args.vocab).eval()
    print(f"forward only, 1 process x {torch.get_num_threads()} threads, {args.tokens} tokens:")
    for batch in (64, 256, 512):
        ids = torch.randint(2, args.vocab, (batch, args.tokens))
        lengths = torch.full((batch,), args.tokens)
        with torch.inference_mode():
            model(ids, lengths)
            seconds = sum(_timed(lambda: model(ids, lengths)) for _ in range(max(1, args.steps // 4)))
        print(f"  batch {batch}: {batch * max(1, args.steps // 4) / seconds:.0f} reviews/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--batch", type=int, default=64, help="global batch, split over the processes")
    ap.add_argument("--tokens", type=int, default=183, help="tokens per review (IMDB's mean when cut at 256)")
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.procs)
    forward_only(args)


if __name__ == "__main__":
    main()
