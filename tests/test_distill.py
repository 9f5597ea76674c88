"""Distillation: the losses against values computed by hand, and `lmforge distill` end to end on tiny models.

Losses (lmforge.train.distill): forward KL, reverse KL and the generalized JSD of GKD on small distributions
whose divergences are worked out here with plain `math` (not with the code under test); zero when the student
is the teacher; the gradient pulls the student towards the teacher; β = 0 / 1 are the two KLs and JSD(β) / β
tends to the forward KL as β → 0 (so β weights the teacher's side, as in TRL); τ² scaling; the mask.
Stage (lmforge.stages.distill): a few steps of `lmforge distill` give a checkpoint `lmforge.load` reads, holding
only the student; the teacher gets no gradient and does not change; a student of another vocabulary, or shards
of another tokenizer, is a one-line error with nothing written.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import lmforge
from lmforge import checkpoint
from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.distill import distill_loss, token_divergence

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_native_build(monkeypatch):
    """Generation here runs on the PyTorch decode step (the same logits): a test should not wait for the native
    step to be compiled (after its source changes, or while another process holds the build lock)."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")

# two distributions over 3 tokens, given as log-probabilities (softmax of a log-probability vector is itself)
P_T = [0.7, 0.2, 0.1]
P_S = [0.2, 0.5, 0.3]


def logits(p):
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd(p_t, p_s, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def softmax(xs, tau=1.0):
    e = [math.exp(x / tau) for x in xs]
    return [x / sum(e) for x in e]


# ---- golden values -------------------------------------------------------------------------------------------
def test_hand_computed_values():
    s, t = logits(P_S), logits(P_T)
    # KL(T||S) = .7 ln(.7/.2) + .2 ln(.2/.5) + .1 ln(.1/.3)
    fkl = 0.7 * math.log(3.5) + 0.2 * math.log(0.4) + 0.1 * math.log(1 / 3)
    rkl = 0.2 * math.log(0.2 / 0.7) + 0.5 * math.log(2.5) + 0.3 * math.log(3.0)
    assert fkl == pytest.approx(0.5838, abs=1e-4) and rkl == pytest.approx(0.5372, abs=1e-4)   # asymmetric
    assert distill_loss(s, t, kind="fkl").item() == pytest.approx(fkl, rel=1e-6)
    assert distill_loss(s, t, kind="rkl").item() == pytest.approx(rkl, rel=1e-6)
    # β = 0.5: M = (.45, .35, .2)
    m = [0.45, 0.35, 0.2]
    j = 0.5 * (0.7 * math.log(0.7 / 0.45) + 0.2 * math.log(0.2 / 0.35) + 0.1 * math.log(0.1 / 0.2)) \
        + 0.5 * (0.2 * math.log(0.2 / 0.45) + 0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.2))
    assert distill_loss(s, t, kind="jsd", beta=0.5).item() == pytest.approx(j, rel=1e-6)
    # β = 0.9: M = .9 T + .1 S weights the teacher's side
    assert distill_loss(s, t, kind="jsd", beta=0.9).item() == pytest.approx(jsd(P_T, P_S, 0.9), rel=1e-6)
    assert distill_loss(s, t, kind="jsd", beta=0.9).item() != pytest.approx(jsd(P_T, P_S, 0.1), rel=1e-3)


def test_temperature_softens_both_and_scales_by_tau_squared():
    s, t = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([0.0, 1.5, -2.0, 3.0])
    for tau in (1.0, 2.0, 4.0):
        ps, pt = softmax(s.tolist(), tau), softmax(t.tolist(), tau)
        assert distill_loss(s, t, kind="fkl", temperature=tau).item() == pytest.approx(tau ** 2 * kl(pt, ps), rel=1e-5)
        assert distill_loss(s, t, kind="rkl", temperature=tau).item() == pytest.approx(tau ** 2 * kl(ps, pt), rel=1e-5)
        assert distill_loss(s, t, kind="jsd", beta=0.3, temperature=tau).item() == \
            pytest.approx(tau ** 2 * jsd(pt, ps, 0.3), rel=1e-5)


def test_gradient_is_tau_times_student_minus_teacher():
    """d/dz_S of τ² KL(p_T || p_S) = τ (p_S − p_T), averaged over the positions: the step lowers every logit
    where the student has too much mass and raises it where it has too little."""
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    for tau in (1.0, 3.0):
        s.grad = None
        distill_loss(s, t, kind="fkl", temperature=tau).backward()
        expected = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1)) / 3
        torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
def test_a_gradient_step_moves_the_student_towards_the_teacher(kind, beta):
    s, t = logits(P_S).clone().requires_grad_(True), logits(P_T)
    before = distill_loss(s, t, kind=kind, beta=beta)
    before.backward()
    # the student's most overweighted token (1: .5 vs .2) is pushed down, the most underweighted (0) up
    assert s.grad[1] > 0 and s.grad[0] < 0
    with torch.no_grad():
        after = distill_loss(s - 0.1 * s.grad, t, kind=kind, beta=beta)
    assert after < before
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_zero_when_the_student_is_the_teacher(kind):
    torch.manual_seed(1)
    t = torch.randn(2, 7, 11) * 3
    s = (t + 5.0).requires_grad_(True)         # a constant shift is the same distribution
    loss = distill_loss(s, t, kind=kind, temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert s.grad.abs().max() < 1e-6


def test_beta_edges_are_the_two_kls_and_jsd_tends_to_them():
    s, t = logits(P_S), logits(P_T)
    fkl, rkl = kl(P_T, P_S), kl(P_S, P_T)
    assert distill_loss(s, t, kind="jsd", beta=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert distill_loss(s, t, kind="jsd", beta=1.0).item() == pytest.approx(rkl, rel=1e-6)
    # JSD(β) ≈ β KL(T||S) near 0 and (1-β) KL(S||T) near 1: β weights the teacher's side
    for b in (1e-3, 1e-4):
        assert distill_loss(s, t, kind="jsd", beta=b).item() / b == pytest.approx(fkl, rel=20 * b)
        assert distill_loss(s, t, kind="jsd", beta=1 - b).item() / b == pytest.approx(rkl, rel=20 * b)
    with pytest.raises(ValueError):
        distill_loss(s, t, kind="jsd", beta=1.5)
    with pytest.raises(ValueError):
        distill_loss(s, t, kind="nope")


def test_mean_over_the_masked_positions_only():
    s = torch.stack([logits(P_S), logits(P_T), logits(P_T)])[None]     # (1, 3, 3): positions 1, 2 agree
    t = torch.stack([logits(P_T), logits(P_T), logits(P_S)])[None]
    mask = torch.tensor([[True, True, False]])
    assert distill_loss(s, t, mask, kind="fkl").item() == pytest.approx(kl(P_T, P_S) / 2, rel=1e-6)
    assert distill_loss(s, t, mask.long(), kind="fkl").item() == pytest.approx(kl(P_T, P_S) / 2, rel=1e-6)
    none = torch.zeros_like(mask)
    s.requires_grad_(True)
    out = distill_loss(s, t, none)
    assert out.item() == 0.0
    out.backward()                                                    # connected, with a zero gradient
    assert s.grad.abs().sum() == 0


def test_zero_probabilities_are_finite_and_exact():
    """A token the teacher rules out (logit -inf) adds nothing to KL(T||S), and nothing becomes NaN."""
    t = torch.tensor([0.0, 0.0, float("-inf")])
    s = torch.tensor([math.log(0.25), math.log(0.25), math.log(0.5)], requires_grad=True)
    loss = distill_loss(s, t, kind="fkl")                   # .5 ln(.5/.25) twice
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    for kind in ("fkl", "rkl", "jsd"):
        both = torch.tensor([0.0, float("-inf"), 1.0], requires_grad=True)
        out = distill_loss(both, both.detach().clone(), kind=kind)
        out.backward()
        assert out.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(both.grad).all()
    # large logits: log-softmax, not log(softmax)
    big = torch.tensor([1000.0, 0.0, -1000.0])
    assert torch.isfinite(distill_loss(big, big.flip(0), kind="jsd"))
    assert torch.isfinite(token_divergence(torch.log_softmax(big, -1), torch.log_softmax(big.flip(0), -1), "rkl"))


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="vocabular"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)


# ---- the stage: `lmforge distill` ------------------------------------------------------------------------------

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. def main(argv): return parse(argv) or 0\n")
STUDENT = ["model.preset=tiny", "model.overrides={d_model: 32, n_head: 2, n_kv_heads: 1}", "seq_len=32",
           "train.batch_size=4", "train.progress=false", "train.threads=1", "train.log_every=1", "eval_tokens=256",
           "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """tok/, data/ (shards of tok), teacher/ (a checkpoint of a small model over tok), other_data/ (shards of
    another tokenizer with the same vocabulary size)."""
    d = tmp_path_factory.mktemp("distill")
    (d / "corpus.txt").write_text(TEXT * 30, encoding="utf-8")
    tok = Tokenizer.train([TEXT * 30], vocab_size=272 + 48, progress=False)
    tok.save(d / "tok")
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=48,
                                      max_seq_len=64, init_std=0.3))
    checkpoint.save(d / "teacher", model=teacher, model_config=teacher.config.to_dict(), tokenizer=tok)
    assert main(["data", "prepare", "--input", str(d / "corpus.txt"), "--tokenizer", str(d / "tok"),
                 "--out", str(d / "data")]) == 0
    other = Tokenizer.train([TEXT.upper() * 30], vocab_size=272 + 48, progress=False)
    other.save(d / "other_tok")
    assert main(["data", "prepare", "--input", str(d / "corpus.txt"), "--tokenizer", str(d / "other_tok"),
                 "--out", str(d / "other_data")]) == 0
    return d


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def no_peak_measurement(monkeypatch):
    """The MFU metric measures this machine's matmul peak once per process (seconds of large matmuls): not
    what these tests are about."""
    monkeypatch.setattr("lmforge.train.trainer.measured_peak_flops", lambda device, precision: 1e12)


@pytest.mark.parametrize("loss", ["fkl", "jsd"])
def test_distill_cli_writes_a_student_checkpoint_without_the_teacher(loss, fx, tmp_path, capsys,
                                                                     no_peak_measurement):
    teacher_before = _files(fx / "teacher")
    rc = main(["distill", "--teacher", str(fx / "teacher"), "--data", str(fx / "data"), "--out", str(tmp_path / "s"),
               *STUDENT, "train.max_steps=3", f"distill.loss={loss}", "distill.temperature=2", "distill.alpha=0.7"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "distill: 3 steps" in out and "teacher" in out
    student, tok = lmforge.load(tmp_path / "s", device="cpu")
    assert student.config.d_model == 32 and student.config.vocab_size == tok.vocab_size
    assert tok.hash() == Tokenizer.load(fx / "tok").hash()
    # the checkpoint holds the student's tensors and nothing else
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "s" / "checkpoint" / "model.safetensors")
    assert set(saved) == set(student.state_dict()) - {"lm_head.weight"}      # tied head stored once
    assert all(v.shape[-1] != 48 for v in saved.values())                    # no tensor of the d_model-48 teacher
    config = json.loads((tmp_path / "s" / "checkpoint" / "config.json").read_text())
    assert config["stage"] == "distill" and config["distill"]["loss"] == loss
    assert config["distill"]["temperature"] == 2.0 and config["distill"]["alpha"] == 0.7
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kd" in r] == [1, 2, 3] and all(r["kd"] > 0 for r in rows if "kd" in r)
    final = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert final["teacher_val_bpb"] > 0 and final["val_bpb"] > 0
    assert _files(fx / "teacher") == teacher_before
    # resume continues the same run; another loss would not
    assert main(["distill", "--teacher", str(fx / "teacher"), "--data", str(fx / "data"), "--out",
                 str(tmp_path / "s"), *STUDENT, "train.max_steps=4", f"distill.loss={loss}", "distill.temperature=2",
                 "distill.alpha=0.7", "--resume"]) == 0
    assert json.loads((tmp_path / "s" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    capsys.readouterr()
    assert main(["distill", "--teacher", str(fx / "teacher"), "--data", str(fx / "data"), "--out",
                 str(tmp_path / "s"), *STUDENT, "train.max_steps=5", "distill.loss=rkl", "distill.temperature=2",
                 "distill.alpha=0.7", "--resume"]) == 2
    assert "distill" in capsys.readouterr().err


def test_the_teacher_gets_no_gradient_and_the_loss_is_the_stated_mix(fx, tmp_path):
    from lmforge.data.shards import load_shards
    from lmforge.eval.bpb import token_byte_lengths
    from lmforge.stages.distill import DistillTask
    from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

    teacher, tok = lmforge.load(fx / "teacher", device="cpu")
    teacher.train().requires_grad_(True)                       # the trainer must freeze it, not the caller
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train_tokens, val_tokens, _ = load_shards(fx / "data")
    torch.manual_seed(0)
    student = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=32))
    task = DistillTask(teacher, train_tokens, val_tokens, kind="rkl", temperature=1.5, alpha=0.25, seq_len=32,
                       batch_size=4, bos_id=tok.bos_id, token_bytes=token_byte_lengths(tok), eval_tokens=256,
                       progress=False)
    # the loss is alpha * KD + (1 - alpha) * CE, KD against the teacher's logits on the same inputs
    x, y, _ = task.batch(0, 0)
    loss, info = task.loss(student, (x, y, None))
    s_logits, ce = student(x, targets=y)
    t_logits, _ = teacher(x)
    kd = distill_loss(s_logits, t_logits, kind="rkl", temperature=1.5)
    torch.testing.assert_close(loss, 0.25 * kd + 0.75 * ce)
    torch.testing.assert_close(info["kd"], kd.detach())
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, progress=False, warmup_steps=1,
                      device="cpu", precision="fp32")
    train(student, task, cfg, checkpoint=CheckpointSpec(model_config=student.config.to_dict()))
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())
    assert set(load_file_keys(tmp_path / "run" / "checkpoint")) == set(student.state_dict()) - {"lm_head.weight"}


def load_file_keys(ck):
    from safetensors import safe_open
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_hard_labels_only_is_pretraining_and_never_asks_the_teacher(fx):
    from lmforge.data.shards import load_shards
    from lmforge.eval.bpb import token_byte_lengths
    from lmforge.stages.distill import DistillTask

    class NoTeacher(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the teacher was consulted with alpha=0")

    tok = Tokenizer.load(fx / "tok")
    train_tokens, val_tokens, _ = load_shards(fx / "data")
    student = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=32))
    task = DistillTask(NoTeacher(), train_tokens, val_tokens, alpha=0.0, seq_len=32, batch_size=4,
                       bos_id=tok.bos_id, token_bytes=token_byte_lengths(tok))
    x, y, _ = task.batch(3, 0)
    loss, _ = task.loss(student, (x, y, None))
    torch.testing.assert_close(loss, student(x, targets=y)[1])


@pytest.mark.parametrize("case", ["student-vocab", "other-tokenizer", "seq-len"])
def test_a_mismatched_teacher_is_one_line_and_writes_nothing(case, fx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = fx / ("other_data" if case == "other-tokenizer" else "data")
    extra = {"student-vocab": ["model.overrides={vocab_size: 400}"], "other-tokenizer": [],
             "seq-len": ["seq_len=128"]}[case]
    rc = main(["distill", "--teacher", str(fx / "teacher"), "--data", str(data), "--out", "run", *STUDENT,
               "train.max_steps=2", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: ")
    assert {"student-vocab": "vocab_size 400 differs from the teacher's", "other-tokenizer": "another tokenizer",
            "seq-len": "teacher's context"}[case] in lines[0]
    assert list(tmp_path.iterdir()) == []


# ---- sequence-level distillation: the teacher's replies as chat data ----------------------------------------
def bigram_teacher(tok, reply: str):
    """A model that answers every prompt with `reply` and then ends its turn: its blocks write nothing into the
    residual stream, so the next token depends on the current one alone (logits = lm_head(norm(embedding))),
    and the head maps <|assistant|> -> reply tokens -> <|end|>."""
    from lmforge.tokenizer.chat import end_of_turn_id
    from lmforge.tokenizer.tokenizer import ASSISTANT

    chain = [tok.special_tokens[ASSISTANT], *tok.encode(reply), end_of_turn_id(tok)]
    assert len(set(chain)) == len(chain), "a bigram chain needs distinct tokens"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=64, max_seq_len=128,
                                    tie_embeddings=False))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.ffn.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        emb = model.tok_emb.weight
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] += 8 * emb[a] / emb[a].norm()
    return model.eval()


def test_teacher_conversations_append_the_teachers_finished_replies(fx):
    from lmforge.infer.sampling import SamplingParams
    from lmforge.stages.distill import teacher_conversations

    tok = Tokenizer.load(fx / "tok")
    teacher = bigram_teacher(tok, " the earth.")
    prompts = [{"messages": [{"role": "user", "content": "In the beginning"}]},
               {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "void"}]}]
    rows, counts = teacher_conversations(teacher, tok, prompts, SamplingParams(temperature=0, max_tokens=8),
                                         progress=False)
    assert counts == {"prompts": 2, "kept": 2, "unfinished": 0, "stray_markers": 0, "too_long": 0}
    assert rows[0]["messages"] == [*prompts[0]["messages"], {"role": "assistant", "content": " the earth."}]
    assert rows[1]["messages"][:2] == prompts[1]["messages"] and rows[1]["messages"][2]["content"] == " the earth."
    # a reply cut by the token budget never reached its end of turn: left out, counted
    rows, counts = teacher_conversations(teacher, tok, prompts, SamplingParams(temperature=0, max_tokens=2),
                                         progress=False)
    assert rows == [] and counts["unfinished"] == 2


def test_prompt_conversations_cut_before_the_first_assistant_turn(tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.stages.distill import prompt_conversations

    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                                          {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                                          {"role": "assistant", "content": "a2"}]}) + "\n"
                 + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert prompt_conversations([str(f)]) == [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}]},
        {"messages": [{"role": "user", "content": "p"}]}]
    assert len(prompt_conversations([str(f), str(f)], n=3)) == 3
    rows = prompt_conversations(["arithmetic:digits=1"], n=4, seed=0)
    assert len(rows) == 4 and all(r["messages"][-1]["role"] == "user" for r in rows)
    with pytest.raises(ConfigError, match="how many prompts"):
        prompt_conversations(["arithmetic"])


def test_sequence_distillation_teaches_the_student_the_teachers_replies(fx, tmp_path, capsys):
    """`lmforge distill --sequence`: the teacher answers the prompts of a JSONL file (whose own answers differ),
    its conversations land in OUT/teacher_conversations.jsonl, and the SFT stage fine-tunes a new student on
    them until it gives the teacher's reply, not the file's, to a prompt it never saw."""
    tok = Tokenizer.load(fx / "tok")
    teacher = bigram_teacher(tok, " the earth.")
    checkpoint.save(tmp_path / "teacher", model=teacher, model_config=teacher.config.to_dict(), tokenizer=tok)
    words = TEXT.split()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 3]), "completion": "no idea"}) + "\n"
                             for i in range(24)))
    rc = main(["distill", "--teacher", str(tmp_path / "teacher"), "--sequence", "--data", str(chats), "--out",
               str(tmp_path / "s"), "model.preset=tiny", "model.overrides={d_model: 32, n_head: 2, n_kv_heads: 1}",
               "seq_len=32", "generate.max_new_tokens=8", "train.max_steps=30", "train.batch_size=8",
               "train.lr=1e-2", "train.warmup_steps=2", "train.progress=false", "train.threads=1",
               "sft={val_fraction: 0.0, sample_n: 0}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "24 of 24 teacher replies kept" in out
    rows = [json.loads(line) for line in (tmp_path / "s" / "teacher_conversations.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["messages"][-1] == {"role": "assistant", "content": " the earth."} for r in rows)
    student, tok2 = lmforge.load(tmp_path / "s", device="cpu")
    assert student.config.d_model == 32 and tok2.hash() == tok.hash()
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer.chat import end_of_turn_id, render_chat
    ids, _ = render_chat(tok, [{"role": "user", "content": "a prompt it never saw"}], add_generation_prompt=True)
    res = generate(student, tok, ids, SamplingParams(temperature=0, max_tokens=8,
                                                     stop_token_ids=[end_of_turn_id(tok)]), add_bos=False)
    assert res.text == " the earth." and res.stop_reason == end_of_turn_id(tok)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["teacher_replies"]["kept"] == 24 and summary["stage"] == "distill (sequence)"


def test_sequence_mode_errors(fx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer.load(fx / "tok")
    teacher = bigram_teacher(tok, " the earth.")
    checkpoint.save(fx / "bigram", model=teacher, model_config=teacher.config.to_dict(), tokenizer=tok)
    chats = fx / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "hello", "completion": "hi"}) + "\n")
    base = ["distill", "--teacher", str(fx / "bigram"), "--sequence", "--out", "run", "model.preset=tiny",
            "seq_len=32", "train.progress=false"]
    cases = [([], "no conversation sources"),
             (["--data", str(chats), "generate.max_new_tokens=2"], "ended none of its 1 replies"),
             (["--data", "arithmetic"], "how many prompts"),
             (["--data", str(chats), "sft={seq_len: 8}"], "not from sft"),
             (["--data", str(chats), "sft={no_such_key: 1}"], "sft.no_such_key"),
             (["--data", str(chats), "--resume"], "nothing to resume")]
    for extra, message in cases:
        rc = main(base[:1] + base[1:] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert list(tmp_path.iterdir()) == [], extra
