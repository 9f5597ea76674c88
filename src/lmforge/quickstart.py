"""`lmforge quickstart`: the whole early pipeline on built-in data, end to end, on a laptop CPU.

built-in corpus → BPE tokenizer → token shards → Markov baselines → Transformer pretraining → bits per byte
→ samples → report.md (with the loss curve). Every stage writes its own directory under OUT, so each can be
inspected or re-run with its own verb.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.stages.pretrain import PretrainConfig


@dataclass
class TokenizerSection:
    vocab_size: int = 4096
    pattern: str = "gpt4"
    min_frequency: int = 2


@dataclass
class QuickstartConfig:
    sources: list[str] = field(default_factory=lambda: ["kjv", "python-docs"])
    val_fraction: float = 0.05
    split: str = "tail"      # the last 5% of each source: no parallel passages shared by train and val
    seed: int = 0
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    markov_orders: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    markov_smoothing: str = "kn"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self):
        if not self.markov_orders or min(self.markov_orders) < 1:
            raise ConfigError("give at least one order ≥ 1", field="markov_orders")
        if self.split not in ("random", "tail"):
            raise ConfigError(f"split must be random or tail, got {self.split!r}", field="split")


def default_recipe() -> Path:
    return Path(str(resources.files("lmforge") / "recipes" / "cpu-quickstart.yaml"))


def run_quickstart(cfg: QuickstartConfig, out: str | Path, progress: bool = True) -> dict:
    from lmforge.baselines.markov import markov_sweep
    from lmforge.data.corpus import Corpus
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.stages.pretrain import run_pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def stage(name):
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    t = stage(f"tokenizer: byte-level BPE, vocab {cfg.tokenizer.vocab_size}, on {', '.join(cfg.sources)}")
    corpus = Corpus(cfg.sources)
    tok = Tokenizer.train(corpus.documents(progress=progress), cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                          cfg.tokenizer.min_frequency, progress=progress)
    tok.save(out / "tokenizer")
    times["tokenizer"] = time.perf_counter() - t
    print(f"{tok.n_merges} merges from {corpus.stats.documents:,} documents, "
          f"{corpus.stats.bytes / 1e6:.2f} MB in {times['tokenizer']:.1f}s")

    t = stage("data: token shards")
    meta = prepare_shards(Corpus(cfg.sources), tok, out / "data", val_fraction=cfg.val_fraction, seed=cfg.seed,
                          split=cfg.split,
                          progress=progress)
    tok.save(out / "data" / "tokenizer")
    times["data"] = time.perf_counter() - t
    splits = {k: meta[k] for k in ("train", "val")}
    print(f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
          f"({splits['train']['bytes'] / max(splits['train']['tokens'], 1):.2f} bytes/token)")

    t = stage(f"Markov baselines, orders {cfg.markov_orders} ({cfg.markov_smoothing} smoothing)")
    markov = markov_sweep(out / "data", orders=cfg.markov_orders, smoothing=cfg.markov_smoothing, progress=progress)
    times["markov"] = time.perf_counter() - t
    for r in markov:
        print(f"order {r['order']}: {r['val_bpb']:.3f} bits/byte, {r['contexts']:,} contexts, {r['table_mb']:.1f} MB")

    t = stage("pretrain: Transformer")
    pcfg = cfg.pretrain
    pcfg.data, pcfg.tokenizer = str(out / "data"), str(out / "data" / "tokenizer")
    pcfg.train.out_dir = str(out / "pretrain")
    pcfg.train.progress = progress
    summary = run_pretrain(pcfg)
    times["pretrain"] = time.perf_counter() - t

    t = stage("samples")
    samples = _samples(out / "pretrain" / "checkpoint", pcfg.sample_prompts or ["And God said", "The "],
                       pcfg.sample_tokens)
    for s in samples:
        print(f"  {s!r}")
    times["samples"] = time.perf_counter() - t

    result = {"config": asdict(cfg), "times": times, "tokenizer": {"vocab_size": tok.vocab_size,
              "merges": tok.n_merges}, "data": splits, "markov": markov, "pretrain": summary, "samples": samples}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = write_report(out, result)
    best = min(markov, key=lambda r: r["val_bpb"])
    print(f"\nTransformer {summary.get('val_bpb_sliding', summary['val_bpb']):.3f} bits/byte vs best Markov "
          f"(order {best['order']}) "
          f"{best['val_bpb']:.3f} bits/byte. Report: {report}")
    return result


def _samples(ckpt_dir, prompts, n_tokens) -> list[str]:
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingParams
    import lmforge
    model, tok = lmforge.load(ckpt_dir, device="cpu")
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=n_tokens, seed=0)
    return [p + generate(model, tok, p, params).text for p in prompts]


def _split_words(cfg: dict) -> str:
    frac = f"{cfg['val_fraction']:.0%}"
    if cfg.get("split") == "tail":
        return f"val = the last {frac} of each source's documents"
    return f"val = {frac} of the documents at random, seed {cfg['seed']}"


def write_report(out: Path, r: dict) -> Path:
    p = r["pretrain"]
    markov = r["markov"]
    best = min(markov, key=lambda x: x["val_bpb"])
    lines = [
        "# lmforge quickstart report", "",
        f"Corpus: {', '.join(r['config']['sources'])}; tokenizer: byte-level BPE, vocab {r['tokenizer']['vocab_size']} "
        f"({r['tokenizer']['merges']} merges).",
        f"Shards: train {r['data']['train']['tokens']:,} tokens / {r['data']['train']['bytes']:,} bytes, "
        f"val {r['data']['val']['tokens']:,} tokens / {r['data']['val']['bytes']:,} bytes "
        f"({_split_words(r['config'])}).", "",
        "## Bits per byte on the validation split (lower is better)", "",
        "| model | val bits/byte | size |", "|---|---:|---|",
    ]
    for m in markov:
        lines.append(f"| Markov order {m['order']} ({m['smoothing']}) | {m['val_bpb']:.3f} | "
                     f"{m['contexts']:,} contexts, {m['ngrams']:,} n-grams, {m['table_mb']:.1f} MB "
                     f"(possible contexts V^{m['order'] - 1} = {m['possible_contexts']:.3g}) |")
    params = p.get("params", {})
    # the Markov model always sees its n-1 previous tokens; the Transformer is given its context the same way
    # (sliding window) when the recipe asks for it; the disjoint-window number is shown too
    bpb = p.get("val_bpb_sliding", p["val_bpb"])
    how = (f"sliding window, stride {r['config']['pretrain']['eval_stride']}; disjoint {p['val_bpb']:.3f}"
           if "val_bpb_sliding" in p else "disjoint windows")
    lines.append(f"| **Transformer** ({how}) | **{bpb:.3f}** | {params.get('total', 0):,} parameters "
                 f"({params.get('non_embedding', 0):,} non-embedding) |")
    gap = best["val_bpb"] - bpb
    verdict = f"**{gap:.3f} bits/byte below**" if gap > 0 else f"**{-gap:.3f} bits/byte above** (not yet better than)"
    lines += ["", f"The Transformer is {verdict} the best Markov model (order {best['order']}, "
              f"{best['val_bpb']:.3f}).", "",
              "## Training", "",
              f"{p['step']} steps, {p['tokens']:,} tokens in {p['train_time']:.0f}s of training "
              f"({p['tokens'] / max(p['train_time'], 1e-9):,.0f} tokens/s, {p['precision']} on {p['device']}"
              + (f", MFU {p['mfu_avg']:.0%}" if isinstance(p.get("mfu_avg"), float) else "") + ").", "",
              "![loss curve](pretrain/loss.png)", "", "## Samples", ""]
    lines += [f"```\n{s}\n```" for s in r["samples"]]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["times"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
