"""Distillation losses: how far a student's next-token distribution is from a teacher's, per token position.

Three divergences between the teacher's p_T and the student's p_S, both softened by a temperature τ
(p = softmax(logits / τ)):

    fkl   forward KL   KL(p_T || p_S) = Σ p_T (log p_T − log p_S)     mode-covering: the student spreads its mass
                                                                      over everything the teacher deems possible
    rkl   reverse KL   KL(p_S || p_T) = Σ p_S (log p_S − log p_T)     mode-seeking: the student may drop some of
                                                                      the teacher's modes but never puts mass
                                                                      where the teacher puts none
    jsd   generalized Jensen–Shannon divergence with β (GKD: Agarwal et al. 2024, "On-policy distillation of
          language models"), in the convention of TRL's `GKDTrainer.generalized_jsd_loss`:
              M = β p_T + (1 − β) p_S
              JSD(β) = β KL(p_T || M) + (1 − β) KL(p_S || M)
          β weights the teacher's side. JSD(β) itself vanishes at β = 0 and β = 1 (M becomes one of the two
          distributions); near the ends it behaves like β·KL(p_T || p_S) and (1 − β)·KL(p_S || p_T). As TRL does,
          β = 0 is defined as the forward KL and β = 1 as the reverse KL.

Every loss is multiplied by τ² (Hinton et al. 2015, "Distilling the knowledge in a neural network"): the
gradient of a divergence between softened distributions shrinks like 1/τ² — for the forward KL it is
(p_S − p_T) / τ per student logit, and p_S − p_T itself shrinks like 1/τ at high τ — so the scaling keeps its
size comparable to the hard-label loss as τ changes.
(TRL's JSD applies the temperature without τ²; at the default τ = 1 the two agree.)

The reduction is the mean over the real token positions (`mask`): the divergence is summed over the vocabulary at
each position, then averaged over the positions that count. Log-probabilities are log-softmax in fp32 (a
logsumexp, never the log of a softmax), the mixture's log-probability is a logsumexp of the two weighted
log-probabilities, and a term with zero probability contributes exactly 0 (no 0 · log 0 = NaN, also when a
logit is −inf).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dimension, from log-probabilities. Where p = 0 the term is 0, with a zero (not
    NaN) gradient, whatever log q is there."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))   # keeps -inf - -inf out of the graph
    return (p * diff).sum(-1)


def token_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "fkl",
                     beta: float = 0.5) -> torch.Tensor:
    """The divergence `kind` at each position, from log-probabilities (..., V) -> (...)."""
    if kind == "fkl":
        return _kl(teacher_logp, student_logp)
    if kind == "rkl":
        return _kl(student_logp, teacher_logp)
    if kind != "jsd":
        raise ValueError(f"unknown distillation loss {kind!r}; expected one of {', '.join(LOSSES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    # log M = log(β p_T + (1-β) p_S), a logsumexp of the weighted log-probabilities. A token both rule out
    # (-inf twice) would give logaddexp a NaN gradient: floor the inputs at the lowest finite number instead
    # (that token's terms are 0 in both KLs anyway).
    low = torch.finfo(teacher_logp.dtype).min
    log_m = torch.logaddexp(teacher_logp.clamp(min=low) + math.log(beta),
                            student_logp.clamp(min=low) + math.log1p(-beta))
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                 kind: str = "fkl", temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """τ² · divergence(`kind`) between softmax(teacher_logits / τ) and softmax(student_logits / τ), averaged over
    the positions where `mask` is true (all positions when None).

    student_logits, teacher_logits: (..., V) over the same vocabulary; the teacher's are treated as constants
    (detached). mask: (...) bool or 0/1. A batch with no real position gives 0 (still connected to the graph)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student and teacher logits cover different vocabularies "
                         f"({student_logits.shape[-1]} vs {teacher_logits.shape[-1]})")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]                 # only the positions that count are softmaxed at all
    s_logp = F.log_softmax(s.float() / temperature, dim=-1)
    t_logp = F.log_softmax(t.float() / temperature, dim=-1)
    per_token = token_divergence(s_logp, t_logp, kind, beta)
    if per_token.numel() == 0:
        return student_logits.sum() * 0.0
    return per_token.mean() * temperature ** 2
