"""Muon: Newton–Schulz orthogonalises, the update rule (vs torch.optim.Muon and by hand), which parameters go
where, the trainer's LR schedule reaching both optimizers, state_dict round trips and a real run through the
trainer (bitwise kill-and-resume with Muon: tests/test_trainer.py)."""
import io

import pytest
import torch
import torch.nn as nn

from lmforge.config import build
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.config import get_preset
from lmforge.model.transformer import Transformer
from lmforge.train.metrics import read_metrics
from train_driver import run_driver  # tests/ is on sys.path under pytest
from lmforge.train.muon import Muon, MuonWithAdamW, default_ns_dtype, hidden_matrices, newton_schulz
from lmforge.train.trainer import TrainConfig, build_optimizer


def tiny_transformer(**kw):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_heads=2,
                                  max_seq_len=16, **kw))


# ---------------------------------------------------------------------------------------------------------------
# Newton–Schulz

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 48), (48, 96), (37, 100), (192, 768)])
def test_newton_schulz_is_nearly_orthogonal_with_g_singular_vectors(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(*shape, generator=g)
    O = newton_schulz(G, steps=5, dtype=dtype)
    assert O.shape == G.shape and O.dtype == dtype
    s = torch.linalg.svdvals(O.double())
    assert 0.6 <= s.min() and s.max() <= 1.2, (s.min().item(), s.max().item())   # raw G's span ~3x here
    # an odd polynomial in G keeps G's singular vectors: U^T O V is diagonal up to rounding
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    core = U.T @ O.double() @ Vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.norm() / core.norm() < (1e-4 if dtype == torch.float32 else 0.05)
    # invariant to the gradient's scale (the update size comes from the lr alone)
    assert torch.allclose(newton_schulz(1e-3 * G, 5, torch.float32), newton_schulz(G, 5, torch.float32), atol=1e-4)


def test_newton_schulz_square_matrix_bulk():
    """A random square matrix has singular values down to ~0; five steps lift all but the tiniest ones."""
    G = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(newton_schulz(G, 5, torch.float32))
    assert s.max() <= 1.2
    assert ((s >= 0.6) & (s <= 1.2)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# the update rule

@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_matches_torch_optim_muon(shape):
    """torch's Muon (Keller Jordan's rule, bf16 Newton–Schulz) as the reference, over several momentum steps."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g)
    grads = [torch.randn(*shape, generator=g) for _ in range(6)]
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    o1 = Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16)
    o2 = torch.optim.Muon([ref], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True)
    for gr in grads:
        ours.grad, ref.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    moved = (ref - w0).abs().max().item()
    # bf16 rounding differs (torch fuses with addmm); a wrong scale/momentum/nesterov would be off by >10% of moved
    assert (ours - ref).abs().max().item() < 0.04 * moved, ((ours - ref).abs().max().item(), moved)


def test_update_rule_by_hand_fp64():
    """Two steps with Nesterov momentum, decoupled weight decay, lr_scale and the sqrt(max(1, rows/cols)) scale."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(40, 10, generator=g, dtype=torch.float64)
    g1, g2 = (torch.randn(40, 10, generator=g, dtype=torch.float64) for _ in range(2))
    p = nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.01, lr_scale=3.0, momentum=0.9, weight_decay=0.5, ns_dtype=torch.float64)
    lr, mu, wd, scale = 0.03, 0.9, 0.5, 2.0                    # sqrt(40/10) = 2
    w, buf = w0.clone(), torch.zeros_like(w0)
    for gr in (g1, g2):
        p.grad = gr.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * gr
        w = w * (1 - lr * wd) - lr * scale * newton_schulz(gr + mu * (buf - gr), 5, torch.float64)
    assert torch.allclose(p.detach(), w, atol=1e-12, rtol=0)
    assert torch.equal(p.grad, g2)  # the gradient itself is left untouched


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])


# ---------------------------------------------------------------------------------------------------------------
# which parameters go to Muon

def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, bias=True, pos="learned", ffn="gelu",
                                                  norm="layernorm")])
def test_transformer_routing(kw):
    model = tiny_transformer(**kw)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    muon = _names(model, [p for g in opt.muon.param_groups for p in g["params"]])
    adamw = _names(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    projs = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.up_proj", "ffn.down_proj"]
    if model.config.ffn == "swiglu":
        projs.append("ffn.gate_proj")
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in projs}
    assert muon.isdisjoint(adamw) and muon | adamw == {n for n, _ in model.named_parameters()}
    assert "tok_emb.weight" in adamw
    if not model.config.tie_embeddings:
        assert {"lm_head.weight", "pos_emb.weight", "blocks.0.attn.q_proj.bias"} <= adamw
    # weight decay as the model asks: hidden matrices and embeddings/head decay, norms and biases do not
    assert all(g["weight_decay"] == 0.1 for g in opt.muon.param_groups)
    for g in opt.adamw.param_groups:
        assert all(p.dim() >= 2 for p in g["params"]) == (g["weight_decay"] == 0.1)


def test_generic_model_routing_and_no_hidden_layer():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    assert [id(p) for p in hidden_matrices(mlp)] == [id(mlp[0].weight), id(mlp[2].weight)]  # not the output layer
    frozen = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    frozen[0].weight.requires_grad_(False)
    assert hidden_matrices(frozen) == []
    with pytest.raises(ConfigError, match="no hidden weight matrices"):
        build_optimizer(nn.Linear(8, 1), TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_config_validation():
    with pytest.raises(ConfigError, match="FSDP"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(ConfigError, match="muon_lr"):
        TrainConfig(optimizer="muon", muon_lr=0.0)
    with pytest.raises(ConfigError, match="muon_momentum"):
        TrainConfig(muon_momentum=1.0)
    with pytest.raises(ConfigError, match="optimizer"):
        build(TrainConfig, {"optimizer": "sgd"})
    assert build(TrainConfig, {"optimizer": "muon", "muon_lr": "0.05"}).muon_lr == 0.05


# ---------------------------------------------------------------------------------------------------------------
# one optimizer object for the trainer

def _fake_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_scheduled_lr_reaches_both_with_their_own_peaks():
    """The trainer writes lr into every group; AdamW steps by it, Muon by it × muon_lr / lr."""
    model = tiny_transformer()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_momentum=0.0, weight_decay=0.0)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fake_grads(model, 0)
    q = model.blocks[0].attn.q_proj.weight
    ns_dtype = opt.muon.ns_dtype or default_ns_dtype(q.device)   # what Muon computes in on this machine
    expected_q = before["blocks.0.attn.q_proj.weight"] - 0.01 * newton_schulz(q.grad, 5, ns_dtype).float()
    for g in opt.param_groups:   # as the loop does mid-schedule: half the peak
        g["lr"] = 0.5e-3
    opt.step()
    # Adam's first step is lr * g/|g| = ±lr per element
    norm_step = (model.norm.weight - before["norm.weight"]).abs()
    assert torch.allclose(norm_step, torch.full_like(norm_step, 0.5e-3), rtol=1e-3)
    assert torch.allclose(q, expected_q, atol=1e-6)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def _trained_optimizer(seed=0):
    model = tiny_transformer()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    for step in range(3):
        _fake_grads(model, seed + step)
        opt.step()
    return model, opt


def test_state_dict_round_trip_is_exact_and_weights_only():
    model_a, opt_a = _trained_optimizer()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model_b = tiny_transformer()
    model_b.load_state_dict(model_a.state_dict())
    opt_b = build_optimizer(model_b, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    opt_b.load_state_dict(state)
    assert len(opt_b.muon.state) == 14 and len(opt_b.adamw.state) == 6   # every tensor's buffers came back
    for step in range(3):   # continuing from the loaded state is bitwise the same as never stopping
        for m, o in ((model_a, opt_a), (model_b, opt_b)):
            _fake_grads(m, 100 + step)
            o.step()
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), n
    # an AdamW run's state (or garbage) is refused with a one-line user error
    adamw_state = build_optimizer(tiny_transformer(), TrainConfig(), torch.device("cpu")).state_dict()
    with pytest.raises(CheckpointError, match="not Muon's"):
        opt_b.load_state_dict(adamw_state)
    other = Transformer(get_preset("tiny", vocab_size=64, n_layer=3, d_model=32, n_head=4, n_kv_heads=2,
                                   max_seq_len=16))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_optimizer(other, TrainConfig(optimizer="muon"), torch.device("cpu")).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# through the real trainer loop

@pytest.fixture(scope="module")
def full_muon_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon") / "full"
    r = run_driver(out, "optimizer=muon", "max_steps=30")
    assert r.returncode == 0, r.stderr
    return out


def test_muon_training_decreases_loss(full_muon_run):
    rows = read_metrics(full_muon_run / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 1.5, (losses[0], losses[-1])   # ln(64) = 4.16 at the start
    assert rows[-1]["val_loss"] < 3.0
    assert (full_muon_run / "checkpoint" / "optimizer.pt").is_file()
