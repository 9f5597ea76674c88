"""The head fused with the cross-entropy (model/loss.py) against the plain logits -> F.cross_entropy path, and
the CPU allocator setting the trainer applies."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lmforge.model.loss as loss_mod
from lmforge.model import ModelConfig, Transformer
from lmforge.model.loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(x, w, t, mask, reduction):
    per = F.cross_entropy((x @ w.t()).reshape(-1, w.size(0)), t.reshape(-1), ignore_index=-1,
                          reduction="none")
    weights = (t.reshape(-1) != -1).to(x.dtype) * (1.0 if mask is None else mask.reshape(-1).to(x.dtype))
    total = (per * weights).sum()
    return total / weights.sum() if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_cross_entropy_on_logits_loss_and_gradients(reduction, masked, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_FLOATS", 97 * 5)   # 5 rows a chunk: several chunks and a short last one
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 7, 16, 97
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :3] = -1                                                     # ignored targets
    mask = torch.rand(B, T, generator=g, dtype=torch.float64) if masked else None
    ref = reference(x, w, t, mask, reduction)
    gx, gw = torch.autograd.grad(ref * 2.5, (x, w))                   # an upstream gradient other than 1
    got = linear_cross_entropy(x, w, t, mask, reduction)
    fx, fw = torch.autograd.grad(got * 2.5, (x, w))
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fx, gx, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fw.double(), gw, rtol=1e-6, atol=1e-9)
    with torch.no_grad():                                             # loss only, no gradient buffers
        torch.testing.assert_close(linear_cross_entropy(x, w, t, mask, reduction).double(), ref, rtol=1e-6, atol=1e-6)


def test_only_the_inputs_that_need_a_gradient_get_one():
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(13, 8)                                            # a frozen head
    linear_cross_entropy(x, w, torch.randint(0, 13, (10,))).backward()
    assert x.grad is not None and w.grad is None


def test_rejects_per_token_reduction():
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), reduction="none")


@pytest.mark.parametrize("tie", [True, False])
def test_model_fused_loss_matches_logits_path(tie, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_FLOATS", 61 * 8)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=32,
                      tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    x = torch.randint(0, 61, (2, 20))
    y = torch.randint(0, 61, (2, 20))
    y[1, 15:] = -1
    mask = (torch.arange(20) % 3 != 0).expand(2, 20)
    grads = []
    for fused in (False, True):
        model.zero_grad()
        logits, loss = model(x, targets=y, loss_mask=mask, return_logits=not fused)
        assert (logits is None) == fused
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1.double(), l0, rtol=1e-9, atol=1e-9)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-7, atol=1e-10, msg=n)


@torch.no_grad()
def test_fused_loss_under_bf16_autocast_is_close():
    cfg = ModelConfig(vocab_size=61, n_layer=1, n_head=2, d_model=32, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = model(x, targets=y)
        _, fused = model(x, targets=y, return_logits=False)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - plain.item()) < 2e-2


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    # glibc maps a 64 MB block on its own (mallinfo2's hblkhd counts such bytes) unless told not to
    code = textwrap.dedent("""
        import ctypes, sys, torch
        from lmforge.runtime import keep_freed_memory
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        def mapped_while_holding():
            t = torch.empty(16 << 20)
            return libc.mallinfo2().hblkhd >= t.numel() * 4
        before = mapped_while_holding()
        applied = keep_freed_memory()
        print(before, applied, mapped_while_holding())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]
