"""PPO for RLHF: the policy learns to please a reward model while a KL penalty keeps it near where it started.

    lmforge ppo --checkpoint runs/sft --reward-model runs/rm --prompts prompts.jsonl --out runs/ppo
    lmforge ppo --checkpoint runs/sft --reward-model runs/rm --task arithmetic:digits=2 --out runs/ppo

Every `ppo_epochs x num_mini_batches` optimizer steps, one rollout (lmforge.stages.grpo's sampling: the engine,
the current weights, seeded per completion) of `prompts_per_step x group_size` completions, then:
  * per-token rewards r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)) on the completion's tokens, plus the reward
    model's score of the whole reply on its last token (minus `missing_eos_penalty` when the reply was cut by
    the budget) — the InstructGPT / TRL shaping;
  * values V(s_t) from the policy's value head (a `score` head on the same trunk, ModelConfig.score_dim = 1, zero
    at the start), advantages by GAE(gamma, lam) (lmforge.train.objectives.gae), whitened over the batch;
    returns = advantages + values.
Each optimizer step takes one minibatch (the rollout shuffled anew each epoch, seeded) and minimises
    clipped policy loss  +  vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2)
averaged over completion tokens. Logged: reward (the reward model's mean score), kl (per completion, summed over
tokens), the non-score reward, clip fraction, value loss and its clip fraction, entropy, approx-KL
(0.5 * mean (log pi - log pi_old)^2), and the verifier's accuracy with --task. The reference is the starting
model, frozen. The checkpoint keeps the value head (generation ignores it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.errors import ConfigError
from lmforge.stages.grpo import GRPOTask, Rollout, token_logps, train_rl
from lmforge.stages.pairs import inherited
from lmforge.stages.reward import add_score_head
from lmforge.stages.rewards import resolve_rewards
from lmforge.train.objectives import clipped_policy_loss, gae, masked_mean, whiten
from lmforge.train.trainer import CheckpointSpec, TrainConfig


@dataclass
class PPOTrainConfig(TrainConfig):
    max_steps: int | None = 64
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    schedule: str = "constant"
    eval_every: int = 16
    log_every: int = 4


@dataclass
class PPOConfig:
    checkpoint: str = ""
    reward_model: str | None = None       # the reward model directory (or reward=[...] for other rewards)
    reward: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    task: str | None = None
    prompts: str | None = None
    group_size: int = 1                   # completions per prompt
    prompts_per_step: int = 32            # rollout batch = prompts_per_step x group_size completions
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 4
    num_mini_batches: int = 2
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    val_n: int = 200
    eval_max_tokens: int | None = None
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)

    def __post_init__(self):
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "ppo_epochs", "num_mini_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"must be an integer ≥ 1, got {v!r}", field=name)
        if (self.prompts_per_step * self.group_size) % self.num_mini_batches:
            raise ConfigError(f"the rollout of {self.prompts_per_step * self.group_size} completions does not split "
                              f"into {self.num_mini_batches} minibatches", field="num_mini_batches")
        if not self.temperature > 0:
            raise ConfigError("rollouts are sampled: temperature must be > 0", field="temperature")
        if self.kl_coef < 0:
            raise ConfigError("must be ≥ 0", field="kl_coef")
        if isinstance(self.reward, str):
            self.reward = [s for s in self.reward.split(",") if s]

    # what GRPOTask's sampling reads
    @property
    def num_iterations(self) -> int:
        return self.ppo_epochs * self.num_mini_batches

    epsilon = property(lambda self: self.cliprange)
    epsilon_high = property(lambda self: self.cliprange)


class PPOTask(GRPOTask):
    """GRPO's prompts and sampling; PPO's advantages, minibatches and value loss."""

    def _generate(self, model, step):
        cfg = self.cfg
        s = self._sample(model, step)
        logits_free = token_logps(model, s.x, s.y, s.mask)    # policy at rollout time (eval mode, no grad)
        old = logits_free[0].float()
        values = _values(model, s.x).float() * s.mask
        ref = token_logps(self.reference, s.x, s.y, s.mask)[0].float()
        kl = (old - ref) * s.mask
        score = s.rewards.float().to(old.device)
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~s.ended).float()
        token_rewards = -cfg.kl_coef * kl
        last = (s.mask * torch.arange(s.mask.size(1), device=s.mask.device)).argmax(1)
        token_rewards[torch.arange(len(last)), last] += score
        if cfg.whiten_rewards:
            token_rewards = whiten(token_rewards, s.mask, shift_mean=False)
        adv, returns = gae(token_rewards, values, s.mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, s.mask)
        self.last_stats.update({"kl": float(kl.sum(1).mean()), "score": float(score.mean()),
                                "non_score_reward": float(token_rewards.sum(1).mean() - score.mean()),
                                "value_mean": float(masked_mean(values, s.mask))})
        return Rollout(s.x, s.y, s.mask, adv, old, ref, step, values=values, returns=returns)

    def batch(self, step, micro):
        ro, cfg = self.rollout, self.cfg
        N = ro.x.size(0)
        size = N // cfg.num_mini_batches
        within = step - ro.step
        epoch, mb = divmod(within, cfg.num_mini_batches)
        perm = np.random.default_rng([self.seed, ro.step, epoch]).permutation(N)
        rows = torch.as_tensor(perm[mb * size:(mb + 1) * size], device=ro.x.device)
        return {k: getattr(ro, k)[rows] for k in ("x", "y", "mask", "adv", "old_logp", "values", "returns")}

    def loss(self, model, b):
        cfg = self.cfg
        logits, per_token, scores = model(b["x"], targets=b["y"], loss_mask=b["mask"], reduction="none",
                                          return_scores=True)
        logp = -per_token
        mask = b["mask"]
        pg, clipped = clipped_policy_loss(logp, b["old_logp"], b["adv"], mask, cfg.cliprange)
        v = scores[..., 0].float()
        v_clip = b["values"] + (v - b["values"]).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        vf_losses = torch.maximum((v - b["returns"]) ** 2, (v_clip - b["returns"]) ** 2)
        vf = 0.5 * masked_mean(vf_losses, mask)
        loss = masked_mean(pg, mask) + cfg.vf_coef * vf
        with torch.no_grad():
            lp = torch.log_softmax(logits.float(), -1)
            entropy = masked_mean(-(lp.exp() * lp).sum(-1), mask)
            approx_kl = 0.5 * masked_mean((logp - b["old_logp"]) ** 2, mask)
            vf_clipped = masked_mean(((v_clip - b["returns"]) ** 2 > (v - b["returns"]) ** 2).float(), mask)
        return loss, {"clip_fraction": float(masked_mean(clipped, mask)), "value_loss": float(vf.detach()),
                      "value_clip_fraction": float(vf_clipped), "entropy": float(entropy),
                      "approx_kl": float(approx_kl), "tokens": int(mask.sum()), **self.last_stats}

    @property
    def micro_per_step(self) -> int:
        return 1


def _values(model, x) -> torch.Tensor:
    _, _, scores = model(x, return_logits=False, return_scores=True)
    return scores[..., 0]


def run_ppo(cfg: PPOConfig, model, tok, base: str | None = None, load_model=None) -> dict:
    """Train `model` with PPO (see the module docstring); load_model(path) -> (model, tokenizer) reads the
    reward model."""
    from lmforge.data import tasks
    from lmforge.data.preference import read_prompts
    from lmforge.runtime import detect_device

    tcfg = cfg.train
    if (cfg.task is None) == (cfg.prompts is None):
        raise ConfigError("give the prompts: --task NAME (a built-in task family) or --prompts FILE.jsonl",
                          field="task")
    specs = ([cfg.reward_model] if cfg.reward_model else []) + list(cfg.reward)
    if not specs:
        raise ConfigError("PPO needs a reward: --reward-model RM (lmforge reward train)", field="reward_model")
    family = tasks.family(cfg.task) if cfg.task else None
    rows = read_prompts(cfg.prompts) if cfg.prompts else None
    fns = resolve_rewards(specs, cfg.reward_weights, family=family, load_model=load_model)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    if getattr(model, "score", None) is None:
        add_score_head(model)
        torch.nn.init.zeros_(model.score.weight)      # values start at 0: no made-up estimates at step 0
    device = detect_device(tcfg.device)
    task = PPOTask(cfg, tok, family=family, prompt_rows=rows, reward_fns=fns, device=device, seed=tcfg.seed,
                   reference=reference)
    tcfg.grad_accum = 1                                # one minibatch per optimizer step
    chat, generation = inherited(base)
    spec = CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok, generation_config=generation,
                          extra={"stage": "ppo", "chat": chat, "base": str(base) if base else None,
                                 "task": cfg.task, "prompts": cfg.prompts, "reward": specs})
    return train_rl(task, model, tcfg, spec, device, ("score", "kl", "accuracy", "val_accuracy"),
                    "reward model score / KL / accuracy")
