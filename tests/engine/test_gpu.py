"""The CUDA paths: bf16 autocast and fp16 with a GradScaler. Skipped cleanly without a GPU (see conftest)."""

import pytest
import torch
from helpers import make_config, run_quietly

from cl_runner.config.schema import DeviceConfig
from cl_runner.engine.runtime import autocast_factory, resolve_device

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_learns_the_default_sequence(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = run_quietly(make_config("device=cuda", f"device.precision={precision}", "strategy=ewc_replay",
                                     small=False), tmp_path)
    assert result["precision"] == precision and result["device"].startswith("cuda")
    assert min(t["just_trained"] for t in result["per_task"]) >= 0.8
    assert result["average_forgetting"] < 0.5


def test_auto_device_picks_cuda_with_bf16_or_fp16():
    device, precision = resolve_device(DeviceConfig())
    assert device.type == "cuda"
    assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    with autocast_factory(device, precision)():
        x = torch.ones(4, 4, device=device)
        assert (x @ x).dtype in (torch.bfloat16, torch.float16)


def test_batches_reach_the_gpu_through_pinned_memory_unchanged():
    from cl_runner.models.lm import collate

    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 0},
                {"input_ids": [8, 9], "labels": [-100, 9], "task_id": 1}]
    on_gpu, on_cpu = collate(examples, pad_id=0, device="cuda"), collate(examples, pad_id=0, device="cpu")
    torch.cuda.synchronize()
    for key, value in on_cpu.items():
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_nccl_bf16_run_on_every_visible_gpu_matches_one_process(tmp_path, kind):
    """torchrun on all visible GPUs (NCCL, bf16; FSDP gathers in bf16 and reduces in fp32) against one process:
    the same matrix. bf16 rounding differs with the split, so learning is compared, not bits."""
    import json
    import subprocess
    import sys

    gpus = torch.cuda.device_count()
    common = ["device=cuda", "device.precision=bf16", "train.epochs=6", "checkpoint.enabled=false",
              "train.keep_best=false"]
    single = run_quietly(make_config(*common, small=False), tmp_path / "one")
    extra = ["distributed.param_dtype=bfloat16", "distributed.reduce_dtype=float32"] if kind == "fsdp" else []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    done = subprocess.run([*torchrun, "-m", "cl_runner", f"distributed={kind}", *common, *extra,
                           f"hydra.run.dir={tmp_path / 'n'}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    multi = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert multi["distributed"] == {"kind": kind, "world_size": gpus} and multi["device"].startswith("cuda")
    assert abs(multi["average_accuracy"] - single["average_accuracy"]) <= 0.1
