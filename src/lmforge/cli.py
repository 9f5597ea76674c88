"""`lmforge VERB ...` — parse arguments, call one function per verb, print one-line errors.

Verb implementations live next to the code they drive and are imported lazily (as "module:function"),
so `lmforge --help` stays fast and never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge import __version__
from lmforge.errors import LmforgeError


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text",
                   help="JSONL/parquet field (column) that holds the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSONL lines (counted and reported) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Take a language model through its whole life, on a laptop CPU or many GPUs.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    def verb(sub, name, target, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_target=target)
        return p

    # quickstart: the README's main job
    p = verb(verbs, "quickstart", "lmforge.quickstart:cmd_quickstart",
             "run the end-to-end pipeline on built-in data (recipes/cpu-quickstart.yaml)")
    p.add_argument("--recipe", default=None, help="YAML recipe (default: the built-in CPU quickstart)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. tokenizer.vocab_size=4096")

    # pretrain
    p = verb(verbs, "pretrain", "lmforge.train.pretrain:cmd_pretrain",
             "pretrain a Transformer on token shards (torchrun-aware: DDP/FSDP)")
    p.add_argument("--recipe", default=None, help="YAML recipe (keys of PretrainConfig)")
    p.add_argument("--data", default=None, metavar="DIR", help="token shards (lmforge data prepare)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer (default: DATA/tokenizer)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.preset=cpu-small train.max_steps=500 train.lr=3e-3")

    # eval
    ev = verbs.add_parser("eval", help="evaluate checkpoints", description="evaluate checkpoints")
    esub = ev.add_subparsers(dest="eval_verb", metavar="VERB")
    esub.required = True
    p = verb(esub, "bpb", "lmforge.eval.cli:cmd_bpb", "bits per byte over a whole validation split")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards (the val split is scored)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="estimate from about N tokens in windows spread over the split")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding window: windows every STRIDE tokens, each target scored once with >= seq_len - "
                        "STRIDE tokens of context (default: seq_len, no overlap)")
    p.add_argument("--device", default="auto")

    # generate
    p = verb(verbs, "generate", "lmforge.infer.cli:cmd_generate",
             "generate text from a checkpoint (streams to the terminal)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or run) directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    # sampling: unset options come from the checkpoint's generation_config.json, else SamplingParams defaults
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF-style, > 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=None, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
                   help="most tokens to generate (default 256)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable); it is never printed")
    p.add_argument("--seed", type=int, default=None, help="seed: same seed, same output")
    p.add_argument("--stop-token-id", type=int, action="append", default=None, metavar="ID",
                   help="also stop at this token id (repeatable)")
    p.add_argument("--min-tokens", type=int, default=None, help="no EOS/stop token before this many tokens")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past EOS (until the budget)")
    p.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each token's logprob and the K most likely alternatives (stderr)")
    p.add_argument("--logprobs-mode", default=None, choices=["raw", "processed"],
                   help="logprobs of the model's distribution (raw, default) or the one sampled from")
    p.add_argument("--n", type=int, default=None, help="number of completions (batched after one prefill)")
    # structured output (one of)
    p.add_argument("--json-schema", default=None, metavar="FILE", help="the text is JSON valid under this schema")
    p.add_argument("--regex", default=None, help="the text fully matches this regular expression")
    p.add_argument("--choices", nargs="+", default=None, metavar="TEXT", help="the text is exactly one of these")
    # test-time compute (one of)
    p.add_argument("--best-of", type=int, default=None, metavar="N", help="sample N, print the highest mean logprob")
    p.add_argument("--self-consistency", type=int, default=None, metavar="N",
                   help="sample N, print one with the most common final number")
    p.add_argument("--beam", type=int, default=None, metavar="K", help="beam search with K beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length^this")
    # speculative decoding
    p.add_argument("--draft-checkpoint", default=None, metavar="DIR", help="a small model with the same tokenizer")
    p.add_argument("--lookahead", type=int, default=None, metavar="K",
                   help="tokens proposed per step (speculative; without a draft: prompt lookup)")
    p.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | fp16 | auto (autocast)")

    # seeing inside: attention maps, next-token probabilities, continuation logprobs
    p = verb(verbs, "attention", "lmforge.infer.inspect:cmd_attention",
             "draw attention heat maps of a prompt (all layers x heads, or one map with --layer and --head)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or run) directory")
    p.add_argument("--prompt", required=True, help="text whose attention to draw")
    p.add_argument("--layer", type=int, default=None, help="only this layer (0-based)")
    p.add_argument("--head", type=int, default=None, help="only this head (0-based)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image to write (.png, .pdf or .svg)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p = verb(verbs, "inspect", "lmforge.infer.inspect:cmd_inspect",
             "top-k next tokens after a prompt, and per-token logprobs of a continuation")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or run) directory")
    p.add_argument("--prompt", required=True, help="text to condition on")
    p.add_argument("--continuation", default=None, help="text to score after the prompt")
    p.add_argument("--top-k", type=int, default=10, help="how many next tokens to show (default 10)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")

    # data
    data = verbs.add_parser("data", help="corpora: list built-ins, prepare token shards",
                            description="corpora: list built-ins, prepare token shards")
    dsub = data.add_subparsers(dest="data_verb", metavar="VERB")
    dsub.required = True
    verb(dsub, "list", "lmforge.data.corpus:cmd_list", "list the built-in corpora")
    p = verb(dsub, "prepare", "lmforge.data.shards:cmd_prepare",
             "tokenize a corpus into train.bin / val.bin / meta.json")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="built-in corpus name or a file/directory (.txt .md .jsonl .parquet)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out (default 0.1)")
    p.add_argument("--split", default="random", choices=["random", "tail"],
                   help="random documents (seeded) or the last documents of each source (default: random)")
    p.add_argument("--seed", type=int, default=0, help="seed for the train/val document split")
    _add_source_options(p)

    # tokenizer
    tok = verbs.add_parser("tokenizer", help="train, inspect and measure a byte-level BPE tokenizer",
                           description="train, inspect and measure a byte-level BPE tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_verb", metavar="VERB")
    tsub.required = True
    p = verb(tsub, "train", "lmforge.tokenizer.cli:cmd_train", "train a byte-level BPE tokenizer")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="built-in corpus name or a file/directory (.txt .md .jsonl .parquet)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including 256 bytes and specials")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the tokenizer")
    p.add_argument("--pattern", default="gpt4",
                   help="pre-split regex: 'gpt4' (default), 'gpt2', or a regex of your own")
    p.add_argument("--min-frequency", type=int, default=2, help="stop when the best pair occurs fewer times")
    _add_source_options(p)
    p = verb(tsub, "encode", "lmforge.tokenizer.cli:cmd_encode", "show ids and token boundaries of a text")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("text", help="text to encode ('-' reads standard input)")
    p = verb(tsub, "stats", "lmforge.tokenizer.cli:cmd_stats",
             "bytes/token, chars/token and tokens per 1000 chars, per file and per script")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("inputs", nargs="+", metavar="SRC")
    _add_source_options(p)

    # markov: the n-gram baseline, scored in bits per byte like the Transformer
    mk = verbs.add_parser("markov", help="n-gram (Markov chain) baseline: train, evaluate, sample",
                          description="n-gram (Markov chain) baseline: train, evaluate, sample")
    msub = mk.add_subparsers(dest="markov_verb", metavar="VERB")
    msub.required = True

    def _markov_options(p):
        p.add_argument("--data", required=True, metavar="DIR", help="token shards (lmforge data prepare)")
        p.add_argument("--smoothing", default="kn", choices=["kn", "addk"],
                       help="interpolated modified Kneser-Ney (default) or add-k")
        p.add_argument("--k", type=float, default=0.1, help="add-k pseudo-count (default 0.1)")
        p.add_argument("--max-tokens", type=int, default=None, help="count only the first N train tokens")
    p = verb(msub, "train", "lmforge.baselines.markov:cmd_train", "count n-grams of the train split into a table")
    _markov_options(p)
    p.add_argument("--order", type=int, required=True, help="n: predict from the previous n-1 tokens")
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p = verb(msub, "eval", "lmforge.baselines.markov:cmd_eval",
             "table size and val bits/byte for each order (the table explodes with n)")
    _markov_options(p)
    p.add_argument("--orders", default="1,2,3,4,5", help="comma-separated orders (default 1,2,3,4,5)")
    p = verb(msub, "sample", "lmforge.baselines.markov:cmd_sample", "generate text from a trained table")
    p.add_argument("--model", required=True, metavar="FILE.npz")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")

    # interop: Hugging Face and GGUF
    imp = verbs.add_parser("import", help="import a model from another format",
                           description="import a model from another format")
    isub = imp.add_subparsers(dest="import_verb", metavar="FORMAT")
    isub.required = True
    p = verb(isub, "hf", "lmforge.interop.hf:cmd_import_hf",
             "Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, GPT-2; safetensors) -> lmforge checkpoint")
    p.add_argument("--source", required=True, metavar="HF_DIR",
                   help="local model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype in the checkpoint (default: as stored)")
    exp = verbs.add_parser("export", help="export a checkpoint to another format",
                           description="export a checkpoint to another format")
    xsub = exp.add_subparsers(dest="export_verb", metavar="FORMAT")
    xsub.required = True
    p = verb(xsub, "hf", "lmforge.interop.hf:cmd_export_hf",
             "lmforge checkpoint -> Hugging Face directory (from_pretrained loads it offline)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    p.add_argument("--out", required=True, metavar="HF_DIR")
    p = verb(xsub, "gguf", "lmforge.interop.gguf:cmd_export_gguf",
             "lmforge checkpoint -> GGUF file for llama.cpp (llama-style models)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    p.add_argument("--out", required=True, metavar="FILE.gguf")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight type of the matrices (default f16; norms stay f32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, func = args._target.split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
        rc = fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
