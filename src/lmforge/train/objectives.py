"""The losses and estimators of preference and reinforcement learning, as plain tensor functions.

    bradley_terry_loss(r_chosen, r_rejected)                  reward model: -log sigmoid(r_w - r_l [- margin])
    dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")   DPO family on summed log-probs (policy, reference)
    group_advantages(rewards, group_size)                     GRPO: (r - group mean) / (group std + eps)
    gae(rewards, values, mask, gamma, lam)                    PPO: generalised advantage estimation
    whiten(x, mask)                                           zero mean, unit variance over the masked entries
    clipped_policy_loss(logp, old_logp, adv, mask, ...)       PPO/GRPO surrogate with the ratio clipped
    k3_kl(logp, ref_logp)                                     per-token KL(policy || reference) estimator

They follow the published formulas and TRL's conventions where TRL has one (tests compare with TRL on the same
inputs): DPO's implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)); IPO length-normalises the log-ratios
by the completion's token count; GRPO's group std is the unbiased one. Stages (lmforge.stages.*) feed them log-probs
computed by the model and keep everything else (data, rollouts, logging) out of here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's optional margin), not reduced."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed completion log-probs.

    sigmoid  -log sigmoid(beta * delta), delta = chosen log-ratio - rejected log-ratio (Rafailov et al. 2023);
             with label_smoothing e: -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta) (conservative DPO)
    robust   [-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)] / (1 - 2e) (Chowdhury et al. 2024),
             unbiased under a share e of flipped labels
    hinge    relu(1 - beta * delta) (SLiC)
    ipo      (delta' - 1 / (2 beta))^2 with delta' the log-ratios divided by each completion's token count
             (Azar et al. 2023; the per-token form TRL uses); token counts default to 1
    Rewards are beta * log-ratio, detached (what is logged as rewards/chosen, rewards/rejected)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r} (losses: {', '.join(DPO_LOSSES)})")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        loss = (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    else:
        nc = chosen_tokens.clamp(min=1) if chosen_tokens is not None else 1.0
        nr = rejected_tokens.clamp(min=1) if rejected_tokens is not None else 1.0
        loss = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages: rewards (n_groups * group_size,) in consecutive groups -> (r - group mean) /
    (unbiased group std + eps); scale=False keeps r - mean (Dr. GRPO). Also returns a bool per group: True when
    its rewards are all equal (no learning signal)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    g = rewards.view(-1, group_size)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = g - mean
    if scale:
        adv = adv / (std + eps)
    return adv.reshape(-1), (std.squeeze(1) == 0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of token-level rewards and value estimates, (B, T) each, over the positions where
    mask is 1 (the policy's tokens; positions after its end are 0 and get 0). The value after the last token is 0
    (the episode ends there). Positions with mask 0 between policy tokens (a tool's result inside a tool-using
    turn: the environment's tokens, not actions) are skipped: the action before them is followed by the action
    after them, as if they were not there. returns = advantages + values."""
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        act = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * last
        adv[:, t] = torch.where(act, step, torch.zeros_like(step))
        last = torch.where(act, step, last)
        next_value = torch.where(act, values[:, t], next_value)
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is 1 (unbiased variance, as TRL); shift_mean=False only
    scales. Masked-out entries come back 0."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps) if shift_mean else x * torch.rsqrt(var + eps)
    return out * m


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float = 0.2, eps_high: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), (B, T), 0 where the
    mask is 0; and the clipped indicator (for the clip fraction). advantages: (B, T) or (B,) per sequence."""
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    m = mask.to(logp.dtype)
    loss = -torch.minimum(unclipped, clipped) * m
    was_clipped = (clipped < unclipped).to(logp.dtype) * m
    return loss, was_clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)
