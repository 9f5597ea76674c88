"""Scoring conversations with a reward model (a checkpoint with a score head, `lmforge reward train`).

    rm = RewardModel(*lmforge.load("runs/rm"))
    rm.rewards([[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]])   # [1.7]

The reward of prompt + reply is the score head's output at the last token of the rendered conversation.
"""
from __future__ import annotations

import torch

from lmforge.errors import DataError
from lmforge.tokenizer.chat import pad_id, render_chat


def pair_rewards(model, x, last) -> torch.Tensor:
    """The score head's output at each row's last real token: (rows,)."""
    _, _, scores = model(x, return_logits=False, return_scores=True)
    return scores[torch.arange(x.size(0), device=x.device), last, 0].float()


class RewardModel:
    """A trained reward model that scores conversations: rewards(prompts, replies) -> list[float]."""

    def __init__(self, model, tok, batch_size: int = 32):
        if getattr(model, "score", None) is None:
            raise DataError("this checkpoint has no score head: not a reward model (train one with "
                            "`lmforge reward train`)", file=getattr(model, "loaded_from", None))
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        self.pad = pad_id(tok)

    @torch.no_grad()
    def rewards(self, prompts: list[list[dict]], replies: list[list[dict]], tools=None) -> list[float]:
        ctx = self.model.config.max_seq_len
        seqs = []
        for p, r in zip(prompts, replies):
            ids, _ = render_chat(self.tok, p + r, tools)
            seqs.append(ids[-ctx:])           # the end of a too-long conversation (the reply) is what is scored
        out = []
        dev = self.model.tok_emb.weight.device
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            T = max(len(c) for c in chunk)
            x = torch.full((len(chunk), T), self.pad, dtype=torch.long)
            for i, c in enumerate(chunk):
                x[i, :len(c)] = torch.tensor(c)
            last = torch.tensor([len(c) - 1 for c in chunk])
            out += pair_rewards(self.model, x.to(dev), last.to(dev)).tolist()
        return out
