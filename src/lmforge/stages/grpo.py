"""GRPO: reinforcement learning from rewards that can be checked, with group-relative advantages (DeepSeekMath).

    lmforge grpo --checkpoint runs/sft --task arithmetic:digits=2,ops=+,restate=true --reward verifier --out runs/grpo
    lmforge grpo --checkpoint runs/sft --prompts prompts.jsonl --reward mymod:score --out runs/grpo

Each step (Task.before_step, in eval mode with the CURRENT weights):
  1. take `prompts_per_step` prompts (training problems of --task, or rows of --prompts, in a seeded order);
  2. sample `group_size` completions of each through the inference engine's fan-out (one prefill per prompt,
     each completion with its own seed: a pure function of (seed, step, prompt, completion), so a resumed run
     samples exactly what the uninterrupted one did); on a task family with tools (arithmetic:...,tools=true) a
     completion is a whole assistant turn through the tool loop — calls decoded under the tools' grammar, run,
     their results appended, the reply after them — and only the assistant's tokens are trained;
  3. score them with the reward functions (lmforge.stages.rewards), advantages (r - group mean) / (group std +
     1e-4), or r - mean with scale_rewards=false (Dr. GRPO); groups whose rewards are all equal carry no signal
     and are counted (`zero_std_groups`);
  4. with num_iterations > 1 or beta > 0, the policy's (and the reference's) log-probs of the completions.
Then `num_iterations` optimizer steps on that batch, each minimising the clipped surrogate
-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * k3 KL(policy || reference) over completion tokens, where
rho = pi / pi_old (exactly 1 on the first iteration, which makes it the plain policy gradient). Loss normalisation
(`loss_type`): "grpo" averages each completion's tokens then the completions (the paper), "dapo" averages over all
tokens of the batch, "dr_grpo" divides the token sum by completions x max_new_tokens (no length bias).
beta = 0 keeps no reference model at all (TRL's default).

The rollout batch is task state: a checkpoint taken between the iterations on one batch holds it, so a resumed
run continues with the same completions (tests kill and resume a run and compare the weights). Held-out greedy
accuracy on the task's eval split is measured before training and at every eval.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text
from lmforge.stages.pairs import inherited
from lmforge.stages.rewards import compute_rewards, resolve_rewards
from lmforge.tokenizer.chat import pad_id, render_chat
from lmforge.train.objectives import clipped_policy_loss, group_advantages, k3_kl, masked_mean
from lmforge.train.metrics import plot_curves
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class GRPOTrainConfig(TrainConfig):
    max_steps: int | None = 100
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    schedule: str = "constant"
    batch_size: int = 64            # completions per micro-batch of the loss (the rollout batch is split)
    eval_every: int = 25
    log_every: int = 5
    grad_clip: float = 1.0


@dataclass
class GRPOConfig:
    checkpoint: str = ""
    task: str | None = None               # a built-in task family: its training problems, its scorer
    prompts: str | None = None            # or a prompt JSONL file
    reward: list[str] = field(default_factory=lambda: ["verifier"])
    reward_weights: list[float] | None = None
    group_size: int = 8                   # completions per prompt (G)
    prompts_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0                     # KL coefficient (k3 estimator); 0 = no reference model
    epsilon: float = 0.2
    epsilon_high: float | None = None     # DAPO's clip-higher (None = epsilon)
    num_iterations: int = 1               # optimizer steps per rollout batch (mu)
    loss_type: str = "grpo"
    scale_rewards: bool = True
    val_n: int = 200                      # held-out problems for greedy accuracy (0 = none)
    eval_max_tokens: int | None = None    # default max_new_tokens
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"unknown loss_type {self.loss_type!r} ({', '.join(LOSS_TYPES)})", field="loss_type")
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "num_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"must be an integer ≥ 1, got {v!r}", field=name)
        if self.group_size < 2:
            raise ConfigError("GRPO compares completions within a group: group_size must be ≥ 2", field="group_size")
        if not self.temperature > 0:
            raise ConfigError("rollouts are sampled: temperature must be > 0", field="temperature")
        if self.beta < 0 or self.epsilon <= 0:
            raise ConfigError("beta must be ≥ 0 and epsilon > 0", field="beta" if self.beta < 0 else "epsilon")
        if isinstance(self.reward, str):
            self.reward = [s for s in self.reward.split(",") if s]


@dataclass
class Rollout:
    """One rollout batch: N = prompts x G right-padded rows (prompt + completion). JSON-able as task state."""
    x: torch.Tensor          # (N, T) inputs
    y: torch.Tensor          # (N, T) targets, -1 on pads
    mask: torch.Tensor       # (N, T) 1 on completion targets
    adv: torch.Tensor        # (N,) per completion (GRPO) or (N, T) per token (PPO)
    old_logp: torch.Tensor | None    # (N, T) per-token log-probs at rollout time
    ref_logp: torch.Tensor | None    # (N, T) reference log-probs (beta > 0)
    step: int                # the optimizer step that generated it
    values: torch.Tensor | None = None     # PPO: (N, T) the value head at rollout time
    returns: torch.Tensor | None = None    # PPO: (N, T) GAE returns

    _LONG = ("x", "y")

    def to_state(self) -> dict:
        return {f.name: (v.cpu().tolist() if isinstance(v, torch.Tensor) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_state(cls, d: dict, device) -> "Rollout":
        def t(name):
            v = d.get(name)
            if v is None or name == "step":
                return v
            return torch.tensor(v, dtype=torch.long if name in cls._LONG else torch.float32, device=device)
        return cls(**{f.name: t(f.name) for f in fields(cls)})


@dataclass
class Sampled:
    x: torch.Tensor          # (N, T) prompt + completion inputs, right-padded
    y: torch.Tensor          # (N, T) targets, -1 on pads
    mask: torch.Tensor       # (N, T) 1 on completion targets
    rewards: torch.Tensor    # (N,) float64, the weighted sum of the reward functions
    ended: torch.Tensor      # (N,) the completion ended with a stop token (not cut by the budget)


def token_logps(model, x, y, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-prob of each target (N, T), 0 off the mask; per-token entropy of the policy (N, T))."""
    logits, per_token = model(x, targets=y, loss_mask=mask, reduction="none")
    with torch.no_grad():
        lp = torch.log_softmax(logits.float(), -1)
        entropy = -(lp.exp() * lp).sum(-1) * mask
    return -per_token, entropy


class GRPOTask(Task):
    def __init__(self, cfg: GRPOConfig, tok, *, family=None, prompt_rows=None, reward_fns, device, seed: int,
                 reference=None):
        self.cfg, self.tok, self.family, self.rows = cfg, tok, family, prompt_rows
        self.reward_fns, self.device, self.seed = reward_fns, device, seed
        self.reference = reference
        self.pad = pad_id(tok)
        from lmforge.eval.task import stop_ids
        self.stops = stop_ids(tok)
        self.rollout: Rollout | None = None
        self.last_stats: dict = {}
        self.val_problems = family.problems("eval", cfg.val_n, seed) if family is not None and cfg.val_n else []
        self._problems = family.iter_problems("train", seed) if family is not None else None
        self._drawn: list = []                     # training problems drawn so far (the stream is replayable)

    # -- what the trainer keeps
    def frozen_modules(self):
        return {"reference": self.reference} if self.reference is not None else {}

    # -- prompts
    def _prompts(self, step: int):
        """(messages, problem or None, extra columns) of the prompts of rollout `step`: consecutive prompts of
        a seeded stream, so the k-th rollout's prompts depend only on (seed, k)."""
        P = self.cfg.prompts_per_step
        k = step // self.cfg.num_iterations
        if self.family is not None:
            while len(self._drawn) < (k + 1) * P:
                self._drawn.append(next(self._problems))
            probs = self._drawn[k * P:(k + 1) * P]
            return [(p.messages, p, {}) for p in probs]
        n = len(self.rows)
        epoch, j = divmod(k * P, n)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        picked = [self.rows[int(order[(j + i) % n])] for i in range(P)]
        return [(r.prompt, None, r.extra) for r in picked]

    # -- rollouts
    def before_step(self, model, step):
        if step % self.cfg.num_iterations and self.rollout is not None:
            return                                              # more iterations on the current batch
        self.rollout = self._generate(model, step)

    def _generate(self, model, step):
        s = self._sample(model, step)
        adv, flat = group_advantages(s.rewards, self.cfg.group_size, scale=self.cfg.scale_rewards)
        old = ref = None
        if self.cfg.num_iterations > 1:
            old = token_logps(model, s.x, s.y, s.mask)[0].float()
        if self.reference is not None:
            ref = token_logps(self.reference, s.x, s.y, s.mask)[0].float()
        self.last_stats["zero_std_groups"] = float(flat.float().mean())
        return Rollout(s.x, s.y, s.mask, adv.float().to(self.device), old, ref, step)

    def _sample(self, model, step) -> "Sampled":
        """The rollout's completions, their rewards and their rows (shared with PPO); sets last_stats."""
        from lmforge.infer.engine import Engine
        from lmforge.infer.sampling import SamplingParams
        cfg, G = self.cfg, self.cfg.group_size
        # a fresh engine each time: its batches then depend only on this rollout (not on the history of earlier
        # ones), so a resumed run samples bit for bit what the uninterrupted run sampled
        items = self._prompts(step)
        tools = self.family.tools if self.family is not None else None
        ids = [render_chat(self.tok, m, tools, add_generation_prompt=True)[0] for m, _, _ in items]
        room = model.config.max_seq_len - max(len(i) for i in ids)
        if room < 1:
            raise ConfigError(f"a prompt of {max(len(i) for i in ids)} tokens leaves no room in the context of "
                              f"{model.config.max_seq_len}", field="prompts")

        def params(i):
            return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, n=G,
                                  max_tokens=min(cfg.max_new_tokens, room), stop_token_ids=self.stops,
                                  seed=(self.seed * 1_000_003 + step * 10_007 + i * G) % 2 ** 63)
        if tools:
            seqs, texts, turns = self._episodes(model, items, params)
        else:
            turns = None
            engine = Engine(model, self.tok, max_batch=cfg.prompts_per_step * G)
            outs: dict = {}
            for i, p in enumerate(ids):
                engine.add_request(i, p, params(i), add_bos=False)
            while engine.has_unfinished():
                for o in engine.step():
                    outs.setdefault((o.request_id, o.index), []).extend(o.token_ids)
            completions = [[outs.get((i, c), []) for c in range(G)] for i in range(len(items))]
            texts = [self._text(c) for group in completions for c in group]
            # the completion's targets are trained: the mask starts at the prompt's last position
            seqs = [(p + c, [0] * len(p) + [1] * len(c)) for p, group in zip(ids, completions) for c in group]
        prompts = [m for m, _, _ in items for _ in range(G)]
        problems = [p for _, p, _ in items for _ in range(G)]
        keys = sorted({k for _, _, e in items for k in e})
        columns = {k: [e.get(k) for _, _, e in items for _ in range(G)] for k in keys}
        rewards, means = compute_rewards(self.reward_fns, prompts, texts, problems, columns, turns)
        # rows: the whole sequence right-padded; targets whose token the policy wrote are trained
        T = max(len(full) for full, _ in seqs) - 1
        N = len(seqs)
        x = torch.full((N, T), self.pad, dtype=torch.long)
        y = torch.full((N, T), -1, dtype=torch.long)
        mask = torch.zeros((N, T))
        ended = torch.zeros(N, dtype=torch.bool)
        for r, (full, wrote) in enumerate(seqs):
            n = len(full) - 1
            x[r, :n], y[r, :n] = torch.tensor(full[:-1]), torch.tensor(full[1:])
            mask[r, :n] = torch.tensor(wrote[1:], dtype=torch.float32)
            ended[r] = bool(wrote[-1]) and full[-1] in self.stops
        correct = None
        if self.family is not None:
            correct = float(np.mean([self.family.score(p, t) >= 1.0 for p, t in zip(problems, texts)]))
        self.last_stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                           "completion_tokens": float(mask.sum(1).mean()),
                           **({"accuracy": correct} if correct is not None else {}),
                           **{f"rewards/{k}": v for k, v in means.items()}}
        self.sample_text = (prompts[0][-1]["content"], texts[0])
        dev = self.device
        return Sampled(x.to(dev), y.to(dev), mask.to(dev), rewards, ended.to(dev))

    def _episodes(self, model, items, params):
        """Tool-using rollouts: each completion is a whole assistant turn through the tool loop (reply, calls
        decoded under the tools' grammar, results, the reply after them), all of a step's turns sharing the
        engine's batch. Rows are the conversation as rendered (the tokens SFT trains on); the policy's part is the
        assistant's tokens — tool results are in the context but not trained. Returns ([(ids, wrote)], final
        answer texts, the turns' messages)."""
        from lmforge.infer.assistant import run_chat_turns
        tools, G = self.family.tools, self.cfg.group_size
        names = [t["function"]["name"] for t in tools]
        convs = [list(messages) for messages, _, _ in items for _ in range(G)]
        turn_params = [params(i).replace(n=1, seed=params(i).seed + c) for i in range(len(items)) for c in range(G)]
        news = run_chat_turns(model, self.tok, convs, names, turn_params, max_batch=len(convs))
        seqs, texts = [], []
        for messages, new in zip(convs, news):
            n_before = len(render_chat(self.tok, messages, tools)[0])
            full, wrote = render_chat(self.tok, messages + new, tools)
            full = full[:model.config.max_seq_len + 1]
            wrote = [0] * n_before + list(wrote[n_before:len(full)])
            seqs.append((full, wrote))
            texts.append(new[-1].get("content") or "")
        return seqs, texts, news

    def _text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.stops]
        return self.tok.decode(ids)

    # -- the loss
    def batch(self, step, micro):
        ro, B = self.rollout, self.cfg.train.batch_size
        rows = slice(micro * B, (micro + 1) * B)
        sub = lambda t: None if t is None else t[rows]   # noqa: E731
        return ro.x[rows], ro.y[rows], ro.mask[rows], ro.adv[rows], sub(ro.old_logp), sub(ro.ref_logp)

    def loss(self, model, batch):
        cfg = self.cfg
        x, y, mask, adv, old, ref = batch
        logp, entropy = token_logps(model, x, y, mask)
        old_logp = logp.detach() if old is None else old
        per_tok, clipped = clipped_policy_loss(logp, old_logp, adv, mask, cfg.epsilon, cfg.epsilon_high)
        kl = None
        if ref is not None:
            kl = k3_kl(logp, ref) * mask
            per_tok = per_tok + cfg.beta * kl
        n_rows = self.rollout.adv.numel()
        if cfg.loss_type == "grpo":      # each completion's token mean, averaged over the rollout's completions
            loss = (per_tok.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_rows
        elif cfg.loss_type == "dapo":    # all tokens of the rollout weigh the same
            loss = per_tok.sum() / self.rollout.mask.sum().clamp(min=1)
        else:                            # dr_grpo: a constant normaliser, no length bias
            loss = per_tok.sum() / (n_rows * cfg.max_new_tokens)
        # the trainer divides by the micro-batches of a step; these normalisers already cover the whole rollout
        loss = loss * self.micro_per_step
        info = {"clip_fraction": float(masked_mean(clipped, mask)), "entropy": float(masked_mean(entropy, mask)),
                "tokens": int(mask.sum()), **self.last_stats}
        if kl is not None:
            info["kl"] = float(masked_mean(kl.detach(), mask))
        return loss, info

    @property
    def micro_per_step(self) -> int:
        B = self.cfg.train.batch_size
        return max(1, -(-self.rollout.adv.numel() // B)) if self.rollout is not None else 1

    # -- evaluation
    def evaluate(self, model, final=False):
        if not self.val_problems:
            return {}
        from lmforge.eval.task import evaluate_task
        res = evaluate_task(model, self.tok, self.family, n=len(self.val_problems), problems=self.val_problems,
                            max_tokens=self.cfg.eval_max_tokens or self.cfg.max_new_tokens, progress=False)
        return {"val_accuracy": res["greedy"]["accuracy"]}

    def samples(self, model):
        return [f"{q!r} -> {a!r}" for q, a in [getattr(self, "sample_text", ("", ""))]]

    def state_dict(self):
        return {"seed": self.seed, "rollout": self.rollout.to_state() if self.rollout is not None else None,
                "rollout_stats": self.last_stats}

    def load_state_dict(self, d):
        if d.get("seed") != self.seed:
            raise ConfigError("resuming with another seed would not continue the same run", field="seed")
        if d.get("rollout") is not None:
            self.rollout = Rollout.from_state(d["rollout"], self.device)
            self.last_stats = d.get("rollout_stats") or {}


def run_grpo(cfg: GRPOConfig, model, tok, base: str | None = None, load_model=None) -> dict:
    """Train `model` with GRPO (see the module docstring). load_model(path) -> (model, tokenizer) reads reward
    model directories named in cfg.reward."""
    from lmforge.data import tasks
    from lmforge.data.preference import read_prompts
    from lmforge.runtime import detect_device

    tcfg = cfg.train
    if (cfg.task is None) == (cfg.prompts is None):
        raise ConfigError("give the prompts: --task NAME (a built-in task family) or --prompts FILE.jsonl",
                          field="task")
    family = tasks.family(cfg.task) if cfg.task else None
    rows = read_prompts(cfg.prompts) if cfg.prompts else None
    device = detect_device(tcfg.device)
    fns = resolve_rewards(cfg.reward, cfg.reward_weights, family=family, load_model=load_model)
    reference = None
    if cfg.beta > 0:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    task = GRPOTask(cfg, tok, family=family, prompt_rows=rows, reward_fns=fns, device=device, seed=tcfg.seed,
                    reference=reference)
    micro = -(-(cfg.prompts_per_step * cfg.group_size) // tcfg.batch_size)
    if tcfg.grad_accum != micro:
        tcfg.grad_accum = micro     # the rollout batch, split into micro-batches, is one optimizer step
    chat, generation = inherited(base)
    spec = CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok, generation_config=generation,
                          extra={"stage": "grpo", "chat": chat, "base": str(base) if base else None,
                                 "task": cfg.task, "prompts": cfg.prompts, "reward": list(cfg.reward)})
    return train_rl(task, model, tcfg, spec, device, ("reward", "accuracy", "val_accuracy", "kl"), "reward / accuracy")


def train_rl(task, model, tcfg, spec, device, plot_keys, ylabel) -> dict:
    """The part GRPO and PPO share: held-out accuracy before (not on a resume), the one trainer, the curves and
    summary.json (rank 0)."""
    before = None
    resumed = tcfg.resume and (Path(tcfg.out_dir) / "checkpoint").exists()
    if task.val_problems and not resumed:
        model.to(device).eval()
        with torch.no_grad():
            before = task.evaluate(model)["val_accuracy"]
    t0 = time.time()
    summary = train(model, task, tcfg, checkpoint=spec)
    summary.update(wall_time=time.time() - t0, val_accuracy_before=before)
    if int(os.environ.get("RANK", 0)) == 0:
        run = Path(tcfg.out_dir)
        plot_curves(run / "metrics.jsonl", run / "reward.png", title=run.name, keys=plot_keys, ylabel=ylabel)
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n")
    return summary
