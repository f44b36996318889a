"""The optional fla (CUDA) fast path, lmtk/models/mixers/kernels.py. On the CPU: kernel=auto never
imports fla, kernel=fla is a one-line error. Where CUDA and fla exist: fla's chunk kernels equal
the PyTorch ops (outputs, final states, gradients) for every decay shape, the delta rule and
whole mixers. (No GPU session has run the latter yet.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import helpers
from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.mixers import delta, kernels, recurrence

GPU = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None and kernels._fla_ops() is not None
needs_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA and fla's kernels (pip install 'lmtk[fla]')")
RECURRENT = ["linear", "retnet", "gla", "hgrn2", "metala", "mamba2", "mlstm", "gdn"]


def tiny(name: str, device: str = "cpu", **knobs) -> LanguageModel:
    torch.manual_seed(0)
    small = {"hgrn2": {"expand_ratio": 8}, "mamba2": {"d_state": 8}}.get(name, {})
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, positions="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False, mixer={"name": name, **small, **knobs})
    return LanguageModel(cfg).to(device)


def test_auto_on_the_cpu_never_imports_fla():
    """In a fresh interpreter: every recurrent mixer's forward, backward and decoding on the CPU with
    kernel=auto (the default) leaves fla out of sys.modules."""
    code = f"""
import sys, torch
from lmtk.models import LanguageModel, ModelConfig
for name in {RECURRENT!r}:
    m = LanguageModel(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=2, mixer={{"name": name, "kernel": "auto"}}))
    x = torch.randint(0, 61, (1, 70))
    m(x).sum().backward()
    with torch.no_grad():
        cache = m.new_cache(); m(x[:, :5], cache=cache); m(x[:, 5:6], cache=cache)
print(sorted(n for n in sys.modules if n == "fla" or n.startswith("fla.")))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=helpers.REPO,
                       env={**__import__("os").environ, "PYTHONPATH": str(helpers.REPO)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["gla", "gdn"])
def test_fla_without_cuda_is_a_one_line_error(name):
    with pytest.raises(UserError, match=f"model.mixer.kernel=fla for mixer {name} needs a CUDA GPU") as err:
        tiny(name, kernel="fla")
    assert "\n" not in str(err.value)


def test_fla_without_the_package_is_a_one_line_error(monkeypatch):
    """On a CUDA machine (simulated) without fla installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_fla_installed", lambda: False)
    with pytest.raises(UserError, match=r"kernel=fla for mixer gla: fla's kernels do not import; install them with "
                                        r"pip install 'lmtk\[fla\]'") as err:
        kernels.check("fla", "gla")
    assert "\n" not in str(err.value)
    kernels.check("auto", "gla")  # auto falls back to the PyTorch op: no error


def test_fla_on_a_cpu_tensor_is_a_one_line_error():
    """kernel=fla checked at build time (above) and again where the op runs on a CPU tensor (a model
    built on a GPU machine, then run on the CPU)."""
    with pytest.raises(UserError, match="kernel=fla but the mixer runs on cpu") as err:
        kernels.use_fla("fla", torch.zeros(1))
    assert "\n" not in str(err.value)
    assert not kernels.use_fla("torch", torch.zeros(1)) and not kernels.use_fla("auto", torch.zeros(1))


# --- where a GPU and fla exist ------------------------------------------------------------------

B, H, T, DK, DV = 2, 4, 200, 32, 48  # T not a multiple of fla's chunk (64)


def _inputs(kind: str, shared: bool = False, gen_seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    hq = 1 if shared else H
    x = dict(q=r(B, hq, T, DK), k=r(B, hq, T, DK) * 0.3, v=r(B, H, T, DV), state=r(B, H, DK, DV))
    x["g"] = {"none": None, "head": -torch.rand(H, generator=g, device="cuda") * 0.2,
              "scalar": F.logsigmoid(r(B, H, T)) * 0.5, "channel": F.logsigmoid(r(B, H, T, DK)) * 0.5}[kind]
    return x


def _run(fn, x, **kw):
    leaves = {n: t.clone().requires_grad_(n != "g" or t.dim() > 1) for n, t in x.items() if t is not None}
    o, S = fn(**{**x, **leaves}, **kw)
    w = torch.Generator(device="cuda").manual_seed(1)
    ((o * torch.randn(o.shape, generator=w, device="cuda")).sum()
     + (S * torch.randn(S.shape, generator=w, device="cuda")).sum()).backward()
    return o.detach(), S.detach(), {n: t.grad for n, t in leaves.items() if t.grad is not None}


def _close(a, b, tol=2e-3):
    (oa, sa, ga), (ob, sb, gb) = a, b
    scale = lambda t: t.abs().max().clamp(min=1.0)
    assert ((oa - ob).abs().max() / scale(ob)) < tol
    assert ((sa - sb).abs().max() / scale(sb)) < tol
    assert ga.keys() == gb.keys()
    for n in ga:
        assert ((ga[n] - gb[n]).abs().max() / scale(gb[n])) < tol, n


@needs_gpu
@pytest.mark.parametrize("kind", ["none", "head", "scalar", "channel"])
@pytest.mark.parametrize("shared", [False, True])
def test_fla_recurrence_equals_the_torch_op(kind, shared):
    x = _inputs(kind, shared)
    _close(_run(kernels.fla_recurrence, x, scale=DK ** -0.5), _run(recurrence.chunked, x, chunk=32, scale=DK ** -0.5))


@needs_gpu
@pytest.mark.parametrize("kind", ["none", "scalar"])
def test_fla_delta_rule_equals_the_torch_op(kind):
    x = _inputs(kind)
    x["k"] = F.normalize(x["k"], dim=-1)
    x["beta"] = torch.rand(B, H, T, device="cuda")
    _close(_run(kernels.fla_delta, x, scale=DK ** -0.5), _run(delta.chunked, x, chunk=32, scale=DK ** -0.5))


@needs_gpu
@pytest.mark.parametrize("name", RECURRENT)
def test_mixers_agree_on_both_kernels(name):
    """The same weights with kernel=fla and kernel=torch on CUDA: logits and gradients agree."""
    x = torch.randint(0, 61, (2, 150), device="cuda")
    grads = []
    for kernel in ("fla", "torch"):
        m = tiny(name, "cuda", kernel=kernel)
        out = m(x)
        out.float().pow(2).mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (oa, ga), (ob, gb) = grads
    assert (oa - ob).abs().max() < 2e-3 * ob.abs().max().clamp(min=1)
    for n in gb:
        assert (ga[n] - gb[n]).abs().max() <= 2e-3 * gb[n].abs().max().clamp(min=1e-3), n
