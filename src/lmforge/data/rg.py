"""`rg:NAME`: any reasoning-gym dataset as a task family, with the dataset's own scorer.

    rg:basic_arithmetic
    rg:chain_sum:min_terms=2,max_terms=3          options go to the dataset's config (values read as YAML)

reasoning-gym is an optional dependency (`pip install 'lmforge[tasks]'`). A dataset entry is {question, answer,
metadata}; the prompt is the question as one user message, the demonstration answers with the reference answer,
and `score` is the dataset's `score_answer` on the response (the text inside its last <answer>...</answer> when
there is one, else the whole response), a float in [0, 1].

Splits: item i of a dataset seeded with s is drawn from Random(s + i), so the train and eval streams start in two
separate seed ranges, and each keeps only the items whose question hashes into its split (problems.split_of):
disjoint by question text even for a dataset with few distinct questions. Eval problems are distinct.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator

from lmforge.data.problems import Problem, TaskFamily, check_split, parse_options, split_of
from lmforge.errors import ConfigError

CHUNK = 1000                   # items per dataset instance (a new seed range per chunk)
SEED_STRIDE = 2 ** 20          # items a (seed, split) stream can draw before it runs into the next seed's range
MAX_MISSES = 20_000            # consecutive draws outside the split (or repeats) before a stream gives up


def reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("rg:NAME sources need reasoning-gym: pip install 'lmforge[tasks]' "
                          "(or pip install reasoning-gym)", field="source") from None
    return reasoning_gym


def dataset_names() -> list[str]:
    return sorted(reasoning_gym().factory.DATASETS)


def _yaml_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class ReasoningGymFamily(TaskFamily):
    def __init__(self, dataset: str, config: dict | None = None, source: str | None = None):
        rg = reasoning_gym()
        source = source or f"rg:{dataset}"
        names = dataset_names()
        if dataset not in names:
            close = difflib.get_close_matches(dataset, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"{source!r}: unknown reasoning-gym dataset {dataset!r} ({hint}{len(names)} datasets: "
                              f"{', '.join(names[:6])}, ...: sorted(reasoning_gym.factory.DATASETS) lists them)",
                              field="source")
        self.dataset, self.config = dataset, dict(config or {})
        self._rg = rg
        self._check = self._make(0, 1)               # a bad config fails now, not while drawing
        opts = ",".join(f"{k}={v}" for k, v in self.config.items())
        self.name = f"rg:{dataset}" + (f":{opts}" if opts else "")
        self.description = f"reasoning-gym {dataset}, scored by its score_answer"

    @classmethod
    def from_options(cls, text: str, source: str) -> "ReasoningGymFamily":
        import dataclasses

        name, _, opts = text.partition(":")
        if not name:
            raise ConfigError(f"{source!r}: name a reasoning-gym dataset, e.g. rg:basic_arithmetic", field="source")
        entry = reasoning_gym().factory.DATASETS.get(name)
        if entry is None or not opts:
            return cls(name, source=source)              # (an unknown name is refused there)
        allowed = {f.name: "..." for f in dataclasses.fields(entry[1]) if f.name not in ("seed", "size")}
        config = {k: _yaml_value(v) for k, v in parse_options(opts, source, allowed).items()}
        return cls(name, config, source=source)

    def _make(self, seed: int, size: int):
        try:
            return self._rg.create_dataset(self.dataset, seed=seed, size=size, **self.config)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"rg:{self.dataset}: bad dataset options {self.config}: {e}", field="source") from None

    def iter_problems(self, split: str, seed: int) -> Iterator[Problem]:
        check_split(split)
        # train in [0, 2**31), eval in [2**31, 2**32): seed values many datasets hand to numpy (< 2**32)
        base = (seed * SEED_STRIDE) % 2 ** 31 + (2 ** 31 if split == "eval" else 0)
        seen, misses, chunk = set(), 0, 0
        while misses < MAX_MISSES:
            ds = self._make((base + chunk * CHUNK) % 2 ** 32, CHUNK)
            for i in range(CHUNK):
                entry = ds[i]
                q = str(entry["question"])
                if split_of(q) != split or (split == "eval" and q in seen):
                    misses += 1
                    if misses >= MAX_MISSES:
                        return
                    continue
                misses = 0
                if split == "eval":
                    seen.add(q)
                yield Problem([{"role": "user", "content": q}], str(entry["answer"]), q,
                              {"entry": entry, "dataset": ds})
            chunk += 1

    def score(self, problem: Problem, response: str) -> float:
        from reasoning_gym.utils import extract_answer

        response = response or ""
        answer = extract_answer(response) if "<answer>" in response else response.strip()
        try:
            s = float(problem.meta["dataset"].score_answer(answer, problem.meta["entry"]))
        except Exception:      # a scorer that chokes on a malformed answer: the answer is wrong
            return 0.0
        return min(max(s, 0.0), 1.0)

    def demonstration(self, problem: Problem, tools: bool = False) -> list[dict]:
        return [dict(m) for m in problem.messages] + [{"role": "assistant", "content": problem.answer}]
