"""Preference and RL math (lmforge.train.objectives): goldens from the issue and by hand, and TRL's own DPO loss
code run on the same log-probs."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.train.objectives import (bradley_terry_loss, clipped_policy_loss, dpo_loss, gae, group_advantages,
                                      k3_kl, whiten)


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# ---- DPO family ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type, want", [("sigmoid", 0.644397), ("hinge", 0.9), ("ipo", 16.0)])
def test_dpo_goldens(loss_type, want):
    # beta 0.1; policy chosen/rejected -1/-2, reference -1.5/-1.5: log-ratios +0.5/-0.5, delta 1
    loss, rc, rr = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, loss_type=loss_type)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.05, -0.05))


def test_dpo_label_smoothing_and_robust():
    x = 0.1 * 1.0
    sig = lambda v: 1 / (1 + math.exp(-v))   # noqa: E731
    loss, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.log(sig(x)) - 0.2 * math.log(sig(-x)))
    loss, _, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, loss_type="robust", label_smoothing=0.2)
    assert loss.item() == pytest.approx((-0.8 * math.log(sig(x)) + 0.2 * math.log(sig(-x))) / 0.6)


def test_dpo_rejects_unknown_loss_and_bad_smoothing():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)


def _trl_dpo_loss(loss_type, beta, smoothing, pc, pr, rc, rr, comp_mask):
    """TRL's DPOTrainer._compute_loss on log-probs we choose: a stand-in model returns per-token log-probs whose
    sums over each completion are pc / pr, and the reference log-probs come precomputed."""
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = comp_mask.shape[0] // 2, comp_mask.shape[1]
    per_token = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    logps = torch.cat([pc, pr])
    counts = comp_mask[:, 1:].sum(1)
    for i in range(2 * B):                                # spread each sum over its completion tokens
        per_token[i, comp_mask[i, 1:].bool()] = logps[i] / counts[i]
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=smoothing,
                           use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": comp_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                  ("robust", 0.1)])
def test_dpo_equals_trl_on_random_batches(loss_type, smoothing):
    pytest.importorskip("trl", reason="trl is the reference (pip install -e '.[dev]')")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        B, T = 4, 9
        comp = torch.zeros(2 * B, T, dtype=torch.long)
        for i in range(2 * B):                            # completions of different lengths after a prompt
            start = int(torch.randint(1, 4, (1,), generator=g))
            end = int(torch.randint(start + 2, T + 1, (1,), generator=g))
            comp[i, start:end] = 1
        pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 20 for _ in range(4))
        beta = float(torch.rand(1, generator=g)) * 0.5 + 0.05
        want = _trl_dpo_loss(loss_type, beta, smoothing, pc, pr, rc, rr, comp)
        counts = comp[:, 1:].sum(1).double()
        loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                              chosen_tokens=counts[:B], rejected_tokens=counts[B:])
        assert loss.mean().item() == pytest.approx(float(want), rel=1e-9, abs=1e-12)


# ---- reward model ------------------------------------------------------------------------------------------------
def test_bradley_terry():
    assert bradley_terry_loss(t(1.0), t(1.0)).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(t(2.0), t(0.0)).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    assert bradley_terry_loss(t(2.0), t(0.0), margin=t(2.0)).item() == pytest.approx(math.log(2))


# ---- GRPO ---------------------------------------------------------------------------------------------------------
def test_group_advantages_golden_and_zero_variance_groups():
    adv, flat = group_advantages(t(1, 0, 0, 1, 3, 3, 3, 3), 4)
    assert adv[:4].tolist() == pytest.approx([0.865875, -0.865875, -0.865875, 0.865875], abs=1e-6)
    assert adv[4:].tolist() == [0, 0, 0, 0]
    assert flat.tolist() == [False, True]
    adv, _ = group_advantages(t(1, 0, 0, 1), 4, scale=False)      # Dr. GRPO: no division by the std
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError):
        group_advantages(t(1, 0, 0), 2)


def test_k3_kl_is_zero_at_equality_and_matches_the_true_kl_in_expectation():
    assert k3_kl(t(-1.0, -2.0), t(-1.0, -2.0)).tolist() == [0, 0]
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    expected = (p * k3_kl(p.log(), q.log())).sum()                 # E_p[k3] = KL(p || q)
    assert expected.item() == pytest.approx(exact.item(), rel=1e-12)


# ---- PPO ----------------------------------------------------------------------------------------------------------
def test_gae_on_hand_computed_trajectories():
    rewards = t(0, 0, 1), t(0, 1, 5)
    values = t(0.5, 0.6, 0.7), t(0.2, 0.4, 9)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(torch.stack(rewards), torch.stack(values), mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    # row 1 ends after two tokens: the reward and value after it are ignored
    assert adv[1].tolist() == pytest.approx([0.77, 0.6, 0.0])
    adv, _ = gae(torch.stack(rewards[:1]), torch.stack(values[:1]), mask[:1], gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.11425, 0.165, 0.3])


def test_gae_skips_the_tools_tokens_inside_a_turn():
    """A tool's result between two actions is not a step: the trajectory with it equals the one without it, and the
    final score reaches the call's tokens."""
    rewards, values = t(0, 0, 7, 7, 0, 1), t(0.5, 0.6, 9, 9, 0.7, 0.2)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]])
    adv, ret = gae(rewards[None], values[None], mask, gamma=1.0, lam=0.95)
    keep = [0, 1, 4, 5]
    plain, plain_ret = gae(rewards[keep][None], values[keep][None], torch.ones(1, 4), gamma=1.0, lam=0.95)
    assert adv[0, keep].tolist() == pytest.approx(plain[0].tolist())
    assert ret[0, keep].tolist() == pytest.approx(plain_ret[0].tolist())
    assert adv[0, 2:4].tolist() == [0, 0] and ret[0, 2:4].tolist() == [0, 0]
    # by hand: deltas (last first) 0.8, -0.5, 0.1, 0.1
    a3 = 0.8
    a2 = -0.5 + 0.95 * a3
    a1 = 0.1 + 0.95 * a2
    assert plain[0].tolist() == pytest.approx([0.1 + 0.95 * a1, a1, a2, a3])


def test_whiten_over_the_mask():
    x = t(1, 2, 3, 100)
    m = torch.tensor([1, 1, 1, 0])
    w = whiten(x, m)
    assert w[:3].tolist() == pytest.approx([-1, 0, 1], abs=1e-6) and w[3] == 0


def test_clipped_policy_loss():
    logp = torch.log(t(1.5, 0.5, 1.1)).view(1, 3)
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = t(1.0)
    loss, clipped = clipped_policy_loss(logp, old, adv, torch.ones(1, 3), eps_low=0.2)
    # ratio 1.5 clipped to 1.2 for a positive advantage; 0.5 not clipped (min keeps the lower 0.5); 1.1 inside
    assert loss[0].tolist() == pytest.approx([-1.2, -0.5, -1.1])
    assert clipped[0].tolist() == [1, 0, 0]
    loss, _ = clipped_policy_loss(logp, old, -adv, torch.ones(1, 3), eps_low=0.2, eps_high=0.28)
    assert loss[0].tolist() == pytest.approx([1.5, 0.8, 1.1])    # negative advantage: 0.5 is clipped to 0.8
