"""Task accuracy: a chat model answers held-out problems of a task family, the family's scorer grades them.

    from lmforge.data.tasks import family
    res = evaluate_task(model, tok, family("arithmetic:digits=2"), n=200, seed=0, k=4, samples=8)
    res["greedy"]["accuracy"], res["sampled"]["pass@4"]
    print(format_table(res))

Each problem of the family's `eval` split (disjoint from its training split, see lmforge.data.problems) is
rendered with the chat template and the generation prompt, and answered through the inference engine in
continuous batches:

* greedy    one answer per problem at temperature 0: accuracy (share of answers the scorer gives full credit),
            the mean score (partial credit where the family has it), the share of answers that ended with the
            end-of-turn token within the `max_tokens` budget, and the mean answer length in tokens (the end token
            included);
* sampled   `samples` answers per problem at `temperature` (k > 0): pass@1 and pass@k by the unbiased estimator
            of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) per problem with c of its n samples correct, averaged.

An answer ends at the end-of-turn token or at any other chat marker (the text after one would not be the answer),
at EOS, or at the budget. A family whose demonstrations call tools (`arithmetic:...,tools=true`) is answered
through the tool loop (lmforge.infer.assistant.run_chat_turn: calls decoded under the tool's schema, results fed
back) one problem at a time; its answer is the final assistant message, "ended" means that message was not cut
by the budget, and its length counts every token the assistant wrote (replies, calls, end tokens); each greedy
row also lists its calls (name, arguments, the tool's result).
"""
from __future__ import annotations

import math
import time

from tqdm import tqdm

from lmforge.errors import ConfigError, DataError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.chat import CHAT_MARKERS, END, end_of_turn_id, render_chat


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, in the numerically
    stable product form): 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check(n, k, samples, temperature, max_tokens, batch_size):
    def count(x, name, lo):
        if isinstance(x, bool) or not isinstance(x, int) or x < lo:
            raise ConfigError(f"must be an integer >= {lo}, got {x!r}", field=name)
    count(n, "n", 1)
    count(k, "k", 0)
    count(samples, "samples", max(k, 1) if k else 0)
    count(max_tokens, "max_tokens", 1)
    count(batch_size, "batch_size", 1)
    if k and not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ConfigError(f"sampled answers need a temperature > 0, got {temperature!r}", field="temperature")


def stop_ids(tok) -> list[int]:
    """Where an answer ends: the end-of-turn token and every other chat marker the tokenizer has."""
    sp = getattr(tok, "special_tokens", {})
    return sorted({end_of_turn_id(tok)} | {sp[m] for m in CHAT_MARKERS if m in sp})


def evaluate_task(model, tok, family, n: int = 200, seed: int = 0, *, k: int = 0, samples: int | None = None,
                  temperature: float = 0.8, max_tokens: int = 64, batch_size: int = 64, problems=None,
                  progress: bool = True) -> dict:
    """Greedy accuracy (and sampled pass@1 / pass@k when k > 0) of `model` on the first n held-out problems of
    `family` drawn with `seed` (or on `problems`, a list of the family's Problems, to compare models on exactly
    the same ones). samples: answers per problem for pass@k (default 2k). Returns the dict that
    `lmforge eval task` writes as JSON (see format_table)."""
    samples = (2 * k if k else 0) if samples is None else samples
    _check(n, k, samples, temperature, max_tokens, batch_size)
    t0 = time.time()
    if problems is None:
        problems = family.problems("eval", n, seed)
    if not problems:
        raise DataError(f"{family.name}: the eval split has no problems to score")
    eot = end_of_turn_id(tok)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop_ids(tok))
    # problem i samples with seeds s_i .. s_i + samples - 1 (the engine adds the completion index): no two
    # problems share a random stream
    sampled = [greedy.replace(temperature=float(temperature), n=samples,
                              seed=(seed * 1_000_003 + i * samples) % 2 ** 63) for i in range(len(problems))] if k else []
    answer = _answer_with_tools if family.tools else _answer
    g_out, s_out = answer(model, tok, family, problems, greedy, sampled, eot, batch_size, progress)

    rows, correct_counts, s_ended, s_tokens = [], [], [], []
    for i, p in enumerate(problems):
        g = g_out[i][0]
        score = float(family.score(p, g["text"]))
        row = {"prompt": p.prompt, "answer": p.answer, "response": g["text"], "score": score,
               "correct": score >= 1.0, "ended": g["ended"], "tokens": g["tokens"]}
        if "tool_calls" in g:
            row["tool_calls"], row["calls"] = g["tool_calls"], g["calls"]   # calls: {name, arguments, result}
        if k:
            outs = s_out[i]
            c = sum(float(family.score(p, o["text"])) >= 1.0 for o in outs)
            correct_counts.append(c)
            s_ended += [o["ended"] for o in outs]
            s_tokens += [o["tokens"] for o in outs]
            row["sampled_correct"] = c
        rows.append(row)

    m = len(rows)
    result = {
        "task": family.name, "split": "eval", "n": m, "seed": seed, "max_tokens": max_tokens,
        "tools": [t["function"]["name"] for t in family.tools] if family.tools else None,
        "greedy": {"accuracy": sum(r["correct"] for r in rows) / m,
                   "mean_score": sum(r["score"] for r in rows) / m,
                   "ended_with_end_of_turn": sum(r["ended"] for r in rows) / m,
                   "mean_tokens": sum(r["tokens"] for r in rows) / m},
        "sampled": None,
        "seconds": None,
        "problems": rows,
    }
    if family.tools:
        result["greedy"]["tool_calls_per_answer"] = sum(r["tool_calls"] for r in rows) / m
    if k:
        result["sampled"] = {"k": k, "samples": samples, "temperature": float(temperature),
                             "pass@1": sum(pass_at_k(samples, c, 1) for c in correct_counts) / m,
                             f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct_counts) / m,
                             "ended_with_end_of_turn": sum(s_ended) / len(s_ended),
                             "mean_tokens": sum(s_tokens) / len(s_tokens)}
    result["seconds"] = round(time.time() - t0, 3)
    return result


def _answer(model, tok, family, problems, greedy, sampled, eot, batch_size, progress):
    """All answers through one engine, in continuous batches: (greedy[i] = [answer], sampled[i] = [answers]),
    each answer {"text", "tokens", "ended"}."""
    prompts = [render_chat(tok, p.messages, add_generation_prompt=True)[0] for p in problems]
    engine = Engine(model, tok, max_batch=max(batch_size, max((s.n for s in sampled), default=1)))
    for i, ids in enumerate(prompts):
        engine.add_request(("greedy", i), ids, greedy, add_bos=False)
    for i, (ids, params) in enumerate(zip(prompts, sampled)):
        engine.add_request(("sampled", i), ids, params, add_bos=False)
    out = {"greedy": [[None] for _ in problems], "sampled": [[None] * s.n for s in sampled]}
    acc: dict[tuple, tuple[list[str], list[int]]] = {}
    total = len(problems) + sum(s.n for s in sampled)
    with tqdm(total=total, disable=not progress, unit="answer", desc=f"eval {family.name}", leave=False) as bar:
        while engine.has_unfinished():
            for o in engine.step():
                (kind, i), c = o.request_id, o.index
                text, ids = acc.setdefault((kind, i, c), ([], []))
                text.append(o.text)
                ids += o.token_ids
                if o.finished:
                    out[kind][i][c] = {"text": "".join(text), "tokens": len(ids),
                                       "ended": o.finish_reason == "stop" and o.stop_reason == eot}
                    bar.update(1)
    return out["greedy"], out["sampled"]


def _answer_with_tools(model, tok, family, problems, greedy, sampled, eot, batch_size, progress):
    """Answers through the tool loop: every answer a whole assistant turn, batch_size turns sharing the engine."""
    from lmforge.infer.assistant import run_chat_turns

    names = [t["function"]["name"] for t in family.tools]
    jobs = [(i, 0, greedy) for i in range(len(problems))]
    jobs += [(i, c, params.replace(n=1, seed=params.seed + c)) for i, params in enumerate(sampled)
             for c in range(params.n)]
    finish: dict[int, str] = {}

    def on_event(j, kind, value):
        if kind == "finish":
            finish[j] = value
            bar.update(1)

    with tqdm(total=len(jobs), disable=not progress, unit="answer", desc=f"eval {family.name}", leave=False) as bar:
        news = run_chat_turns(model, tok, [problems[i].messages for i, _, _ in jobs], names,
                              [p for _, _, p in jobs], on_event=on_event, max_batch=batch_size)

    def answer(j, p, new):
        # tokens the assistant wrote (its replies, calls and end tokens): the loss mask counts exactly those
        _, mask = render_chat(tok, list(p.messages) + new, family.tools)
        _, before = render_chat(tok, list(p.messages), family.tools)
        results = {m.get("tool_call_id"): m.get("content") for m in new if m.get("role") == "tool"}
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"],
                  "result": results.get(c.get("id"))} for m in new for c in m.get("tool_calls") or []]
        return {"text": new[-1].get("content") or "", "tokens": sum(mask) - sum(before),
                "ended": finish.get(j) == "stop", "tool_calls": len(calls), "calls": calls}

    g_out = [[None] for _ in problems]
    s_out = [[None] * params.n for params in sampled]
    for j, ((i, c, _), new) in enumerate(zip(jobs, news)):
        (g_out if j < len(problems) else s_out)[i][c] = answer(j, problems[i], new)
    return g_out, s_out


def format_table(result: dict) -> str:
    """The printed summary of an evaluate_task result."""
    g, s = result["greedy"], result["sampled"]
    head = (f"task {result['task']}: {result['n']} held-out problems (seed {result['seed']}), "
            f"budget {result['max_tokens']} tokens" + (f", tools: {', '.join(result['tools'])}"
                                                       if result["tools"] else ""))
    rows = [("", "accuracy", f"ended {END}", "mean tokens"),
            ("greedy pass@1", f"{100 * g['accuracy']:.1f}%", f"{100 * g['ended_with_end_of_turn']:.1f}%",
             f"{g['mean_tokens']:.1f}")]
    if s:
        for key in dict.fromkeys(["pass@1", f"pass@{s['k']}"]):
            rows.append((f"sampled {key}", f"{100 * s[key]:.1f}%", f"{100 * s['ended_with_end_of_turn']:.1f}%",
                         f"{s['mean_tokens']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head] + ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
                      for r in rows]
    if s:
        lines.append(f"(sampled: {s['samples']} answers per problem at temperature {s['temperature']:g}; "
                     f"pass@k unbiased estimator)")
    if abs(g["mean_score"] - g["accuracy"]) > 1e-12:
        lines.append(f"greedy mean score (partial credit): {g['mean_score']:.3f}")
    return "\n".join(lines)
