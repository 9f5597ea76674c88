"""BPE trainer: golden values, an independent naive trainer, and exact parity with rustbpe."""
from __future__ import annotations

import itertools
import os
import random

import pytest
import regex
import rustbpe
import tiktoken

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import bpe
from lmforge.tokenizer.bpe import (GPT2_PATTERN, GPT4_DIGITS_PATTERN, GPT4_PATTERN, count_chunks, merges_to_ranks, resolve_pattern,
                                   train_bpe, train_bpe_from_counts)

WHOLE = r"(?s).+"  # keeps each document as one chunk: plain byte-level BPE, as minbpe's BasicTokenizer


def multiscript_corpus(seed: int = 0, n_docs: int = 300) -> list[str]:
    """A deterministic mix of scripts and shapes that stress the split regexes and tie-breaking."""
    rng = random.Random(seed)
    english = ("the quick brown fox jumps over lazy dog and then it's over we'll see they've I'M DON'T "
               "You're hello world tokenizer merges bytes pairs").split()
    chinese = list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可")
    cyrillic = "привет мир как дела хорошо спасибо Москва слово ещё объём".split()
    emoji = ["😀", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🎉🎉", "🙂"]
    code = ["def f(x):\n    return x + 1\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
            "if x == 0 and y != 1:\n        pass\n", "s = {'key': [1, 2, 3]}  # comment\n", "x>>=2;y<<=3;\r\n"]
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "    \n", "\t\t\n"]
    numbers = ["1", "42", "2024", "3.14159", "1,000,000", "007", "12345678"]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(5, 60)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(english) + rng.choice([" ", " ", ", ", ". ", "  "]))
            elif kind < 0.5:
                parts.append("".join(rng.choice(chinese) for _ in range(rng.randint(1, 8))))
            elif kind < 0.6:
                parts.append(rng.choice(cyrillic) + " ")
            elif kind < 0.67:
                parts.append(rng.choice(emoji))
            elif kind < 0.77:
                parts.append(rng.choice(code))
            elif kind < 0.9:
                parts.append(rng.choice(spaces))
            else:
                parts.append(rng.choice(numbers) + rng.choice(["", " ", "%"]))
        docs.append("".join(parts))
    docs += ["aaaaaaa", "aaa bbb aaa", "abababab", "  \n\n  \t "]  # overlapping pairs and pure whitespace
    import pydoc_data.topics
    topics = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    docs += [topics[i:i + 4000] for i in range(0, 40_000, 4000)]  # ~40 KB of real English + code
    return docs


def rustbpe_ranks(docs, vocab_size, pattern):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    return {bytes(b): i for b, i in tok.get_mergeable_ranks()}


def naive_bpe(docs, num_merges, pattern, min_frequency):
    """The textbook loop: recount every pair each step (overlaps included), take the most frequent,
    ties to the smallest (left, right), merge non-overlapping occurrences left to right."""
    import regex
    words = {}
    for doc in docs:
        for chunk in regex.findall(pattern, doc):
            key = tuple(chunk.encode("utf-8"))
            words[key] = words.get(key, 0) + 1
    merges = []
    for step in range(num_merges):
        stats = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] = stats.get(pair, 0) + n
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        if stats[pair] < min_frequency:
            break
        new_id = 256 + step
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
        merges.append(pair)
    return merges


def reference_encode(text_bytes: bytes, merges) -> list[int]:
    """minbpe's encode: repeatedly merge the adjacent pair that was learned first."""
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    ids = list(text_bytes)
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
        if pair not in rank:
            break
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(rank[pair])
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


# --------------------------------------------------------------------------------------------------------


def test_minbpe_golden():
    text = "aaabdaaabac"
    merges = train_bpe([text], 3, pattern=WHOLE, min_frequency=1, progress=False)
    # (a,a)=4 with overlaps; then (a,b) and (256,a) tie at 2 and the smaller pair wins; then (256,257)
    assert merges == [(97, 97), (97, 98), (256, 257)]
    assert reference_encode(text.encode(), merges) == [258, 100, 258, 97, 99]
    enc = tiktoken.Encoding("golden", pat_str=WHOLE, mergeable_ranks=merges_to_ranks(merges), special_tokens={})
    assert enc.encode_ordinary(text) == [258, 100, 258, 97, 99]
    assert enc.decode([258, 100, 258, 97, 99]) == text
    assert rustbpe_ranks([text], 259, WHOLE) == merges_to_ranks(merges)


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN, GPT4_DIGITS_PATTERN],
                         ids=["gpt4", "gpt2", "gpt4-digits"])
def test_merges_equal_rustbpe(pattern):
    docs = multiscript_corpus()
    counts = count_chunks(docs, pattern, progress=False)
    for vocab_size in (257, 300, 1000, 2500):
        merges = train_bpe_from_counts(counts, vocab_size - 256, min_frequency=1, progress=False)
        assert len(merges) == vocab_size - 256
        assert merges_to_ranks(merges) == rustbpe_ranks(docs, vocab_size, pattern), vocab_size


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN], ids=["gpt4", "gpt2"])
def test_runs_out_of_pairs_like_rustbpe(pattern):
    # rustbpe merges pairs seen once and stops only when every chunk is a single token. Exhausting all pairs
    # also shows that Python's `regex` cuts chunks exactly where rustbpe's fancy-regex does, odd spaces included.
    docs = ["hello world, hello there", "ünïcödé 你好 🙂🙂"]
    for c in "\x0b\x0c\x1c\x1f\x85\u00a0\u1680\u2007\u200b\u2028\u2029\u202f\u3000\ufeff":
        docs += [f"a{c}{c}b {c} x{c}\n{c}y  {c}{c}z 1{c}2 !{c}?", f"{c}{c}{c}word{c}", f"'s{c}'LL{c}"]
    merges = train_bpe(docs, 10_000, pattern=pattern, min_frequency=0, progress=False)
    ranks = rustbpe_ranks(docs, 256 + 10_000, pattern)
    assert len(merges) < 10_000 and merges_to_ranks(merges) == ranks
    # every chunk is now one token
    enc = tiktoken.Encoding("t", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    assert all(len(enc.encode_ordinary(c)) == 1 for d in docs for c in __import__("regex").findall(pattern, d))


@pytest.mark.parametrize("min_frequency", [0, 2, 3, 7])
def test_matches_naive_trainer(min_frequency):
    docs = multiscript_corpus(seed=1, n_docs=10)[:10] + ["aaaa aaaa", "abcabcabc"]
    pattern = GPT2_PATTERN
    ours = train_bpe(docs, 5000, pattern=pattern, min_frequency=min_frequency, progress=False)
    assert ours == naive_bpe(docs, 5000, pattern, min_frequency)
    assert 50 < len(ours) < 5000  # ran out of pairs (0) or hit the threshold (> 1), not the budget


def test_min_frequency_stops_at_threshold():
    docs = ["ab ab ab cd cd ef"]
    # chunks: "ab" " ab" " ab" " cd" " cd" " ef"; (a,b) occurs 3 times, then everything else twice or once
    assert train_bpe(docs, 10, pattern=GPT2_PATTERN, min_frequency=3, progress=False) == [(97, 98)]
    merges = train_bpe(docs, 10, pattern=GPT2_PATTERN, min_frequency=2, progress=False)
    assert merges == [(97, 98), (32, 99), (32, 256), (257, 100)]  # ties at 2 go to the smaller pair
    assert len(train_bpe(docs, 10, pattern=GPT2_PATTERN, min_frequency=1, progress=False)) == 6


def test_chunks_never_cross_documents():
    merges = train_bpe(["ab", "cd"] * 5, 10, pattern=WHOLE, min_frequency=1, progress=False)
    assert sorted(merges) == [(97, 98), (99, 100)]
    joined = train_bpe(["abcd"] * 5, 10, pattern=WHOLE, min_frequency=1, progress=False)
    assert len(joined) == 3


_SPY_DIR = None


def _spy_count_batch(pattern, batch):
    """Stands in for bpe._count_batch and leaves a file named after the process that ran it."""
    open(os.path.join(_SPY_DIR, str(os.getpid())), "a").close()
    return _real_count_batch(pattern, batch)


_real_count_batch = bpe._count_batch


def test_stream_and_process_pool_agree(monkeypatch, tmp_path):
    global _SPY_DIR
    docs = multiscript_corpus(seed=2, n_docs=120)
    inline = count_chunks(docs, GPT4_PATTERN, progress=False, workers=1)
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 2_000)  # many batches, so the helper process is used
    monkeypatch.setattr(bpe, "_count_batch", _spy_count_batch)
    _SPY_DIR = str(tmp_path)
    pooled = count_chunks((d for d in docs), GPT4_PATTERN, progress=False, workers=2)
    assert pooled == inline
    pids = {int(name) for name in os.listdir(tmp_path)}
    assert pids - {os.getpid()}, "no batch went to a forked helper"
    assert sum(inline.values()) == sum(len(__import__("regex").findall(GPT4_PATTERN, d)) for d in docs)
    from_stream = train_bpe(iter(docs), 500, min_frequency=1, progress=False, workers=2)
    assert from_stream == train_bpe_from_counts(inline, 500, min_frequency=1, progress=False)


def test_batching_is_lazy():
    endless = itertools.repeat("twenty characters...")
    batch = next(bpe._batches(endless))  # returns: the stream is cut as it goes, never read to the end
    assert bpe._BATCH_CHARS <= sum(map(len, batch)) < bpe._BATCH_CHARS + 64 * 20


def test_resolve_pattern():
    assert resolve_pattern("gpt4") == GPT4_PATTERN
    assert resolve_pattern("GPT2") == GPT2_PATTERN
    assert resolve_pattern(r"\w+|\W") == r"\w+|\W"
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["x"]), 256)
    assert tok.get_pattern() == GPT4_PATTERN  # the same default as rustbpe
    with pytest.raises(ConfigError) as e:
        resolve_pattern("([a-z]")
    assert e.value.field == "pattern" and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        train_bpe(["x"], 5, pattern="(", progress=False)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        train_bpe(["abc"], -1, progress=False)
    with pytest.raises(ConfigError):
        train_bpe(["abc"], 5, min_frequency=-2, progress=False)
    with pytest.raises(DataError, match="document 1"):
        train_bpe(["abc", b"bytes"], 5, progress=False)


def test_merges_to_ranks():
    ranks = merges_to_ranks([(104, 105), (256, 33)])
    assert ranks[b"hi"] == 256 and ranks[b"hi!"] == 257 and ranks[b"\x00"] == 0 and len(ranks) == 258
    with pytest.raises(ValueError):
        merges_to_ranks([(104, 300)])


def test_empty_input():
    assert train_bpe([], 10, progress=False) == []
    assert train_bpe(["", "x"], 10, progress=False) == []


def test_progress_bars_go_to_stderr(capsys):
    train_bpe(["ab ab ab cd"], 3, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "bpe: split + count chunks" in err and "B/s" in err  # ingestion rate
    assert "bpe: merge" in err and "merge/s" in err              # merge rate


def test_digits_pattern_splits_every_digit():
    assert resolve_pattern("gpt4-digits") == GPT4_DIGITS_PATTERN
    assert regex.findall(GPT4_DIGITS_PATTERN, "add 385+12, year 2024!") == \
        ["add", " ", "3", "8", "5", "+", "1", "2", ",", " year", " ", "2", "0", "2", "4", "!"]
    # everything but numbers is cut as GPT-4 cuts it
    text = "Hello, world's  end\n\n  x = f(y)"
    assert regex.findall(GPT4_DIGITS_PATTERN, text) == regex.findall(GPT4_PATTERN, text)
