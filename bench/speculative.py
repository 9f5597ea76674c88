"""Speculative decoding: tokens/s with and without it, and the acceptance rate, on models trained on the KJV.

    python bench/speculative.py                       # trains a tokenizer, a target and a draft first
    python bench/speculative.py --out runs/specbench  # keep them; later runs: --checkpoint/--draft-checkpoint

Without --checkpoint it trains a BPE tokenizer (vocab 8192) on the KJV and a target of the ≈125 M decode-bench body
(d768, 12 layers, GQA 12/4, SwiGLU 2048; ≈82 M parameters with this vocabulary) for --train-steps with lmforge's
trainer, on rows of 512 tokens (every position the bench decodes has been trained); without --draft-checkpoint a
draft of the ≈9 M body (d256, 6 layers, GQA 8/4) with the target's tokenizer for --draft-steps, distilled from the
target (0.9 KL to the target's next-token distributions + 0.1 cross-entropy: a draft is only as useful as its
agreement with the target; --no-distill trains it on the text alone). Then, for each prompt:
  plain     generate()
  lookup    prompt lookup (no draft), n-gram 3, adaptive K starting at --lookahead
  draft     the draft model proposes, adaptive K
greedy (outputs must be identical to plain: checked and printed) and sampled (temperature 0.8, top-k 50;
distribution-equal, not sample-equal, so the outputs differ). Prompts: `numbers7` is input-grounded — Numbers 7,
where each prince's offering repeats the previous paragraph with only the names changed: the prompt holds two such
paragraphs and the opening of the third, so continuing it means copying from the prompt; `psalm136` (a refrain);
`genesis` (an ordinary opening). Each row is the median of --repeats interleaved runs; tokens/s counts generated
tokens over wall time, prefill included.

CPU timings are noisy when other jobs share the machine; compare ratios within one run (docs/bench.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge import load
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import check_draft, speculative_generate


TARGET = dict(d_model=768, n_layer=12, n_head=12, n_kv_heads=4, d_ff=2048, max_seq_len=512)   # ≈125 M body
DRAFT = dict(d_model=256, n_layer=6, n_head=8, n_kv_heads=4, d_ff=688)                        # ≈9 M body
SEQ_LEN, BATCH = 512, 1          # training rows: prompt + continuation fit in one
DISTILL_ALPHA = 0.9              # the draft's loss: 0.9 KL(target || draft) + 0.1 next-token cross-entropy


def kjv_tokens(tok) -> np.ndarray:
    from lmforge.data.corpus import kjv
    docs = list(kjv())
    return np.concatenate([np.asarray(t, dtype=np.uint16) for t in tok.encode_batch(docs, bos=True)])


def train_model(name: str, tok, ids: np.ndarray, steps: int, size: dict, out: Path, threads: int,
                teacher=None) -> Path:
    """Train a model on the KJV token stream with lmforge's trainer for `steps` (with `teacher`: distilled from it,
    its next-token distributions as targets, so the draft learns to agree with the target); its checkpoint."""
    from lmforge.eval.bpb import token_byte_lengths
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.stages.distill import DistillTask
    from lmforge.stages.pretrain import PretrainTask
    from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **size)
    split = int(len(ids) * 0.98)
    # rows as long as the prompts plus their continuations, so every position the bench decodes was trained
    data = dict(seq_len=min(cfg.max_seq_len, SEQ_LEN), batch_size=BATCH, bos_id=tok.bos_id,
                token_bytes=token_byte_lengths(tok), eval_tokens=8192)
    task = (PretrainTask(ids[:split], ids[split:], **data) if teacher is None else
            DistillTask(teacher, ids[:split], ids[split:], alpha=DISTILL_ALPHA, **data))
    # AdamW: Muon's Newton-Schulz iterations cost ~1 TFLOP a step on the ≈125 M body, whatever the batch
    tcfg = TrainConfig(out_dir=str(out / name), max_steps=steps, optimizer="adamw", lr=1e-3,
                       warmup_steps=10, log_every=20, threads=threads)
    s = train(Transformer(cfg), task, tcfg, checkpoint=CheckpointSpec(model_config=cfg.to_dict(), tokenizer=tok))
    print(f"trained {name}: {s['step']} steps in {s['train_time']:.0f}s, "
          f"val loss {s.get('val_loss', float('nan')):.3f}", file=sys.stderr)
    return Path(s["checkpoint"])


def prompts() -> dict[str, str]:
    from lmforge.data.corpus import kjv_verses
    ps136 = [v["text"] for v in kjv_verses() if v["book"] == "Psalms" and v["chapter"] == 136]
    num7 = [v["text"] for v in kjv_verses() if v["book"] == "Numbers" and v["chapter"] == 7]
    return {"numbers7": "\n".join(num7[11:25]) + "\n",      # two offerings and the third prince's first verse
            "psalm136": "\n".join(ps136[:4]) + "\n",
            "genesis": "In the beginning God created",
            "moses": "And the LORD spake unto Moses, saying,"}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="target checkpoint (default: train one)")
    ap.add_argument("--draft-checkpoint", help="draft checkpoint (default: train one; --draft-steps 0: none)")
    ap.add_argument("--out", help="keep the trained checkpoints here (default: a temporary directory)")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--draft-steps", type=int, default=300)
    ap.add_argument("--no-distill", action="store_true", help="train the draft on the text alone")
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory(prefix="lmforge-spec-bench-")
    out = Path(args.out or tmp.name)
    ids = None
    if args.checkpoint:
        model, tok = load(args.checkpoint, device="cpu")
    else:
        from lmforge.data.corpus import kjv
        from lmforge.tokenizer.tokenizer import Tokenizer
        tok = Tokenizer.train(list(kjv()), vocab_size=8192, progress=False)
        ids = kjv_tokens(tok)
        target_dir = train_model("target", tok, ids, args.train_steps, TARGET, out, args.threads)
        model, tok = load(target_dir, device="cpu")
    draft_dir = args.draft_checkpoint
    if draft_dir is None and args.draft_steps > 0:  # a draft for the target's tokenizer and context
        size = {**DRAFT, "max_seq_len": model.config.max_seq_len}
        ids = kjv_tokens(tok) if ids is None else ids
        teacher = None if args.no_distill else model
        draft_dir = train_model("draft", tok, ids, args.draft_steps, size, out, args.threads, teacher=teacher)
    draft = None
    if draft_dir:
        draft, draft_tok = load(draft_dir, device="cpu")
        check_draft(model, tok, draft, draft_tok, file=draft_dir)
    K, prec = args.lookahead, args.precision

    print(f"target {model.num_params()['total'] / 1e6:.1f}M params"
          + (f", draft {draft.num_params()['total'] / 1e6:.2f}M" if draft is not None else "")
          + f"; up to {args.max_tokens} new tokens, lookahead {K}, {prec}, {args.threads} thread(s); "
            f"median of {args.repeats}")
    print(f"{'prompt':10} {'sampling':8} {'method':7} {'new':>4} {'tok/s':>8} {'speedup':>8} {'accept':>7} "
          f"{'tok/step':>8}  same")
    for pname, prompt in prompts().items():
        for mode, params in (("greedy", SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)),
                             ("sampled", SamplingParams(temperature=0.8, top_k=50, max_tokens=args.max_tokens,
                                                        seed=0, ignore_eos=True))):
            methods = {"plain": lambda: generate(model, tok, prompt, params, precision=prec),
                       "lookup": lambda: speculative_generate(model, tok, prompt, params, lookahead=K, precision=prec)}
            if draft is not None:
                methods["draft"] = lambda: speculative_generate(model, tok, prompt, params, draft_model=draft,
                                                                lookahead=K, precision=prec)
            times = {m: [] for m in methods}
            results = {}
            for _ in range(args.repeats):  # interleaved, so load changes hit every method alike
                for m, fn in methods.items():
                    dt, results[m] = timed(fn)
                    times[m].append(dt)
            base = len(results["plain"].token_ids) / statistics.median(times["plain"])
            for m in methods:
                r = results[m]
                tps = len(r.token_ids) / statistics.median(times[m])
                st = getattr(r, "spec_stats", None)
                same = "" if mode == "sampled" or m == "plain" else \
                    ("yes" if r.token_ids == results["plain"].token_ids else "NO")
                acc = f"{st.acceptance_rate:7.0%}" if st else f"{'':7}"
                per = f"{st.tokens_per_step:8.2f}" if st else f"{'':8}"
                print(f"{pname:10} {mode:8} {m:7} {len(r.token_ids):4} {tps:8.1f} {tps / base:7.2f}x {acc} {per}  "
                      f"{same}")
            # what was decoded: weakly trained models repeat themselves, which is what speculation feeds on
            print(f"{'':10} {mode} output: {results['plain'].text[:90]!r}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
