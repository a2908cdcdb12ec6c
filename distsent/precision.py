"""Mixed precision that fits the machine: `train.mixed_precision: auto` becomes bf16 where the recurrent layer runs
natively in bf16, fp32 elsewhere, with the reason."""

from __future__ import annotations

from pathlib import Path

import torch

# cuDNN takes bf16 inputs for its RNN kernels only from 9.13 (PyTorch PR 164411); before that a bf16 LSTM fails
# or leaves cuDNN for a slow path
CUDNN_BF16_RNN = 91300


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16_rnn() -> bool:
    """Whether this CPU's oneDNN can run an LSTM under bf16 autocast at all (it cannot without native bf16 on some
    processors: "could not create a primitive descriptor for the LSTM forward propagation primitive")."""
    rnn = torch.nn.LSTM(4, 4, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rnn(torch.zeros(1, 2, 4))[0].float().sum().backward()
        return True
    except RuntimeError:
        return False


def resolve(requested: str, device_type: str, cell: str = "lstm") -> tuple[str, str]:
    """(the precision Accelerate gets, why) for train.mixed_precision on a 'cpu' or 'cuda' device and the model's
    recurrent cell; only 'auto' is decided here, any other value is passed through."""
    if requested != "auto":
        return requested, "as configured"
    if cell == "gru" and device_type == "cpu":  # CPU autocast has no bf16 GRU: it would only add casts around it
        return "no", "the CPU runs a GRU in fp32 under bf16 autocast, which would only add casts: fp32"
    if device_type == "cuda":
        # not counting emulation, which torch counts by default: a V100 or T4 would "support" bf16 at a crawl
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return "no", "this GPU has no native bf16: fp32"
        version = torch.backends.cudnn.version() or 0
        if version < CUDNN_BF16_RNN:
            return "no", f"cuDNN {version} runs bf16 LSTMs only from version {CUDNN_BF16_RNN}: fp32"
        return "bf16", f"the GPU has bf16 and cuDNN {version} runs the LSTM in it"
    native = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    if native and cpu_supports_bf16_rnn():
        return "bf16", f"this CPU computes bf16 natively ({', '.join(sorted(native))}) and oneDNN runs the LSTM in it"
    return "no", "this CPU has no native bf16 (no avx512_bf16 or amx_bf16): fp32"


def bf16_rnn_runs_on(device_type: str) -> bool:
    """Whether the recurrent layer can run under bf16 autocast on this device (else it runs in fp32)."""
    if device_type == "cuda":
        return (torch.backends.cudnn.version() or 0) >= CUDNN_BF16_RNN
    return cpu_supports_bf16_rnn()
