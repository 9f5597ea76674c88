"""`lmforge markov train | eval | sample`: the n-gram baseline's verbs, their arguments and what they run.

    lmforge markov eval --data runs/data --orders 1,2,3,4,5
    lmforge markov train --data runs/data --order 3 --out runs/markov3.npz
    lmforge markov sample --model runs/markov3.npz --tokenizer runs/tok --prompt "In the beginning"
"""
from __future__ import annotations

import time

from lmforge.errors import CheckpointError, ConfigError
from lmforge.verbs import Verb, clean_text, nonneg_int, positive_int


def _table_options(p) -> None:
    """The options of the verbs that count n-grams from token shards (train, eval)."""
    p.add_argument("--data", required=True, metavar="DIR", help="token shards (lmforge data prepare)")
    p.add_argument("--smoothing", default="kn", choices=["kn", "addk"],
                   help="interpolated modified Kneser-Ney (default) or add-k")
    p.add_argument("--k", type=float, default=0.1, help="add-k pseudo-count (default 0.1)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="count only the first N train tokens")


# ---- train ----------------------------------------------------------------------------------------------
def train_arguments(p) -> None:
    _table_options(p)
    p.add_argument("--order", type=positive_int, required=True, help="n: predict from the previous n-1 tokens")
    p.add_argument("--out", required=True, metavar="FILE.npz")


def cmd_train(args) -> int:
    from lmforge.baselines.markov import MarkovModel, format_big, load_data

    train, _, vocab_size, bos_id, _ = load_data(args.data)
    if args.max_tokens is not None:
        train = train[:args.max_tokens]
    t0 = time.perf_counter()
    model = MarkovModel.fit(train, args.order, vocab_size, bos_id, args.smoothing, args.k, progress=True)
    seconds = time.perf_counter() - t0
    model.save(args.out)
    st = model.table_stats()
    print(f"order {st['order']} {st['smoothing']} model on {st['train_tokens']:,} tokens in {seconds:.1f}s: "
          f"{st['contexts']:,} contexts (of {format_big(st['possible_contexts'])} possible), "
          f"{st['ngrams']:,} n-grams, {st['bytes'] / 2 ** 20:.2f} MB -> {args.out}")
    return 0


# ---- eval -----------------------------------------------------------------------------------------------
def eval_arguments(p) -> None:
    _table_options(p)
    p.add_argument("--orders", default="1,2,3,4,5", help="comma-separated orders (default 1,2,3,4,5)")


def cmd_eval(args) -> int:
    from lmforge.baselines.markov import format_sweep, markov_sweep

    rows = markov_sweep(args.data, _parse_orders(args.orders), args.smoothing, args.k,
                        max_train_tokens=args.max_tokens, progress=True)
    print(format_sweep(rows))
    return 0


def _parse_orders(text: str) -> list[int]:
    try:
        orders = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--orders must be a comma-separated list of integers, got {text!r}",
                          field="orders") from None
    if not orders or min(orders) < 1:
        raise ConfigError(f"--orders must list orders >= 1, got {text!r}", field="orders")
    return orders


# ---- sample ---------------------------------------------------------------------------------------------
def sample_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="FILE.npz")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--tokens", type=nonneg_int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")


def cmd_sample(args) -> int:
    from lmforge.baselines.markov import MarkovModel
    from lmforge.tokenizer.tokenizer import Tokenizer

    prompt_text = clean_text(args.prompt, "--prompt")
    model = MarkovModel.load(args.model)
    tok = Tokenizer.load(args.tokenizer)
    tok_vocab = getattr(tok, "vocab_size", None)
    if tok_vocab is not None and int(tok_vocab) != model.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tok_vocab} differs from the model's {model.vocab_size}",
                              file=str(args.tokenizer))
    prompt = tok.encode(prompt_text) if prompt_text else []
    ids = model.sample([model.bos_id, *prompt], args.tokens, seed=args.seed, temperature=args.temperature)
    print(prompt_text + tok.decode(ids))
    return 0


# the baseline is scored in bits per byte, like the Transformer
VERBS = [
    Verb(("markov", "train"), "count n-grams of the train split into a table", train_arguments, cmd_train),
    Verb(("markov", "eval"), "table size and val bits/byte for each order (the table explodes with n)",
         eval_arguments, cmd_eval),
    Verb(("markov", "sample"), "generate text from a trained table", sample_arguments, cmd_sample),
]
