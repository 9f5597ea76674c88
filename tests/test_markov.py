"""Markov n-gram baseline: normalisation, hand-computed probabilities, BOS conventions, a plain-Python
Kneser-Ney reference, known-chain entropy, sampling, save/load and the CLI verbs."""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from lmforge.baselines.markov import MarkovModel, markov_sweep
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError, DataError

BOS = 0


# ------------------------------------------------------------------------------------------ helpers

def chain_stream(order, vocab, n_tokens, seed, concentration=10.0, p_end=0.01):
    """Tokens from a known order-`order` Markov chain with BOS = 0 as its end/start-of-document token.

    The next token depends on the previous order-1 tokens (BOS-padded after a document start), exactly the
    model's context convention. Like language, it is hierarchical: a Zipf unigram, and each longer context's
    distribution is drawn around its back-off context's (Dirichlet with mean = the parent distribution).
    Returns (tokens, table) with table[ctx oldest-first + (next,)] = the true probability."""
    rng = np.random.default_rng(seed)
    table = 1.0 / np.arange(1, vocab) ** 1.1
    table /= table.sum()
    for _ in range(order - 1):  # prepend one older context token per level
        flat = table.reshape(-1, vocab - 1)
        table = np.stack([np.stack([rng.dirichlet(concentration * p + 1e-3) for p in flat]).reshape(table.shape)
                          for _ in range(vocab)])
    table = np.concatenate([np.full(table.shape[:-1] + (1,), p_end), table * (1 - p_end)], axis=-1)
    cdf = np.cumsum(table, axis=-1)
    out = [BOS]
    ctx = (BOS,) * (order - 1)
    u = rng.random(n_tokens)
    while len(out) < n_tokens:
        w = min(int(np.searchsorted(cdf[ctx], u[len(out)] * cdf[ctx][-1], side="right")), vocab - 1)
        out.append(w)
        ctx = (BOS,) * (order - 1) if w == BOS else (ctx + (w,))[1:]
    return np.array(out, dtype=np.int64), table


def true_nll(tokens, table, order):
    """NLL (nats) of every non-BOS target under the generating chain."""
    total, ctx = 0.0, (BOS,) * (order - 1)
    for w in tokens[1:]:
        if w != BOS:
            total -= math.log(table[ctx + (int(w),)])
        ctx = (BOS,) * (order - 1) if w == BOS else (ctx + (int(w),))[1:]
    return total


def bpb_1byte(model, tokens):
    """Synthetic streams: every non-BOS token stands for one byte."""
    return model.bits_per_byte(tokens, int(np.count_nonzero(tokens != BOS)), BOS)


# -------------------------------------------------------------------- plain-Python Kneser-Ney reference

def ref_contexts(seq, n):
    """(context tuple oldest-first, target) for every target, written out the slow, obvious way."""
    out = []
    for t in range(len(seq)):
        if t == 0 and seq[0] == BOS:
            continue
        start = max([i for i in range(t) if seq[i] == BOS], default=0)  # last BOS before t
        ctx = tuple(seq[t - j] if t - j >= start else BOS for j in range(n - 1, 0, -1))
        out.append((ctx, seq[t]))
    return out


def ref_discounts(counts):
    """Chen & Goodman's D1, D2, D3+; where counts-of-counts have holes, the documented 0.5/1/1.5 fallback."""
    n1, n2, n3, n4 = (sum(1 for c in counts.values() if c == r) for r in (1, 2, 3, 4))
    if n1 == 0 or n2 == 0:
        return [0.5, 1.0, 1.5]
    y = n1 / (n1 + 2 * n2)
    d = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3 if n3 else -1]
    return [min(max(di if di > 0 else default, 1e-3), j)
            for di, default, j in zip(d, [0.5, 1.0, 1.5], [1, 2, 3])]


class RefKN:
    """Interpolated modified Kneser-Ney with dicts (Chen & Goodman 1998), BOS-started n-grams keep raw counts."""

    def __init__(self, seq, n, vocab):
        self.n, self.V = n, vocab
        counts = [None] * n  # counts[k][(ctx of length k, w)]
        counts[n - 1] = Counter(ref_contexts(list(seq), n))
        raw = counts[n - 1]
        for k in range(n - 2, -1, -1):
            cont, raw_k = Counter(), Counter()
            for (ctx, w), c in raw.items():
                cont[(ctx[1:], w)] += 1
                raw_k[(ctx[1:], w)] += c
            counts[k] = Counter({g: (raw_k[g] if g[0] and g[0][0] == BOS else cont[g]) for g in cont})
            raw = raw_k
        self.counts = counts
        self.D = [ref_discounts(c) for c in counts]
        self.total = [defaultdict(float) for _ in range(n)]
        self.dsum = [defaultdict(float) for _ in range(n)]
        for k in range(n):
            for (ctx, w), c in counts[k].items():
                self.total[k][ctx] += c
                self.dsum[k][ctx] += self.D[k][min(c, 3) - 1]

    def prob(self, ctx, w):
        p = 1.0 / self.V
        for k in range(self.n):
            h = ctx[len(ctx) - k:] if k else ()
            if h not in self.total[k]:
                break
            c = self.counts[k].get((h, w), 0)
            d = self.D[k][min(c, 3) - 1] if c else 0.0
            p = (c - d + self.dsum[k][h] * p) / self.total[k][h]
        return p


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("smoothing", ["kn", "addk"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one(order, smoothing):
    x, _ = chain_stream(3, 12, 3000, seed=1)
    m = MarkovModel.fit(x, order, 12, BOS, smoothing, k=0.3)
    held, _ = chain_stream(3, 12, 300, seed=2)
    # seen contexts, an unseen one, a document start, the empty context
    for ctx in [list(x[:50]), list(x[:7]), [5, 5, 5, 5, 5], [3, BOS], [], list(held[:40])]:
        p = m.distribution(ctx)
        assert p.shape == (12,) and np.all(p > 0)
        np.testing.assert_allclose(p.sum(), 1.0, atol=1e-6)
    # the vectorised NLL is the same distribution, read at the target
    nll = m.nll(held)
    for t in range(0, len(held), 23):
        assert nll[t] == pytest.approx(-math.log(m.distribution(list(held[:t]))[held[t]]), rel=1e-12)


def test_addk_bigram_by_hand():
    # V = 4 (0 = BOS). Train bigram pairs (prev -> next): 0->1 1->2 2->1 1->2 2->3 3->0 0->2 2->1
    #   counts: ctx0 {1:1, 2:1} (2)   ctx1 {2:2} (2)   ctx2 {1:2, 3:1} (3)   ctx3 {0:1} (1)
    train = [0, 1, 2, 1, 2, 3, 0, 2, 1]
    m = MarkovModel.fit(np.array(train, dtype=np.uint16), 2, 4, BOS, "addk", k=0.5)
    val = np.array([0, 2, 1, 3, 0, 3, 2])
    expect = [0.5 / 4,          # BOS from the stream-start context [BOS]: (0+.5)/(2+2)
              1.5 / 4,          # 0->2: (1+.5)/(2+.5*4)
              2.5 / 5,          # 2->1: (2+.5)/(3+2)
              0.5 / 4,          # 1->3: (0+.5)/(2+2)
              1.5 / 3,          # 3->0: (1+.5)/(1+2)   (a BOS target: excluded from bits/byte)
              0.5 / 4,          # 0->3
              0.5 / 3]          # 3->2
    np.testing.assert_allclose(m.nll(val), -np.log(expect), rtol=1e-12)
    scored = [expect[i] for i in (1, 2, 3, 5, 6)]
    assert m.bits_per_byte(val, 10, BOS) == pytest.approx(-sum(math.log2(p) for p in scored) / 10, rel=1e-12)
    st = m.table_stats()
    assert (st["contexts"], st["ngrams"], st["possible_contexts"], st["train_tokens"]) == (4, 6, 4, 9)


def test_bos_resets_context_and_is_not_scored():
    # trigram add-1, V = 4. Train contexts (oldest first), BOS-padded after each document start:
    #   t1 (0,0)->1  t2 (0,1)->2  t3 (1,2)->3  t4 (2,3)->0  t5 (0,0)->2 [not (3,0): no crossing]
    #   t6 (0,2)->3  t7 (2,3)->1
    m = MarkovModel.fit(np.array([0, 1, 2, 3, 0, 2, 3, 1]), 3, 4, BOS, "addk", k=1.0)
    val = np.array([0, 2, 1, 0, 1, 3])
    expect = [1 / 6,   # (0,0)->0: (0+1)/(2+4), a BOS target
              2 / 6,   # (0,0)->2
              1 / 5,   # (0,2)->1: (0+1)/(1+4)
              1 / 4,   # (2,1)->0: unseen context -> uniform; a BOS target
              2 / 6,   # (0,0)->1: context reset after BOS (crossing would give unseen (1,0) -> 1/4)
              1 / 5]   # (0,1)->3
    np.testing.assert_allclose(m.nll(val), -np.log(expect), rtol=1e-12)
    bits = -sum(math.log2(expect[i]) for i in (1, 2, 4, 5))
    assert m.bits_per_byte(val, 7, BOS) == pytest.approx(bits / 7, rel=1e-12)


def test_second_document_scores_as_if_alone():
    x, _ = chain_stream(3, 10, 4000, seed=3)
    m = MarkovModel.fit(x, 4, 10, BOS, "kn")
    doc1 = np.array([0, 4, 5, 6, 7, 8, 1])
    doc2 = np.array([0, 2, 2, 9, 3, 4])
    both = m.nll(np.concatenate([doc1, doc2]))
    # after doc2's BOS nothing of doc1 is visible; only the BOS target itself depends on doc1's tail
    np.testing.assert_allclose(both[len(doc1) + 1:], m.nll(doc2)[1:], rtol=1e-12)
    assert m.distribution([4, 5, 6, BOS, 2]) == pytest.approx(m.distribution([BOS, 2]))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kneser_ney_matches_plain_python_reference(order):
    x, _ = chain_stream(3, 6, 1500, seed=4, p_end=0.03)
    held, _ = chain_stream(3, 6, 200, seed=5, p_end=0.03)
    m = MarkovModel.fit(x, order, 6, BOS, "kn")
    ref = RefKN(list(x), order, 6)
    np.testing.assert_allclose(m.discounts, np.array(ref.D), rtol=1e-12)
    want = [-math.log(ref.prob(ctx, w)) for ctx, w in ref_contexts(list(held), order)]
    np.testing.assert_allclose(m.nll(held)[1:], want, rtol=1e-10)  # held[0] is BOS: the reference skips it
    for ctx in [(), (3,), (0, 1), (5, 5)]:
        p = m.distribution(list(ctx))
        np.testing.assert_allclose(p, [ref.prob(((BOS,) * order + ctx)[len(ctx) + 1:], w) for w in range(6)],
                                   rtol=1e-10)


def test_kneser_ney_beats_addk_on_held_out_chain():
    x, _ = chain_stream(3, 50, 25000, seed=6)  # one stream: train and val come from the same chain
    train, val = x[:20000], x[20000:]
    kn = bpb_1byte(MarkovModel.fit(train, 3, 50, BOS, "kn"), val)
    for k in (1.0, 0.3, 0.1, 0.03, 0.01):  # whatever k is picked, on the held-out data
        assert kn < bpb_1byte(MarkovModel.fit(train, 3, 50, BOS, "addk", k=k), val) - 0.05, k


def test_higher_order_helps_on_order3_chain_and_reaches_its_entropy():
    x, table = chain_stream(3, 8, 40000, seed=8, concentration=3.0)
    train, val = x[:32000], x[32000:]
    bpb = {n: bpb_1byte(MarkovModel.fit(train, n, 8, BOS, "kn"), val) for n in (1, 2, 3, 4)}
    assert bpb[1] > bpb[2] + 0.3 and bpb[2] > bpb[3] + 0.2
    # the chain's own cross-entropy on the same val stream: the right order gets within 2% of it
    truth = true_nll(val, table, 3) / math.log(2) / np.count_nonzero(val[1:] != BOS)
    assert abs(bpb[3] - truth) < 0.02 * truth
    assert bpb[4] < truth * 1.03  # one order too many costs little with Kneser-Ney


def test_table_grows_with_order():
    x, _ = chain_stream(3, 20, 6000, seed=8)
    stats = [MarkovModel.fit(x, n, 20, BOS, "kn").table_stats() for n in (1, 2, 3, 4)]
    assert [s["possible_contexts"] for s in stats] == [1, 20, 400, 8000]
    assert [s["contexts"] for s in stats] == sorted(s["contexts"] for s in stats)
    assert all(a["ngrams"] < b["ngrams"] and a["bytes"] < b["bytes"] for a, b in zip(stats, stats[1:]))
    assert stats[2]["contexts"] <= 400 and stats[3]["contexts"] <= 8000


def test_sampling_is_seeded_and_follows_the_distribution():
    x, _ = chain_stream(2, 15, 5000, seed=9, p_end=0.0001)
    m = MarkovModel.fit(x, 2, 15, BOS, "kn")
    a = m.sample([BOS, 3], 60, seed=1)
    assert a == m.sample([BOS, 3], 60, seed=1) and a != m.sample([BOS, 3], 60, seed=2)
    assert len(a) == 60 and all(0 < i < 15 for i in a)
    greedy = m.sample([BOS, 3], 5, seed=1, temperature=0)
    assert greedy == m.sample([BOS, 3], 5, seed=99, temperature=0)
    assert greedy[0] == int(np.argmax(m.distribution([BOS, 3])))
    # single draws over many seeds match the model's next-token distribution
    p = m.distribution([BOS, 7])
    draws = Counter(m.sample([BOS, 7], 1, seed=s, stop_at_bos=False)[0] for s in range(3000))
    freq = np.array([draws[i] for i in range(15)]) / 3000
    assert np.abs(freq - p).max() < 0.035


def test_save_load_round_trip(tmp_path):
    x, _ = chain_stream(3, 12, 3000, seed=10)
    held, _ = chain_stream(3, 12, 400, seed=11)
    for smoothing in ("kn", "addk"):
        m = MarkovModel.fit(x, 3, 12, BOS, smoothing, k=0.2)
        path = tmp_path / f"m-{smoothing}.npz"
        m.save(path)
        r = MarkovModel.load(path)
        assert (r.order, r.vocab_size, r.bos_id, r.smoothing, r.k) == (3, 12, BOS, smoothing, 0.2)
        np.testing.assert_array_equal(r.nll(held), m.nll(held))
        assert r.table_stats() == m.table_stats()
        assert r.sample([BOS], 30, seed=4) == m.sample([BOS], 30, seed=4)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.npz"):
        MarkovModel.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "objects.npz", meta=np.array([{"format": "lmforge-markov"}], dtype=object))
    with pytest.raises(CheckpointError):  # object arrays would need pickle: refused
        MarkovModel.load(tmp_path / "objects.npz")
    with pytest.raises(CheckpointError, match="not found"):
        MarkovModel.load(tmp_path / "missing.npz")


def test_bad_parameters_and_data():
    x = np.array([0, 1, 2, 3])
    with pytest.raises(ConfigError, match="order"):
        MarkovModel.fit(x, 0, 4, BOS)
    with pytest.raises(ConfigError, match="smoothing"):
        MarkovModel.fit(x, 2, 4, BOS, "witten")
    with pytest.raises(ConfigError, match="k must be > 0"):
        MarkovModel.fit(x, 2, 4, BOS, "addk", k=0)
    with pytest.raises(DataError, match="outside"):
        MarkovModel.fit(np.array([0, 1, 9]), 2, 4, BOS)
    m = MarkovModel.fit(x, 2, 4, BOS)
    with pytest.raises(DataError, match="BOS id"):
        m.bits_per_byte(x, 3, bos_id=1)


# ------------------------------------------------------------------------------------------ CLI

def write_shards(d, train, val, vocab, val_bytes, bos_id=BOS):
    """Shards in the `lmforge data prepare` format (lmforge.data.shards), written by hand."""
    from lmforge.data.shards import FORMAT

    d.mkdir(parents=True)
    np.asarray(train, dtype="<u2").tofile(d / "train.bin")
    np.asarray(val, dtype="<u2").tofile(d / "val.bin")
    meta = {"format": FORMAT, "vocab_size": vocab, "dtype": "uint16", "bos_id": bos_id,
            "train": {"tokens": len(train), "bytes": int(np.count_nonzero(np.asarray(train) != bos_id)),
                      "documents": int(np.count_nonzero(np.asarray(train) == bos_id))},
            "val": {"tokens": len(val), "bytes": val_bytes,
                    "documents": int(np.count_nonzero(np.asarray(val) == bos_id))}}
    (d / "meta.json").write_text(json.dumps(meta))


def test_cli_train_eval_and_sweep(tmp_path, capsys):
    x, _ = chain_stream(3, 10, 6000, seed=12)
    data = tmp_path / "shards"
    write_shards(data, x[:5000], x[5000:], 10, int(np.count_nonzero(x[5000:] != BOS)))
    out = tmp_path / "m.npz"
    assert main(["markov", "train", "--data", str(data), "--order", "3", "--out", str(out)]) == 0
    m = MarkovModel.load(out)
    assert (m.order, m.smoothing, m.train_tokens) == (3, "kn", 5000)
    assert "order 3 kn" in capsys.readouterr().out

    assert main(["markov", "eval", "--data", str(data), "--orders", "1,3", "--smoothing", "addk", "--k", "0.5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "val bits/byte" in table[0] and len(table) == 4
    rows = markov_sweep(data, [1, 3], "addk", 0.5, progress=False)
    assert [r["order"] for r in rows] == [1, 3]
    want = bpb_1byte(MarkovModel.fit(x[:5000], 3, 10, BOS, "addk", k=0.5), x[5000:])
    assert rows[1]["val_bpb"] == pytest.approx(want, rel=1e-12)
    assert f"{want:.4f}" in table[3] and rows[1]["possible_contexts"] == 100


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["markov", "eval", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and "nope" in err and "\n" not in err
    assert main(["markov", "sample", "--model", str(tmp_path / "nope.npz"), "--tokenizer", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    data = tmp_path / "shards"
    write_shards(data, np.array([0, 1, 2]), np.array([0, 1]), 3, 1)
    assert main(["markov", "eval", "--data", str(data), "--orders", "2,x"]) == 2
    assert "--orders" in capsys.readouterr().err
    meta = json.loads((data / "meta.json").read_text())
    del meta["val"]["bytes"]
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["markov", "eval", "--data", str(data), "--orders", "1"]) == 2
    assert "val.bytes" in capsys.readouterr().err
    (data / "val.bin").write_bytes(b"\x00")  # truncated: the shard reader's size check fires
    assert main(["markov", "train", "--data", str(data), "--order", "2", "--out", str(tmp_path / "m.npz")]) == 2
    assert "val.bin" in capsys.readouterr().err


def test_cli_sample_decodes_text(tmp_path, capsys):
    from lmforge.tokenizer.tokenizer import Tokenizer

    docs = ["the cat sat on the mat. " * 20, "the dog sat on the log. " * 20]
    tok = Tokenizer.train(docs, vocab_size=256 + 3 + 20, progress=False)
    tok.save(tmp_path / "tok")
    stream = np.concatenate([tok.encode(d, bos=True) for d in docs * 5])
    data = tmp_path / "shards"
    write_shards(data, stream, stream[:50], tok.vocab_size, 40, bos_id=tok.bos_id)
    model = tmp_path / "m.npz"
    assert main(["markov", "train", "--data", str(data), "--order", "3", "--out", str(model)]) == 0
    capsys.readouterr()
    args = ["markov", "sample", "--model", str(model), "--tokenizer", str(tmp_path / "tok"),
            "--prompt", "the cat", "--tokens", "30", "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text) > len("the cat") + 10
    assert main(args) == 0 and capsys.readouterr().out == text  # seeded
