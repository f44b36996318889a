"""lmtk distill (issue 13): weight transfer, the stages' losses, the fused KD loss, the teacher
left alone, resume mid-stage, data parallelism, and a distilled student beating the same
student from scratch on real text."""

from __future__ import annotations

import hashlib
import json
import shutil

import helpers
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lmtk.distill.kd import kd_reference, linear_kd
from lmtk.distill.stages import DistillObjective, parse_stages, stage_at
from lmtk.distill.transfer import qkv_problem, resolve_init, transfer
from lmtk.errors import UserError
from lmtk.models import LanguageModel, ModelConfig
from lmtk.models.mixers import MIXERS, mixer_config

V = 53
DCFG = OmegaConf.create({"alpha": 0.5, "temperature": 1.0, "kl": "forward"})
OCFG = OmegaConf.create({"fused_head": True, "head_chunk": 16})


def lm(mixer="attention", layers=None, seed=0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, positions="rope", norm="rmsnorm",
               mlp="swiglu", bias=False, max_seq_len=64)
    cfg.update(kw)
    return LanguageModel(ModelConfig(mixer=mixer_config(mixer if isinstance(mixer, dict) else {"name": mixer}), layers=layers, **cfg))


def attention_shaped(name: str, teacher: LanguageModel, **knobs) -> dict:
    mixer = mixer_config({"name": name, **knobs})
    return mixer_config({**mixer, **MIXERS[name].attention_knobs(teacher.cfg, mixer)})


def ids(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- the model's per-layer inputs and outputs -----------------------------------------------------

@pytest.mark.parametrize("mixer,layers", [("attention", None), ("gla", "RA")])
def test_trace_and_align_reproduce_the_forward(mixer, layers):
    m = lm(mixer, layers).eval()
    x = ids()
    trace = []
    with torch.no_grad():
        h = m.hidden(x, trace=trace)
        assert torch.equal(h, m.hidden(x))
        blocks = m.align("block", {i: t["block_in"] for i, t in enumerate(trace)})
        mixers = m.align("mixer", {i: t["mixer_in"] for i, t in enumerate(trace)})
    assert len(trace) == 2 and torch.equal(trace[1]["block_in"], trace[0]["block_out"])
    for i, t in enumerate(trace):
        assert torch.allclose(blocks[i], t["block_out"], atol=1e-6)
        assert torch.allclose(mixers[i], t["mixer_out"], atol=1e-6)
    assert torch.allclose(m.final_norm(trace[-1]["block_out"]), h, atol=1e-6)


# --- weight transfer -------------------------------------------------------------------------------

def test_copy_transfers_everything_but_the_new_mixers():
    teacher = lm(seed=1)
    student, fresh = lm("gla", "RA", seed=2), lm("gla", "RA", seed=2)
    rec = transfer(student, teacher, "copy")
    t, s, f = dict(teacher.named_parameters()), dict(student.named_parameters()), dict(fresh.named_parameters())
    assert rec["kept"] == [1] and rec["qkv"] == []
    for name, p in s.items():
        if name.startswith("blocks.0.mixer."):  # the recurrent layer's mixer: its own init, untouched
            assert torch.equal(p, f[name]) and name not in rec["copied"], name
        else:  # embeddings, norms, MLPs and the kept attention layer: the teacher's, exactly
            assert torch.equal(p, t[name]) and name in rec["copied"], name
    scratch = lm("gla", "RA", seed=2)
    assert transfer(scratch, teacher, "scratch")["copied"] == []
    assert all(torch.equal(p, f[n]) for n, p in scratch.named_parameters())


@pytest.mark.parametrize("name", ["linear", "retnet", "gla", "hgrn2", "metala", "gdn", "mamba2"])
def test_qkv_copy_puts_attention_into_the_matching_projections(name):
    """q, k, v, o of a grouped-query teacher (4 heads, 2 key/value heads) land in the slots the
    mixer declares, key/value heads repeated for the query heads they serve; the short conv in
    front starts as the identity."""
    teacher = lm(seed=1)
    student = lm(attention_shaped(name, teacher, **({"feature_map": "hedgehog"} if name == "linear" else {})), seed=2)
    assert qkv_problem(student, teacher) is None
    rec = transfer(student, teacher, "qkv_copy")
    assert rec["qkv"] == [0, 1]
    H, Hkv, Dh = 4, 2, 8
    for i in range(2):
        att, mixer = teacher.blocks[i].mixer, student.blocks[i].mixer
        W = att.qkv.weight.detach()
        want = {"q": W[:H * Dh], "k": W[H * Dh:(H + Hkv) * Dh], "v": W[(H + Hkv) * Dh:]}
        for role, slot in mixer.attention_slots().items():
            if role == "o":
                assert torch.equal(slot.linear.weight, att.out.weight)
                continue
            got = slot.linear.weight[slot.offset:slot.offset + slot.heads * slot.head_dim].detach()
            w = want[role].unflatten(0, (-1, Dh))
            expect = w.repeat_interleave(slot.heads // w.shape[0], dim=0).flatten(0, 1)
            assert torch.equal(got, expect), (name, role)
        if mixer.conv is not None:
            taps = mixer.conv.weight.detach()
            assert torch.equal(taps[:, 0, -1], torch.ones(taps.shape[0])) and not taps[:, 0, :-1].any()


def test_qkv_copy_says_why_it_cannot_run():
    teacher = lm(seed=1)
    with pytest.raises(UserError, match=r"gla q is 4 heads x 4, .*distill.shape=attention: model.mixer.n_heads=null "
                                        r"model.mixer.expand_k=1.0 model.mixer.expand_v=1.0"):
        resolve_init("qkv_copy", lm("gla"), teacher)
    init, note = resolve_init("auto", lm("gla"), teacher)
    assert init == "copy" and "chose copy" in note
    with pytest.raises(UserError, match="mlstm has no projections attention's q, k, v could go into"):
        resolve_init("qkv_copy", lm("mlstm"), teacher)
    with pytest.raises(UserError, match="teacher layer 0 is gla, not softmax attention"):
        resolve_init("qkv_copy", lm("gdn"), lm("gla"))
    assert resolve_init("auto", lm(attention_shaped("gla", teacher)), teacher) == ("qkv_copy", None)


# --- the stages' losses ----------------------------------------------------------------------------

def test_stage_losses_are_zero_when_the_student_is_its_teacher():
    teacher = lm(seed=1).eval()
    student = lm(seed=2)
    transfer(student, teacher, "copy")  # attention copied whole
    x = ids()
    for stage in ("mixer", "hidden", "kd"):
        cfg = OmegaConf.create({**DCFG, "alpha": 0.0})
        obj = DistillObjective(teacher, [(stage, 1.0)], [0, 1], cfg, OCFG)
        loss, metrics = obj.loss(student, x, None, 0.5)
        assert metrics["phase"] == stage and abs(loss.item()) < 1e-5, (stage, loss.item())


def test_alignment_stages_train_only_the_aligned_layers():
    teacher = lm(seed=1).eval()
    student = lm("gla", "RA", seed=2)
    transfer(student, teacher, "copy")
    for stage, prefix in (("mixer", "blocks.0.mixer."), ("hidden", "blocks.0.")):
        student.zero_grad(set_to_none=True)
        obj = DistillObjective(teacher, [(stage, 1.0)], [0], DCFG, OCFG)
        loss, metrics = obj.loss(student, ids(), None, 0.0)
        loss.backward()
        got = {n for n, p in student.named_parameters() if p.grad is not None}
        assert got and all(n.startswith(prefix) for n in got), (stage, got)
        assert set(metrics) == {"phase", "align/0"} and loss.item() > 0
    assert not any(p.grad is not None for p in teacher.parameters())


def test_kd_fused_equals_the_plain_reference_and_is_per_token():
    torch.manual_seed(0)
    N, d = 37, 8
    for kl in ("forward", "reverse"):
        for alpha, T in ((0.5, 1.0), (0.0, 2.0), (1.0, 1.0), (0.3, 3.0)):
            h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
            W = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
            b = torch.randn(V, dtype=torch.float64, requires_grad=True)
            teacher_logits = torch.randn(N, V, dtype=torch.float64) * 2
            y = torch.randint(0, V, (N,))
            loss, ce, div = linear_kd(h, W, b, y, lambda s, e: teacher_logits[s:e], alpha, T, kl, chunk=10)
            loss.backward()
            fused = [p.grad.clone() for p in (h, W, b)]
            for p in (h, W, b):
                p.grad = None
            ref, ref_ce, ref_kl = kd_reference(h @ W.t() + b, teacher_logits, y, alpha, T, kl)
            ref.backward()
            assert abs(loss.item() - ref.item()) < 1e-5 and abs(ce.item() - ref_ce.item()) < 1e-5 and abs(div.item() - ref_kl.item()) < 1e-5
            for a, p in zip(fused, (h, W, b)):
                assert torch.allclose(a, p.grad, atol=1e-7), (kl, alpha, T)
    # the reference's KL is the mean over tokens of each token's KL (not a sum, not over vocabulary entries)
    z, t = torch.randn(5, V), torch.randn(5, V)
    per_token = F.kl_div(F.log_softmax(z, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kd_reference(z, t, torch.zeros(5, dtype=torch.long), 0.0, 1.0, "forward")[2], per_token.mean())
    assert torch.allclose(kd_reference(z, t, torch.zeros(5, dtype=torch.long), 0.0, 1.0, "forward")[0], per_token.mean())


def test_the_teacher_gets_no_gradient_and_stays_bit_identical():
    teacher = lm(seed=1).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = lm("gla", seed=2)
    transfer(student, teacher, "copy")
    obj = DistillObjective(teacher, parse_stages(["mixer:0.3", "hidden:0.3", "kd:0.4"]), [0, 1], DCFG, OCFG)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        loss, _ = obj.loss(student, ids(seed=step), None, step / 6)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_stages_run_under_bf16_autocast():
    """The loop runs objectives under autocast: the teacher's logits are made inside the fused loss
    (autocast off there) from bf16 hidden states, so they are cast to the head's dtype first."""
    teacher = lm(seed=1).eval().requires_grad_(False)
    student = lm("gla", seed=2)
    transfer(student, teacher, "copy")
    for stage in ("mixer", "hidden", "kd"):
        obj = DistillObjective(teacher, [(stage, 1.0)], [0, 1], DCFG, OCFG)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = obj.loss(student, ids(), None, 0.5)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())


def test_stage_specs():
    assert parse_stages(["mixer:0.03", "hidden:0.05", "kd:0.92"]) == [("mixer", 0.03), ("hidden", 0.05), ("kd", 0.92)]
    st = parse_stages(["mixer:0.25", "kd:0.75"])
    assert stage_at(st, 0.0) == ("mixer", 0.0) and stage_at(st, 0.5) == ("kd", 1 / 3) and stage_at(st, 1.0)[0] == "kd"
    for bad, needle in ((["mixer:0.5", "kd:0.6"], "sum to 1.1, not 1"), (["mixr:0.5", "kd:0.5"], "unknown stage 'mixr'"),
                        (["kd"], "needs a positive budget fraction"), ([], "distill.stages is empty")):
        with pytest.raises(UserError, match=needle):
            parse_stages(bad)


# --- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shared_cache):
    """A small attention GPT trained on the embedded corpus (the teacher every command test reads)."""
    runs = tmp_path_factory.mktemp("distill-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTK_RUNS", str(runs))
        mp.setenv("LMTK_CACHE", str(shared_cache))
        helpers.train(*helpers.QUALITY, "budget.steps=150", "run.name=teacher")
    helpers.reset_console()
    return runs / "teacher"


def distill(*args):
    return helpers.ok("distill", *args)


def _digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_distilled_gla_beats_the_same_student_from_scratch(teacher_run, lmtk_env):
    """A tiny teacher -> GLA student on real text: after the same steps, the distilled student's
    val loss is below the same student's from scratch; the run reads like any other run."""
    before = _digest(teacher_run)
    common = [f"teacher={teacher_run}", "budget.hours=null", "budget.steps=60", "logger.every=10", "train.lr=3e-3",
              "train.batch_size=16", "train.micro_batch_size=16"]
    distill(*common, "run.name=kd")
    distill(*common, "distill.init=scratch", "run.name=scratch")
    kd, scratch = lmtk_env.runs / "kd", lmtk_env.runs / "scratch"
    a, b = helpers.info(kd), helpers.info(scratch)
    assert a["kind"] == "distill" and a["parents"]["teacher"] == str(teacher_run)
    assert a["summary"]["val/loss"] < b["summary"]["val/loss"] - 0.1, (a["summary"]["val/loss"], b["summary"]["val/loss"])
    assert a["summary"]["init"] == "copy" and b["summary"]["init"] == "scratch"  # auto: gla's default widths are not attention's
    rows = helpers.metrics(kd)
    assert rows[0]["step"] == 0 and "teacher/loss" in rows[0]
    phases = [m["phase"] for m in rows if "phase" in m]
    assert phases[0] == "kd" and {"kd/kl", "kd/ce"} <= set(next(m for m in rows if "kd/kl" in m))
    assert 0 < a["summary"]["gap_recovered"] and a["summary"]["teacher/loss"] == rows[0]["teacher/loss"]
    meta = json.loads((kd / "checkpoints/final/meta.json").read_text())
    assert meta["distill"]["teacher_fingerprint"] and meta["objective"]["name"] == "clm"
    assert meta["model"]["mixer"]["name"] == "gla" and meta["model"]["d_model"] == 64  # the teacher's width
    assert _digest(teacher_run) == before  # the teacher's run is untouched
    res = helpers.cli("generate", str(kd), "-p", "def ", "-n", "5", "--temperature", "0")
    assert res.exit_code == 0 and res.output.startswith("def ")
    # a student is a run like any other: a base to fine-tune, a teacher of its own (its gla layers copied whole)
    ft = helpers.cli("finetune", f"base={kd}", "budget.epochs=null", "budget.steps=2", "val.tokens=1024", "run.name=ft")
    assert ft.exit_code == 0, ft.output[-2000:]
    distill(f"teacher={kd}", "budget.hours=null", "budget.steps=2", "distill.stages=[kd:1.0]", "val.tokens=1024", "run.name=kd2")
    assert json.loads((lmtk_env.runs / "kd2/checkpoints/final/meta.json").read_text())["distill"]["kept"] == [0, 1]


def test_the_teachers_data_with_the_commands_data_overrides_on_top(teacher_run, lmtk_env):
    from omegaconf import OmegaConf

    distill(f"teacher={teacher_run}", "data.seq_len=32", "budget.hours=null", "budget.steps=2", "val.tokens=1024", "run.name=d")
    got = OmegaConf.load(lmtk_env.runs / "d/config.yaml").data
    teacher = OmegaConf.load(teacher_run / "config.yaml").data
    assert got.seq_len == 32 and teacher.seq_len == 64
    assert got.max_chars == teacher.max_chars == 500000 and got.source == teacher.source
    assert helpers.info(lmtk_env.runs / "d")["summary"]["tokens"] == 2 * 8 * 32


def test_resume_mid_stage_equals_uninterrupted(teacher_run, lmtk_env):
    """LoRA on the student: the alignment stages train its fresh mixers, kd the adapters. A crash in
    the hidden stage resumes there and ends with the same weights and per-step losses."""
    common = [f"teacher={teacher_run}", "budget.hours=null", "budget.steps=12", "logger.every=1", "checkpoint.every=2",
              "checkpoint.keep=10", "distill.stages=[mixer:0.25,hidden:0.25,kd:0.5]", "peft=lora", "val.tokens=2048"]
    distill(*common, "run.name=A")
    a, c = lmtk_env.runs / "A", lmtk_env.runs / "C"
    shutil.copytree(a, c)
    ck = c / "checkpoints"
    shutil.rmtree(ck / "final")
    for d in ck.iterdir():
        if int(d.name[5:]) > 4:
            shutil.rmtree(d)
    (c / "metrics.jsonl").write_text("".join(line + "\n" for line in (a / "metrics.jsonl").read_text().splitlines()
                                             if json.loads(line)["step"] <= 5))
    info = helpers.info(c)
    info["status"] = "running"
    (c / "run.json").write_text(json.dumps(info))
    distill(*common, "run.name=C", "resume=auto")
    wa, wc = load_file(str(a / "checkpoints/final/model.safetensors")), load_file(str(c / "checkpoints/final/model.safetensors"))
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
    la = [(m["step"], m["loss"], m["phase"]) for m in helpers.metrics(a) if "loss" in m]
    lc = [(m["step"], m["loss"], m["phase"]) for m in helpers.metrics(c) if "loss" in m]
    assert la == lc and [p for _, _, p in la] == ["mixer"] * 3 + ["hidden"] * 3 + ["kd"] * 6
    assert helpers.info(c)["history"][0]["step"] == 4
    # LoRA: the teacher's copies (embeddings, norms, MLPs) never moved; the fresh mixers and adapters did
    t = load_file(str(teacher_run / "checkpoints/final/model.safetensors"))
    assert torch.equal(wa["embed.weight"], t["embed.weight"]) and torch.equal(wa["blocks.0.mlp.up.weight"], t["blocks.0.mlp.up.weight"])
    assert any(k.endswith("lora_b") and wa[k].abs().sum() > 0 for k in wa)


def test_stages_under_two_ranks_ddp_and_fsdp_equal_one_process(teacher_run, lmtk_env):
    """launcher.nproc=2 on gloo, DDP and FSDP: the mixer stage leaves most parameters without
    gradients (DDP is told to expect it), kd trains them all; losses and weights equal one process."""
    common = [f"teacher={teacher_run}", "budget.hours=null", "budget.steps=4", "logger.every=1", "train.batch_size=16",
              "train.micro_batch_size=4", "distill.stages=[mixer:0.5,kd:0.5]", "val.tokens=2048"]
    one = helpers.lmtk("distill", *common, "run.name=one", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    la = [(m["phase"], m["loss"]) for m in helpers.metrics(lmtk_env.runs / "one") if "loss" in m]
    wa = load_file(str(lmtk_env.runs / "one/checkpoints/final/model.safetensors"))
    for strategy in ("ddp", "fsdp"):  # fsdp: the student sharded, every rank holding the teacher
        two = helpers.lmtk("distill", *common, f"run.name={strategy}", "launcher.nproc=2", f"launcher.strategy={strategy}",
                           env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert two.returncode == 0, two.stderr[-3000:]
        lb = [(m["phase"], m["loss"]) for m in helpers.metrics(lmtk_env.runs / strategy) if "loss" in m]
        assert [p for p, _ in la] == ["mixer", "mixer", "kd", "kd"] == [p for p, _ in lb]
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(la, lb)), (strategy, la, lb)
        wb = load_file(str(lmtk_env.runs / strategy / "checkpoints/final/model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa), strategy


def test_a_hugging_face_llama_teacher_into_an_attention_shaped_mamba2(lmtk_env, tmp_path):
    """teacher= a Hugging Face decoder directory (grouped-query Llama, untied head, its own
    SentencePiece-style tokenizer): data= from the command, the teacher's tokenizer, qkv_copy into
    Mamba-2's C, B, x rows (distill.shape=attention: a B / C group per head)."""
    from test_hf_import import LLAMA_CFG, TEXT, llama_weights, write_hf

    hf = write_hf(tmp_path / "llama", LLAMA_CFG, llama_weights(LLAMA_CFG, torch.Generator().manual_seed(0)), "metaspace")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(TEXT[i:i + 4]) for i in range(0, len(TEXT), 4)) * 20)
    distill(f"teacher={hf}", "model/mixer=mamba2", "distill.shape=attention", "distill.init=qkv_copy", "data=text",
            f"data.train={text}", "data.seq_len=32", "budget.hours=null", "budget.steps=6", "val.tokens=512",
            "distill.stages=[mixer:0.5,kd:0.5]", "run.name=hf")
    meta = json.loads((lmtk_env.runs / "hf/checkpoints/final/meta.json").read_text())
    assert meta["distill"]["init"] == "qkv_copy" and meta["distill"]["qkv"] == list(range(LLAMA_CFG["num_hidden_layers"]))
    mixer = meta["model"]["mixer"]
    H = LLAMA_CFG["num_attention_heads"]
    assert (mixer["expand"], mixer["groups"], mixer["d_state"]) == (1, H, LLAMA_CFG["hidden_size"] // H)
    assert meta["model"]["tie_embeddings"] is False and helpers.info(lmtk_env.runs / "hf")["parents"]["teacher"] == str(hf)
