"""Accuracy at N: sample N answers per held-out problem once, then pick one by each selection rule.

    res = evaluate_best_of(model, tok, family("arithmetic:digits=2"), n=8, problems=probs,
                           scorers={"reward model": rm_score})
    res["accuracy"]    # {"first sample": ..., "mean logprob": ..., "reward model": ..., "verifier": ...,
                       #  "self-consistency": ...}

Every rule sees the same N samples (engine fan-out, seeded per problem; for a family with tools, N whole turns
through the tool loop, batched), so the differences between rows are the rules alone:
* first sample      best-of-1: the first of the N (what one sampled answer scores)
* mean logprob      the sample with the highest mean token log-prob under the model's raw distribution
* <scorer>          the sample a scorer ranks highest, e.g. a reward model: scorer(prompts, replies) -> scores,
                    replies being each sample as assistant messages (with tools: the whole turn — calls, results,
                    answer)
* verifier          a sample the task's scorer marks right, when there is one (an oracle: pass@N)
* self-consistency  the majority answer (last number of each sample; ties to the answer whose best sample has the
                    higher mean log-prob), Wang et al. 2022
Ties within a rule go to the earlier sample.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from tqdm import tqdm

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.search import last_number
from lmforge.tokenizer.chat import render_chat


def _sample_answers(model, tok, problems, n, temperature, max_tokens, seed, batch_size, stops, progress):
    """texts[i][j], mean_logprobs[i][j] of n sampled answers to problem i."""
    engine = Engine(model, tok, max_batch=max(batch_size, n))
    for i, p in enumerate(problems):
        ids, _ = render_chat(tok, p.messages, add_generation_prompt=True)
        params = SamplingParams(temperature=temperature, n=n, max_tokens=max_tokens, stop_token_ids=stops,
                                seed=(seed * 1_000_003 + i * n) % 2 ** 63, logprobs=0, logprobs_mode="raw")
        engine.add_request(i, ids, params, add_bos=False)
    text = defaultdict(list)
    lps = defaultdict(list)
    with tqdm(total=len(problems) * n, disable=not progress, unit="answer", desc="best-of-N", leave=False) as bar:
        while engine.has_unfinished():
            for o in engine.step():
                key = (o.request_id, o.index)
                text[key].append(o.text)
                lps[key] += [lp.logprob for lp in o.logprobs or []]
                if o.finished:
                    bar.update(1)
    texts = [["".join(text[(i, j)]) for j in range(n)] for i in range(len(problems))]
    means = [[math.fsum(lps[(i, j)]) / len(lps[(i, j)]) if lps[(i, j)] else float("-inf") for j in range(n)]
             for i in range(len(problems))]
    return texts, means


def _sample_turns(model, tok, family, problems, n, temperature, max_tokens, seed, batch_size, progress):
    """replies[i][j] (the new messages of a whole tool-using turn), mean_logprobs[i][j] of n sampled turns of
    problem i. The mean log-prob is over the tokens the assistant wrote, teacher-forced under the model's raw
    distribution (the calls' grammar only restricted what could be sampled)."""
    from lmforge.infer.assistant import run_chat_turns

    names = [t["function"]["name"] for t in family.tools]
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=(seed * 1_000_003 + i * n + j)
                             % 2 ** 63) for i in range(len(problems)) for j in range(n)]
    convs = [p.messages for p in problems for _ in range(n)]
    with tqdm(total=len(convs), disable=not progress, unit="answer", desc="best-of-N", leave=False) as bar:
        news = run_chat_turns(model, tok, convs, names, params, max_batch=max(batch_size, n),
                              on_event=lambda i, kind, v: bar.update(1) if kind == "finish" else None)
    ctx = model.config.max_seq_len + 1            # a turn longer than the context is scored on what fits
    rows = [tuple(x[:ctx] for x in render_chat(tok, list(c) + new, family.tools)) for c, new in zip(convs, news)]
    means = []
    was_training = model.training
    model.eval()
    dev = model.tok_emb.weight.device
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            T = max(len(ids) for ids, _ in chunk) - 1
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            y = torch.zeros(len(chunk), T, dtype=torch.long)
            m = torch.zeros(len(chunk), T)
            for r, (ids, wrote) in enumerate(chunk):
                k = len(ids) - 1
                x[r, :k], y[r, :k] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
                m[r, :k] = torch.tensor(wrote[1:], dtype=torch.float32)
            logits, _ = model(x.to(dev))
            lp = torch.log_softmax(logits.float(), -1).gather(-1, y.to(dev).unsqueeze(-1)).squeeze(-1).cpu()
            means += ((lp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    model.train(was_training)
    k = 0
    replies, mean_rows = [], []
    for _ in problems:
        replies.append(news[k:k + n])
        mean_rows.append(means[k:k + n])
        k += n
    return replies, mean_rows


def _argmax(values) -> int:
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def evaluate_best_of(model, tok, family, problems, n: int, *, scorers: dict | None = None,
                     temperature: float = 0.8, max_tokens: int = 64, seed: int = 0, batch_size: int = 64,
                     progress: bool = True) -> dict:
    """The accuracy of each selection rule over the same n samples per problem (see the module docstring)."""
    from lmforge.eval.task import stop_ids

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"must be an integer >= 1, got {n!r}", field="best_of")
    if not temperature > 0:
        raise ConfigError("best-of-N samples: temperature must be > 0", field="temperature")
    if family.tools:
        replies, means = _sample_turns(model, tok, family, problems, n, temperature, max_tokens, seed, batch_size,
                                       progress)
        texts = [[r[-1].get("content") or "" for r in row] for row in replies]
    else:
        texts, means = _sample_answers(model, tok, problems, n, temperature, max_tokens, seed, batch_size,
                                       stop_ids(tok), progress)
        replies = [[[{"role": "assistant", "content": t}] for t in row] for row in texts]
    right = [[float(family.score(p, t)) >= 1.0 for t in row] for p, row in zip(problems, texts)]
    picks = {"first sample": [0] * len(problems), "mean logprob": [_argmax(m) for m in means]}
    for name, scorer in (scorers or {}).items():
        flat = scorer([p.messages for p in problems for _ in range(n)], [r for row in replies for r in row])
        picks[name] = [_argmax(flat[i * n:(i + 1) * n]) for i in range(len(problems))]
    picks["verifier"] = [next((j for j, ok in enumerate(r) if ok), 0) for r in right]
    picks["self-consistency"] = [_vote(row, m) for row, m in zip(texts, means)]
    acc = {name: sum(right[i][j] for i, j in enumerate(p)) / len(problems) for name, p in picks.items()}
    return {"task": family.name, "n_problems": len(problems), "best_of": n, "temperature": temperature,
            "max_tokens": max_tokens, "seed": seed, "accuracy": acc,
            "problems": [{"prompt": p.prompt, "answer": p.answer, "samples": row, "correct": r,
                          "picks": {name: pk[i] for name, pk in picks.items()}}
                         for i, (p, row, r) in enumerate(zip(problems, texts, right))]}


def _vote(texts: list[str], means: list[float]) -> int:
    """The sample self-consistency returns: the best (mean log-prob) sample of the most common answer."""
    groups: dict[str, list[int]] = {}
    for j, t in enumerate(texts):
        a = last_number(t)
        if a is not None:
            groups.setdefault(a, []).append(j)
    if not groups:
        return _argmax(means)
    best_of_group = {a: max(js, key=lambda j: (means[j], -j)) for a, js in groups.items()}
    order = list(groups)             # first-seen order breaks the remaining ties
    winner = max(order, key=lambda a: (len(groups[a]), means[best_of_group[a]], -order.index(a)))
    return best_of_group[winner]


def format_best_of(res: dict) -> str:
    lines = [f"best-of-{res['best_of']} on {res['n_problems']} held-out problems of {res['task']} "
             f"(temperature {res['temperature']:g}, the same samples for every rule):"]
    width = max(len(k) for k in res["accuracy"])
    for name, a in res["accuracy"].items():
        lines.append(f"  {name.ljust(width)}  {100 * a:5.1f}%")
    return "\n".join(lines)
