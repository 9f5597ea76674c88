"""Byte-level BPE trainer (the algorithm of HF `tokenizers` and rustbpe, in plain Python).

Training has two phases:

1. Ingestion. Every document is cut into chunks ("pre-tokens") by a split regex (GPT-4 style by default), and
   we count how often each distinct chunk occurs. Chunks never cross documents. The corpus is read once, as a
   stream, so memory is O(distinct chunks), not O(corpus); large inputs are shared with forked helpers.
2. Merging. Each distinct chunk becomes a "word": a sequence of token ids, initially its UTF-8 bytes (0..255),
   weighted by its count. We keep, for every adjacent pair of ids, its total count and the words holding it,
   plus a max-heap of pairs. Each step pops the most frequent pair, gives it the next id (256, 257, ...),
   rewrites only the words that contain it, and updates the counts of the pairs next to each occurrence.
   Counts only ever go down (new pairs contain the new id), so stale heap entries are fixed lazily when popped.

The result is the ordered list of merges; merge i makes token 256 + i from (left_id, right_id).

Tie-breaking matches rustbpe exactly: the most frequent pair wins, and among equal counts the smallest
(left_id, right_id). Pairs are counted over all positions of a word, overlaps included ("aaa" holds (a, a)
twice), while a merge rewrites non-overlapping occurrences left to right ("aaa" -> [aa, a]); the counts are
then updated so they stay exact. rustbpe has no minimum frequency: it merges pairs seen once and stops only
when no pair is left. Here training stops early, with fewer merges, as soon as the best pair occurs fewer
than `min_frequency` times; `min_frequency <= 1` reproduces rustbpe.

Speed trick: a word is stored as a `str` holding one character per token id (chr(id); Python strings take
any code point, lone surrogates included, so every id up to 0x10FFFF fits), so finding and
rewriting a pair is `str.find` / `str.replace` in C, a pair key is a 2-character string (hashable, and its
ordering is exactly the (left, right) ordering rustbpe breaks ties with), and only the few pairs around each
occurrence are touched in Python.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import multiprocessing
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

import regex
from tqdm import tqdm

from lmforge.errors import ConfigError, DataError

# GPT-4 (cl100k) split: contractions, words with one leading non-letter, numbers of 1-3 digits, punctuation
# runs, newlines, whitespace. rustbpe's default, character for character.
GPT4_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                r"|\s*[\r\n]|\s+(?!\S)|\s+")
# GPT-2 split (openai/gpt-2 encoder.py): contractions, ' '-prefixed letters / digits / punctuation, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's split with every digit its own chunk (as LLaMA and DeepSeek tokenize numbers): "385" is three tokens, so
# column arithmetic is a rule over ten digit tokens instead of a table over a thousand number tokens
GPT4_DIGITS_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN, "gpt4-digits": GPT4_DIGITS_PATTERN}

_BATCH_CHARS = 1 << 18     # characters per ingestion batch (the unit of work shared between processes)
_MAX_ID = sys.maxunicode   # ids are stored as characters, so chr(id) must exist


def resolve_pattern(name_or_regex: str) -> str:
    """'gpt4' | 'gpt2' | a regex of your own -> the regex string. A regex that does not compile is a ConfigError."""
    if not isinstance(name_or_regex, str) or not name_or_regex:
        raise ConfigError(f"expected 'gpt4', 'gpt4-digits', 'gpt2' or a regex, got {name_or_regex!r}", field="pattern")
    pattern = PATTERNS.get(name_or_regex.lower(), name_or_regex)
    try:
        regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ConfigError(f"invalid split regex {pattern!r}: {e}", field="pattern") from None
    return pattern


# ---------------------------------------------------------------------------------------------------------
# Phase 1: count distinct chunks


def _count_batch(pattern: str, docs: Sequence[str]) -> tuple[collections.Counter, int]:
    """Chunk counts and UTF-8 byte count of a batch of documents (runs in a worker process or inline)."""
    findall = regex.compile(pattern).findall  # regex caches compiled patterns, so this is cheap per batch
    counts = collections.Counter(itertools.chain.from_iterable(map(findall, docs)))
    return counts, _utf8_len(docs)


def _utf8_len(docs: Sequence[str]) -> int:
    try:
        return sum(map(len, map(str.encode, docs)))
    except UnicodeEncodeError:  # lone surrogates: count them as the bytes we train on
        return sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)


def _batches(docs: Iterable[str]):
    """Cut the document stream into lists of about _BATCH_CHARS characters, checking that each is a str.

    This runs in the main process while the workers split, so it takes documents 64 at a time and leaves
    the per-document work (type check, length) to C.
    """
    it = iter(docs)
    batch, size, seen = [], 0, 0
    while group := list(itertools.islice(it, 64)):
        if not set(map(type, group)) <= {str}:
            for i, doc in enumerate(group):
                if not isinstance(doc, str):
                    raise DataError(f"document {seen + i} is a {type(doc).__name__}, expected str")
        seen += len(group)
        batch += group
        size += sum(map(len, group))
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def count_chunks(docs: Iterable[str], pattern: str = GPT4_PATTERN, progress: bool = True,
                 workers: int | None = None) -> collections.Counter:
    """Split every document with `pattern` and count each distinct chunk, in one pass over the stream.

    Batches are shared by `workers` processes (this one and workers - 1 forked helpers; default: the usable
    CPUs, at most 8) when there is more than one batch of input and the platform forks (Linux); small inputs,
    and other platforms, are counted in this process alone. At most two batches per helper are in flight, so
    an endless stream does not pile up in memory.
    """
    pattern = resolve_pattern(pattern)
    workers = _default_workers() if workers is None else max(1, int(workers))
    total: collections.Counter = collections.Counter()
    bar = tqdm(desc="bpe: split + count chunks", unit="B", unit_scale=True, disable=not progress)

    def add(result):
        counts, nbytes = result
        total.update(counts)
        bar.update(nbytes)

    # Spawning (the non-Linux default) would re-run the caller's script if it lacks a __main__ guard, and a
    # daemon process (e.g. a Pool worker) may not have children: count in this process then.
    can_fork = (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
                and not multiprocessing.current_process().daemon)
    try:
        batches = _batches(docs)
        head = list(itertools.islice(batches, 2))
        if len(head) < 2 or workers == 1 or not can_fork:
            for batch in itertools.chain(head, batches):
                add(_count_batch(pattern, batch))
            return total
        # This process is one of the `workers`: it hands batches to the others while they have room and
        # splits the batch itself when they are all busy. On an idle machine every core works; on a loaded
        # one this process does most batches itself instead of waiting on starved children.
        helpers = workers - 1
        with multiprocessing.get_context("fork").Pool(helpers) as pool:
            pending = collections.deque()
            for batch in itertools.chain(head, batches):
                while pending and pending[0].ready():
                    add(pending.popleft().get())
                if len(pending) < 2 * helpers:  # at most two batches queued per helper: bounded memory
                    pending.append(pool.apply_async(_count_batch, (pattern, batch)))
                else:
                    add(_count_batch(pattern, batch))
            while pending:
                add(pending.popleft().get())
        return total
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------
# Phase 2: merge


def train_bpe(docs: Iterable[str], num_merges: int, pattern: str = GPT4_PATTERN, min_frequency: int = 2,
              progress: bool = True, *, workers: int | None = None) -> list[tuple[int, int]]:
    """Learn up to `num_merges` byte-level BPE merges from a stream of documents.

    Returns the merges in order: merge i makes token id 256 + i from (left_id, right_id); ids 0..255 are
    the raw bytes. `pattern` is a regex string or 'gpt4' / 'gpt2'; it is applied to each document on its own.
    Training stops early (fewer merges) when the most frequent pair occurs fewer than `min_frequency` times,
    or when no pair is left. With `min_frequency <= 1` the merges equal rustbpe's for the same regex.
    """
    num_merges, min_frequency = _check_counts(num_merges, min_frequency)
    chunk_counts = count_chunks(docs, pattern, progress=progress, workers=workers)
    return train_bpe_from_counts(chunk_counts, num_merges, min_frequency=min_frequency, progress=progress)


def _check_counts(num_merges, min_frequency) -> tuple[int, int]:
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
        raise ConfigError(f"number of merges must be an integer >= 0, got {num_merges!r}", field="vocab_size")
    if 256 + num_merges > _MAX_ID + 1:
        raise ConfigError(f"vocabulary of {256 + num_merges} is too large (at most {_MAX_ID + 1})",
                          field="vocab_size")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ConfigError(f"min_frequency must be an integer >= 0, got {min_frequency!r}", field="min_frequency")
    return num_merges, min_frequency


def train_bpe_from_counts(chunk_counts: Mapping[str, int], num_merges: int, min_frequency: int = 2,
                          progress: bool = True) -> list[tuple[int, int]]:
    """The merge phase of `train_bpe`, given distinct chunks and how often each occurs."""
    num_merges, min_frequency = _check_counts(num_merges, min_frequency)

    # Words: one str per distinct chunk, one character per token id (bytes -> latin-1 chars 0..255).
    # A one-byte chunk holds no pair and can never change, so it is dropped.
    words: list[str] = []
    counts: list[int] = []
    for chunk, n in chunk_counts.items():
        word = chunk.encode("utf-8", "surrogatepass").decode("latin-1")
        if n > 0 and len(word) >= 2:
            words.append(word)
            counts.append(n)

    # pair_counts: pair -> weighted count over all positions; where: pair -> indices of words that held it
    # when it appeared (a word may have lost it since: such "stale" words are skipped when merging).
    pair_counts: dict[str, int] = {}
    where: dict[str, list[int]] = {}
    for idx, w in enumerate(tqdm(words, desc="bpe: count pairs", unit="word", disable=not progress)):
        n = counts[idx]
        for i in range(len(w) - 1):
            pair = w[i:i + 2]
            if pair in pair_counts:
                pair_counts[pair] += n
                holders = where[pair]
                if holders[-1] != idx:  # a word's own repeats arrive together
                    holders.append(idx)
            else:
                pair_counts[pair] = n
                where[pair] = [idx]

    # Max-heap by count, then ascending pair (rustbpe's order): heapq is a min-heap on (-count, pair).
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    heappop, heappush = heapq.heappop, heapq.heappush  # local names: this loop runs once per heap entry

    merges: list[str] = []
    bar = tqdm(total=num_merges, desc="bpe: merge", unit="merge", disable=not progress)
    while len(merges) < num_merges and heap:
        negcount, pair = heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:          # the pair is gone
            continue
        if count != -negcount:  # stale entry: counts only drop, so requeue with the true count
            heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break  # it is the most frequent pair left, so nothing else qualifies either
        z = chr(256 + len(merges))
        merges.append(pair)
        _merge_pair(pair, z, words, counts, pair_counts, where, heap)
        bar.update()
    bar.close()
    return [(ord(a), ord(b)) for a, b in merges]


def _merge_pair(pair: str, z: str, words: list[str], counts: list[int], pair_counts: dict[str, int],
                where: dict[str, list[int]], heap: list) -> None:
    """Replace `pair` by token `z` in every word holding it, keeping pair counts exact and the heap fed.

    Around each occurrence (at p in the rewritten word) the pairs (left, a) and (b, right) disappear and
    (left, z), (z, right) appear. Two occurrences side by side ("abab" -> "zz") share one boundary: the old
    pair (b, a) goes once and the new pair (z, z) comes once, so the right side is skipped when it is `z`.
    """
    a, b = pair
    born: dict[str, list[int]] = {}  # pairs born in this step (all contain z) -> [count, word indices...]
    for idx in where.pop(pair):
        w = words[idx]
        w2 = w.replace(pair, z)  # non-overlapping, left to right: the same rewrite as rustbpe
        if len(w2) == len(w):    # stale: an earlier merge took this word's occurrences
            continue
        words[idx] = w2
        n = counts[idx]
        last = len(w2) - 1
        p = w2.find(z)
        while p >= 0:
            if p > 0:
                left = w2[p - 1]
                pair_counts[(b if left == z else left) + a] -= n
                entry = born.get(left + z)
                if entry is None:
                    born[left + z] = [n, idx]
                else:
                    entry[0] += n
                    if entry[-1] != idx:
                        entry.append(idx)
            if p < last:
                right = w2[p + 1]
                if right != z:
                    pair_counts[b + right] -= n
                    entry = born.get(z + right)
                    if entry is None:
                        born[z + right] = [n, idx]
                    else:
                        entry[0] += n
                        if entry[-1] != idx:
                            entry.append(idx)
            p = w2.find(z, p + 1)
    # every holder was rewritten, so the pair's count is now exactly zero
    del pair_counts[pair]
    for new_pair, entry in born.items():
        pair_counts[new_pair] = entry[0]
        where[new_pair] = entry[1:]
        heapq.heappush(heap, (-entry[0], new_pair))


# ---------------------------------------------------------------------------------------------------------


def merges_to_ranks(merges: Sequence[tuple[int, int]]) -> dict[bytes, int]:
    """Token bytes -> id for bytes 0..255 and every merge (what `tiktoken.Encoding(mergeable_ranks=...)` takes).

    If two merges ever spell the same bytes (possible in BPE, very rare), the first (lower) id keeps them.
    """
    vocab = [bytes([i]) for i in range(256)]
    for i, (left, right) in enumerate(merges):
        new_id = 256 + i
        if not (0 <= left < new_id and 0 <= right < new_id):
            raise ValueError(f"merge {i} ({left}, {right}) refers to an id not yet defined (< {new_id})")
        vocab.append(vocab[left] + vocab[right])
    ranks: dict[bytes, int] = {}
    for i, token in enumerate(vocab):
        ranks.setdefault(token, i)
    return ranks
