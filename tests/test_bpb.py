"""Bits per byte: every target scored once (any stride), the sliding window equals a brute-force recompute."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.bpb import evaluate_bpb, window_starts
from lmforge.model import ModelConfig, Transformer


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(n=53, V=40, T=8):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_seq_len=T, init_std=0.3)).eval()
    tokens = np.random.default_rng(0).integers(0, V, n)
    token_bytes = np.random.default_rng(1).integers(1, 4, V)
    token_bytes[0] = 0      # a "special" id: no bytes, not in the bpb sum
    return model, tokens, token_bytes


@pytest.mark.parametrize("n, T, stride", [(53, 8, 8), (53, 8, 3), (53, 8, 1), (9, 8, 4), (8, 8, 2), (2, 8, 8)])
def test_window_starts_cover_every_target_once(n, T, stride):
    starts = window_starts(n, T, stride)
    scored = []
    for k, s in enumerate(starts):
        lo = s if k == 0 else s + T - stride
        scored += list(range(lo, min(s + T, n - 1)))     # target j = predict token j + 1
    assert scored == list(range(n - 1))


@pytest.mark.parametrize("stride", [8, 5, 1])
def test_sliding_window_equals_brute_force(stride):
    model, tokens, token_bytes = setup()
    T = model.config.max_seq_len
    res = evaluate_bpb(model, tokens, token_bytes, T, batch_size=3, stride=stride)
    # brute force: target j is predicted from the window that scores it, recomputed on its own
    starts = window_starts(len(tokens), T, stride)
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for k, s in enumerate(starts):
            lo = s if k == 0 else s + T - stride
            for j in range(lo, min(s + T, len(tokens) - 1)):
                x = torch.as_tensor(tokens[s:j + 1]).view(1, -1)
                logp = F.log_softmax(model(x)[0][0, -1].double(), -1)
                if token_bytes[tokens[j + 1]]:
                    nll -= float(logp[tokens[j + 1]])
                    nbytes += int(token_bytes[tokens[j + 1]])
    assert res["tokens"] == len(tokens) - 1 and res["bytes"] == nbytes
    assert res["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)


def test_more_context_is_not_worse_for_a_copying_model():
    # after a 1 the next token depends on the one before it (1 2 1 3 1 4 ...): a target near the start of a
    # disjoint window lacks that context; with the sliding window every target sees >= 6 tokens
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, n_layer=2, n_head=2, d_model=32, max_seq_len=8)).train()
    period = torch.tensor([1, 2, 1, 3, 1, 4, 1, 5])
    seq = period.repeat(15)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        i = int(torch.randint(0, len(seq) - 9, ()))
        _, loss = model(seq[i:i + 8].view(1, -1), seq[i + 1:i + 9].view(1, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tb = np.ones(12, dtype=np.int64)
    plain = evaluate_bpb(model, seq.numpy(), tb, 8)
    slid = evaluate_bpb(model, seq.numpy(), tb, 8, stride=2)
    assert slid["tokens"] == plain["tokens"] and slid["bpb"] < plain["bpb"] * 0.7


def test_bad_stride():
    model, tokens, token_bytes = setup()
    with pytest.raises(ValueError, match="stride must be in 1..seq_len"):
        evaluate_bpb(model, tokens, token_bytes, 8, stride=9)
