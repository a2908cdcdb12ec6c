"""On a CUDA GPU: padding invariance under cuDNN, fp16 with its gradient scaler, bf16, a bitwise resume after a
signal, and GPU-written checkpoints and models used on a CPU. Every test skips where CUDA is absent (as in CI);
`benchmarks/gpu_check.sh` runs them on a GPU machine."""

import json
import os
import signal

import pytest
import torch

from conftest import REPO, launch_cmd, read_jsonl, run, run_env, tiny_overrides, train_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_cmd(overrides, config="configs/smoke.yaml"):
    """`accelerate launch` of the trainer on the one GPU (launch/gpu_1.yaml)."""
    cmd = launch_cmd(1, overrides, config)
    cmd[cmd.index("--config_file") + 1] = str(REPO / "launch" / "gpu_1.yaml")
    return cmd


def test_padding_invariance_on_cuda():
    from distsent.config import ModelConfig
    from distsent.model import build_model

    torch.manual_seed(0)
    model = build_model(100, ModelConfig(embedding_dim=32, hidden_dim=32, num_layers=2)).cuda().eval()
    review = torch.randint(2, 100, (1, 12), device="cuda")
    longer = torch.randint(2, 100, (3, 80), device="cuda")
    batch = torch.zeros(4, 80, dtype=torch.long, device="cuda")
    batch[0, :12], batch[1:] = review, longer
    with torch.no_grad():
        alone = model(review, torch.tensor([12]))
        together = model(batch, torch.tensor([12, 80, 80, 80]))
    assert torch.allclose(alone, together[:1], atol=1e-5)  # cuDNN picks other kernels per shape: not bitwise


def test_fp16_scaler_skips_an_inf_step_counts_it_and_is_checkpointed(synth_imdb, tmp_path, cache_env):
    """A step whose gradients hold an inf is skipped by the scaler (weights unchanged), counted in the logs, and
    the scaler's state (its lowered scale) travels through a checkpoint."""
    from distsent.configfile import load_config
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    args = tiny_overrides(tmp_path / "run", synth_imdb, **{"train.mixed_precision": "fp16", "train.epochs": 1})
    trainer = Trainer(load_config(REPO / "configs" / "smoke.yaml", args), stop=StopFlag([]))
    try:
        poison = {"on": True}
        trainer.raw_model.fc.weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
        before = trainer.raw_model.fc.weight.detach().clone()
        scale = trainer.accelerator.scaler.get_scale()
        from distsent.sampler import epoch_batches

        batch = epoch_batches(trainer.data.train.lengths, 32, 0, 0, 1)[0]
        trainer.train_step(batch)
        assert torch.equal(trainer.raw_model.fc.weight, before), "a step with inf gradients changed the weights"
        assert trainer.accelerator.scaler.get_scale() < scale
        assert trainer.sums.totals()["skipped"] == 1
        poison["on"] = False
        trainer.train_step(batch)
        assert not torch.equal(trainer.raw_model.fc.weight, before)
        trainer.state.step = 2
        trainer.checkpoints.save(2, trainer.identity)
        saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
        assert saved["scaler"]["scale"] == trainer.accelerator.scaler.get_scale()
    finally:
        trainer.close()


def test_bf16_runs_the_recurrent_layer_in_fp32_on_the_gpu(synth_imdb, tmp_path, cache_env):
    """CUDA autocast runs a cuDNN LSTM in fp16 whatever its dtype (the fact precision.py rests on: if a later
    PyTorch gives it bf16, this says so), so under bf16 the model runs its recurrent layer in fp32 and trains."""
    from distsent.config import ModelConfig
    from distsent.model import build_model
    from distsent.precision import CUDA_RNN_AUTOCAST_DTYPE

    bare = torch.nn.LSTM(8, 8, batch_first=True).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert bare(torch.randn(2, 5, 8, device="cuda"))[0].dtype == CUDA_RNN_AUTOCAST_DTYPE
    model = build_model(50, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=2)).cuda()
    model.rnn_fp32 = True  # what build_run_model sets on a GPU under bf16
    seen = {}
    model.rnn[1].register_forward_hook(lambda m, args, out: seen.update(rnn=out[0].dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randint(2, 50, (3, 7), device="cuda"), torch.tensor([7, 5, 2]))
    assert seen == {"rnn": torch.float32}
    run_dir = tmp_path / "bf16"
    proc = run(gpu_cmd(tiny_overrides(run_dir, synth_imdb, **{"train.mixed_precision": "bf16", "train.epochs": 1})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the recurrent layer runs in fp32 (on a GPU, autocast would run it in fp16" in proc.stderr
    assert [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r][0]["test/acc"] > 0.7


@pytest.mark.parametrize("layers", [1, 2])  # 2: dropout between one-direction layers (cuDNN's own would not resume)
def test_signal_then_resume_is_bitwise_exact_on_the_gpu(layers, synth_imdb, tmp_path, cache_env):
    import subprocess

    from test_resume import wait_for_step

    extra = {"train.deterministic": "true", "train.debug_records": "true", "train.epochs": 3, "checkpoint.every": 7,
             "train.mixed_precision": "bf16", "model.num_layers": layers}
    reference = tmp_path / "reference"
    proc = run(gpu_cmd(tiny_overrides(reference, synth_imdb, **extra)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **extra)
    proc = subprocess.Popen(gpu_cmd(args), cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for_step(run_dir, 50, proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    proc = run(gpu_cmd(args))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    digest = [read_jsonl(d / "debug" / "weights-rank0.jsonl")[-1]["sha256"] for d in (run_dir, reference)]
    assert digest[0] == digest[1]
    assert [r["train/loss"] for r in train_rows(run_dir)] == [r["train/loss"] for r in train_rows(reference)]


def test_gpu_checkpoint_and_best_model_load_on_a_cpu(synth_imdb, tmp_path, cache_env):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = run(gpu_cmd(tiny_overrides(run_dir, synth_imdb, **{"train.epochs": 1})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import sys, torch; from distsent import checkpoint as ckpt; from distsent.predict import Predictor\n"
        "from distsent.configfile import load_config; from distsent.model import build_model\n"
        f"p = Predictor.load({str(run_dir / 'best')!r}); print(p.predict(['good0 great', 'bad0 awful']))\n"
        f"last = ckpt.find_latest(__import__('pathlib').Path({str(run_dir / 'checkpoints')!r}))\n"
        "cfg = load_config(last.parent.parent / 'config.yaml')\n"
        "m = build_model(p.tokenizer.get_vocab_size(), cfg.model); ckpt.load_weights(last, m)\n"
        "assert next(m.parameters()).device.type == 'cpu'; print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # a machine without a GPU
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "two processes need two GPUs: NCCL runs one process per GPU, and Accelerate places rank r on cuda:r, so two "
    "ranks on one GPU would need gloo with CUDA tensors and a device placement Accelerate does not offer"))
def test_two_processes_on_two_gpus_agree(synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "ddp"
    cmd = launch_cmd(2, tiny_overrides(run_dir, synth_imdb, **{"train.debug_records": "true", "train.epochs": 1}))
    cmd[cmd.index("--config_file") + 1] = str(REPO / "launch" / "gpu_node.yaml")
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [read_jsonl(run_dir / "debug" / f"weights-rank{r}.jsonl")[-1]["sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]
