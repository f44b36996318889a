"""Device and precision resolution without a GPU: torch.cuda's answers are faked."""

from __future__ import annotations

import pytest
import torch

from lmtk import device as devices
from lmtk.config import compose
from lmtk.errors import UserError
from lmtk.train.pretrain import check_parallel


@pytest.fixture(autouse=True)
def keep_tf32_flags():
    """resolve() turns TF32 on for CUDA: give the process its flags back."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def fake_gpu(monkeypatch, bf16: bool, name: str = "Tesla T4"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)


@pytest.mark.parametrize("strategy,dtype", [("ddp", torch.float16), ("fsdp", torch.float32)])
def test_auto_precision_without_bf16_is_one_every_strategy_accepts(monkeypatch, strategy, dtype):
    fake_gpu(monkeypatch, bf16=False)
    dev, got = devices.resolve("auto", "auto", strategy)
    assert dev.type == "cuda" and got == dtype
    # and the multi-process checks accept it (fp16 under fsdp is refused)
    cfg = compose("default", ["launcher.nproc=2", f"launcher.strategy={strategy}", "train.batch_size=16"])
    check_parallel(cfg, 2, got)


def test_fsdp_refuses_explicit_fp16():
    cfg = compose("default", ["launcher.nproc=2", "launcher.strategy=fsdp", "train.batch_size=16"])
    with pytest.raises(UserError, match="fp16"):
        check_parallel(cfg, 2, torch.float16)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_auto_precision_with_bf16_is_bf16(monkeypatch, strategy):
    fake_gpu(monkeypatch, bf16=True)
    assert devices.resolve("auto", "auto", strategy)[1] == torch.bfloat16


def test_auto_precision_on_cpu_is_fp32_and_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto", "auto", "fsdp") == (torch.device("cpu"), torch.float32)
    assert devices.resolve("cpu", "bf16")[1] == torch.bfloat16
    fake_gpu(monkeypatch, bf16=False)
    assert devices.resolve("cuda", "fp16", "fsdp")[1] == torch.float16  # explicit: check_parallel refuses it later


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A100-SXM4-40GB", 312),
                                       ("NVIDIA A10", 125), ("NVIDIA L40S", 362), ("Tesla T4", 65),
                                       ("Some Future GPU", None)])
def test_peak_tflops_from_the_gpu_name_table(monkeypatch, name, peak):
    fake_gpu(monkeypatch, bf16=True, name=name)
    assert devices.peak_tflops(torch.device("cuda", 0)) == peak
    assert devices.peak_tflops(torch.device("cuda", 0), 123.0) == 123.0  # train.peak_tflops wins
    assert devices.peak_tflops(torch.device("cpu")) is None


def test_train_peak_tflops_reaches_the_mfu(monkeypatch, lmtk_env):
    """On CPU there is no table entry: train.peak_tflops alone gives the summary an MFU."""
    import helpers

    seen = []
    real = devices.peak_tflops
    monkeypatch.setattr("lmtk.train.loop.peak_tflops", lambda dev, configured=None: seen.append(configured) or real(dev, configured))
    helpers.train(*helpers.TINY, "budget.steps=2", "device=cpu", "train.peak_tflops=0.5", "run.name=p", "val.at_start=false")
    assert seen == [0.5]
    s = helpers.info(lmtk_env.runs / "p")["summary"]
    assert s["mfu"] > 0
