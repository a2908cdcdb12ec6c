"""Mixed precision that fits the machine: `train.mixed_precision: auto` becomes bf16 on a CPU whose recurrent layer
runs natively in bf16, fp16 (with its gradient scaler) on a GPU, fp32 elsewhere, with the reason."""

from __future__ import annotations

from pathlib import Path

import torch

# CUDA autocast hands cuDNN's RNN kernels fp16 whatever its own dtype: PyTorch's autocast wrapper for them
# (aten/src/ATen/cudnn/AutocastRNN.cpp, _cudnn_rnn_cast_reflatten) casts input, weights and states to half. Under bf16
# autocast the LSTM would train in fp16 without the gradient scaler fp16 needs, so on a GPU it runs in fp32 under bf16
# (cuDNN 9.13 takes bf16 RNN inputs, PyTorch PR 164411, but autocast never gives it any).
CUDA_RNN_AUTOCAST_DTYPE = torch.float16


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
        # on an H200 distsent trained 1.8x as many samples/s in fp16 as in fp32, and the IMDB configs in fp16 scored
        # as on a CPU (docs/results.md); bf16 would run cuDNN's layer in fp16 too (CUDA_RNN_AUTOCAST_DTYPE), unscaled
        return "fp16", ("a GPU runs cuDNN's recurrent layer fastest in fp16, which needs the gradient scaler fp16 "
                        "has (bf16 autocast would run it in fp16 without one): fp16")
    native = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    if native and cpu_supports_bf16_rnn():
        return "bf16", f"this CPU computes bf16 natively ({', '.join(sorted(native))}) and oneDNN runs the LSTM in it"
    return "no", "this CPU has no native bf16 (no avx512_bf16 or amx_bf16): fp32"


def run_device() -> str:
    """'cuda' or 'cpu': where Accelerate puts this run (a launch config's use_cpu keeps it on a GPU machine's CPU;
    after an earlier run in this process, the device that run set up, which Accelerate keeps)."""
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    if PartialState._shared_state:
        return PartialState().device.type
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def bf16_rnn_runs_on(device_type: str) -> bool:
    """Whether the recurrent layer can run under bf16 autocast on this device (else it runs in fp32): on a CPU with
    oneDNN's bf16 LSTM; never on a GPU, where autocast would run it in fp16 (CUDA_RNN_AUTOCAST_DTYPE)."""
    return device_type != "cuda" and cpu_supports_bf16_rnn()
