"""`lmforge generate | attention | inspect | chat | tool`: their arguments and what they run.

generate: one prompt, every sampling parameter, and the ways to spend more compute on it.
Plain: stream one completion (or --n of them, batched after one prefill). Structured: --json-schema / --regex /
--choices constrain the text to a grammar. Search: --best-of N (highest mean logprob), --self-consistency N
(majority answer), --beam K. Faster: --draft-checkpoint DIR or --lookahead K (speculative decoding; prompt
lookup when no draft is given). The modes are exclusive; bad combinations are one-line errors (exit 2).

attention / inspect: seeing inside a model (lmforge.infer.inspect): attention heat maps, the next-token
distribution, per-token logprobs of a continuation.

chat: a terminal conversation (lmforge.infer.chat_session) with the model's tool calls run in between
(lmforge.infer.assistant); tool list / run: the built-in tools (lmforge.infer.tools), one call at a time.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from lmforge.errors import ConfigError, LmforgeError
from lmforge.verbs import Verb, add_device_option, clean_text, no_arguments, nonneg_int, positive_int


def _checkpoint_option(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or run) directory")


# ---- sampling options: generate and chat -----------------------------------------------------------------
def add_sampling_options(p) -> None:
    """The sampling flags; unset ones come from the checkpoint's generation_config.json, else SamplingParams
    defaults (sampling_params)."""
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=nonneg_int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF-style, > 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=None, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int, default=None,
                   help="most tokens to generate (default 256)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable); it is never printed")
    p.add_argument("--seed", type=int, default=None, help="seed: same seed, same output")


def sampling_params(args, path, **more):
    """SamplingParams from the add_sampling_options flags over the checkpoint's generation_config.json (`more`:
    further fields given by the verb)."""
    from lmforge.infer.sampling import params_from_generation_config
    return params_from_generation_config(
        path, defaults={"max_tokens": 256}, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, max_tokens=args.max_new_tokens, stop=args.stop or None,
        seed=args.seed, **more)


# ---- generate -------------------------------------------------------------------------------------------
def generate_arguments(p) -> None:
    _checkpoint_option(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_options(p)
    p.add_argument("--stop-token-id", type=nonneg_int, action="append", default=None, metavar="ID",
                   help="also stop at this token id (repeatable)")
    p.add_argument("--min-tokens", type=nonneg_int, default=None, help="no EOS/stop token before this many tokens")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past EOS (until the budget)")
    p.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable)")
    p.add_argument("--logprobs", type=nonneg_int, default=None, metavar="K",
                   help="print each token's logprob and the K most likely alternatives (stderr)")
    p.add_argument("--logprobs-mode", default=None, choices=["raw", "processed"],
                   help="logprobs of the model's distribution (raw, default) or the one sampled from")
    p.add_argument("--n", type=positive_int, default=None, help="number of completions (batched after one prefill)")
    # structured output (one of)
    p.add_argument("--json-schema", default=None, metavar="FILE", help="the text is JSON valid under this schema")
    p.add_argument("--regex", default=None, help="the text fully matches this regular expression")
    p.add_argument("--choices", nargs="+", default=None, metavar="TEXT", help="the text is exactly one of these")
    # test-time compute (one of)
    p.add_argument("--best-of", type=positive_int, default=None, metavar="N",
                   help="sample N, print the highest mean logprob")
    p.add_argument("--self-consistency", type=positive_int, default=None, metavar="N",
                   help="sample N, print one with the most common final number")
    p.add_argument("--beam", type=positive_int, default=None, metavar="K", help="beam search with K beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length^this")
    # speculative decoding
    p.add_argument("--draft-checkpoint", default=None, metavar="DIR", help="a small model with the same tokenizer")
    p.add_argument("--lookahead", type=positive_int, default=None, metavar="K",
                   help="tokens proposed per step (speculative; without a draft: prompt lookup)")
    p.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    add_device_option(p)
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | fp16 | auto (autocast)")


def _clean_text_args(args, *names: str) -> None:
    """Text options (a string or a list of them) with invalid UTF-8 from argv replaced by U+FFFD."""
    for name in names:
        v = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(v, str):
            setattr(args, name, clean_text(v, flag))
        elif isinstance(v, list):
            setattr(args, name, [clean_text(x, flag) for x in v])


def _show_token(tokenizer, i: int) -> str:
    b = tokenizer.id_to_bytes(i)
    try:
        return repr(b.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(b)  # part of a character: show the bytes


def _logit_bias(items) -> dict[int, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise ConfigError(f"expected TOKEN_ID=BIAS, got {item!r}", field="logit_bias") from None
        if not sep:
            raise ConfigError(f"expected TOKEN_ID=BIAS, got {item!r}", field="logit_bias")
    return out


def _constraint(args, tokenizer):
    given = [k for k in ("json_schema", "regex", "choices") if getattr(args, k)]
    if len(given) > 1:
        raise ConfigError(f"give one of --json-schema, --regex, --choices (got {', '.join(given)})", field=given[1])
    if not given:
        return None
    from lmforge.infer.constrained import Grammar
    if args.json_schema:
        path = Path(args.json_schema)
        if not path.is_file():
            raise ConfigError("JSON schema file not found", file=str(path), field="json_schema")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"bad JSON: {e.msg}", file=str(path), line=e.lineno, field="json_schema") from None
        return Grammar.json_schema(tokenizer, schema)
    if args.regex:
        return Grammar.regex(tokenizer, args.regex)
    return Grammar.choices(tokenizer, args.choices)


def _print_logprobs(tokenizer, logprobs) -> None:
    for lp in logprobs or []:
        alts = ", ".join(f"{_show_token(tokenizer, i)} {v:.3f}" for i, v in lp.top)
        print(f"{_show_token(tokenizer, lp.token_id):>16} {lp.logprob:8.3f}" + (f"   | {alts}" if alts else ""),
              file=sys.stderr)


def cmd_generate(args) -> int:
    import lmforge
    from lmforge import checkpoint
    from lmforge.infer.engine import generate
    from lmforge.interop.hf import is_hf_dir

    _clean_text_args(args, "prompt", "stop", "choices", "regex")

    search = {"--best-of": args.best_of, "--self-consistency": args.self_consistency, "--beam": args.beam,
              "--draft-checkpoint/--lookahead": args.draft_checkpoint or args.lookahead}
    modes = [k for k, v in search.items() if v]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined: pick one")
    if modes and args.n is not None and args.n > 1:
        raise ConfigError(f"--n is for plain sampling; {modes[0]} makes its own candidates", field="n")

    # default sampling settings come from the model directory's generation_config.json
    path = args.checkpoint if is_hf_dir(args.checkpoint) else checkpoint.resolve(args.checkpoint)
    params = sampling_params(
        args, path, stop_token_ids=args.stop_token_id or None, min_tokens=args.min_tokens,
        ignore_eos=args.ignore_eos or None, logit_bias=_logit_bias(args.logit_bias), logprobs=args.logprobs,
        logprobs_mode=args.logprobs_mode, n=args.n)
    model, tokenizer = lmforge.load(path, device=args.device)
    constraint = _constraint(args, tokenizer)
    if constraint is not None and modes:
        raise ConfigError(f"a grammar (--json-schema/--regex/--choices) works with plain sampling, not {modes[0]}")
    t0 = time.perf_counter()

    if args.best_of or args.self_consistency:
        from lmforge.infer.search import best_of_n, self_consistency
        fn, k = (best_of_n, args.best_of) if args.best_of else (self_consistency, args.self_consistency)
        res = fn(model, tokenizer, args.prompt, params.replace(n=k), precision=args.precision)
        print(res.best.text)
        print(res.table(), file=sys.stderr)
        return _summary(len(res.best.token_ids), t0, f"best of {k}")
    if args.beam:
        from lmforge.infer.search import beam_search
        res = beam_search(model, tokenizer, args.prompt, n_beams=args.beam, max_tokens=params.max_tokens,
                          stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
                          length_penalty=args.length_penalty, precision=args.precision)
        print(res.best.text)
        print(res.table(), file=sys.stderr)
        return _summary(len(res.best.token_ids), t0, f"beam {args.beam}")
    if params.n > 1:
        from lmforge.infer.engine import Engine
        results = Engine(model, tokenizer, precision=args.precision).generate([args.prompt], params,
                                                                            constraint=constraint)[0]
        for i, r in enumerate(results):
            print(f"--- completion {i} ({r.finish_reason}) ---\n{r.text}")
            _print_logprobs(tokenizer, r.logprobs)
        return _summary(sum(len(r.token_ids) for r in results), t0, f"{params.n} completions")

    extra = ""
    if args.draft_checkpoint or args.lookahead:
        from lmforge.infer.speculative import check_draft, speculative_generate
        draft = None
        if args.draft_checkpoint:
            draft, draft_tok = lmforge.load(args.draft_checkpoint, device=args.device)
            check_draft(model, tokenizer, draft, draft_tok, file=args.draft_checkpoint)
        s = speculative_generate(model, tokenizer, args.prompt, params, draft_model=draft,
                                 lookahead=args.lookahead or 4, precision=args.precision, stream=True)
    else:
        s = generate(model, tokenizer, args.prompt, params, stream=True, precision=args.precision,
                     constraint=constraint)
    if args.no_stream:  # the text comes at the end: show a token counter meanwhile (on a terminal only)
        from tqdm import tqdm
        for _ in tqdm(s, total=params.max_tokens, unit="tok", file=sys.stderr, leave=False, disable=None):
            pass
        sys.stdout.write(s.result.text)
    else:
        for d in s:
            sys.stdout.write(d.text)
            sys.stdout.flush()
    res = s.result
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_logprobs(tokenizer, res.logprobs)
    stats = getattr(res, "spec_stats", None)
    if stats is not None:
        extra = (f"; speculative ({'draft' if args.draft_checkpoint else 'prompt lookup'}): "
                 f"{stats.acceptance_rate:.0%} of proposed tokens accepted, {stats.tokens_per_step:.2f} tokens/step")
    why = res.finish_reason if res.stop_reason is None else f"{res.finish_reason} ({res.stop_reason!r})"
    return _summary(len(res.token_ids), t0, f"finish: {why}{extra}")


def _summary(n_tokens: int, t0: float, what: str) -> int:
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tok/s; {what}]", file=sys.stderr)
    return 0


# ---- attention, inspect ---------------------------------------------------------------------------------
def attention_arguments(p) -> None:
    _checkpoint_option(p)
    p.add_argument("--prompt", required=True, help="text whose attention to draw")
    p.add_argument("--layer", type=nonneg_int, default=None, help="only this layer (0-based)")
    p.add_argument("--head", type=nonneg_int, default=None, help="only this head (0-based)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image to write (.png, .pdf or .svg)")
    add_device_option(p)


def cmd_attention(args) -> int:
    import lmforge
    from lmforge.infer.inspect import attention_maps, pick_indices, plot_attention

    _clean_text_args(args, "prompt")

    if not args.prompt:
        raise LmforgeError("is empty", field="prompt")
    model, tokenizer = lmforge.load(args.checkpoint, device=args.device)
    cfg = model.config
    pick_indices(cfg.n_layer, args.layer, "layer")  # check before the forward pass
    pick_indices(cfg.n_head, args.head, "head")
    tokens, attn = attention_maps(model, tokenizer, args.prompt)
    title = f"attention: {args.prompt[:60]!r}" + ("…" if len(args.prompt) > 60 else "")
    out = plot_attention(tokens, attn, args.out, layer=args.layer, head=args.head, title=title)
    rows = 1 if args.layer is not None else cfg.n_layer
    cols = 1 if args.head is not None else cfg.n_head
    print(f"wrote {out} ({rows} layer(s) x {cols} head(s), {len(tokens)} tokens)")
    return 0


def inspect_arguments(p) -> None:
    _checkpoint_option(p)
    p.add_argument("--prompt", required=True, help="text to condition on")
    p.add_argument("--continuation", default=None, help="text to score after the prompt")
    p.add_argument("--top-k", type=positive_int, default=10, help="how many next tokens to show (default 10)")
    add_device_option(p)


def cmd_inspect(args) -> int:
    import lmforge
    from lmforge.infer.inspect import checked_ids, continuation_logprobs, next_token_topk

    _clean_text_args(args, "prompt", "continuation")

    if not args.prompt:
        raise LmforgeError("is empty", field="prompt")
    if args.continuation is not None and not args.continuation:
        raise LmforgeError("is empty", field="continuation")
    model, tokenizer = lmforge.load(args.checkpoint, device=args.device)
    top = next_token_topk(model, tokenizer, args.prompt, k=args.top_k)
    n_prompt = len(checked_ids(tokenizer, args.prompt, "prompt", True))
    print(f"prompt: {n_prompt} tokens (BOS included)")
    print(f"next token, top {len(top)}:")
    for rank, t in enumerate(top, 1):
        print(f"  {rank:>3}. {t.token!r:<20} p={t.prob:.4f}  logprob={t.logprob:.4f}")
    if args.continuation is not None:
        c = continuation_logprobs(model, tokenizer, args.prompt, args.continuation)
        print(f"continuation: {len(c.token_ids)} tokens")
        for tid, label, lp in zip(c.token_ids, c.tokens, c.logprobs):
            print(f"  {label!r:<20} id={tid:<7} logprob={lp:.4f}  p={math.exp(lp):.4f}")
        print(f"total logprob {c.total:.4f}, mean {c.mean:.4f} (perplexity {c.perplexity:.3f})")
    sys.stdout.flush()
    return 0


# ---- chat, tool ----------------------------------------------------------------------------------------
def chat_arguments(p) -> None:
    _checkpoint_option(p)
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="comma-separated built-in tools the model may call (see: lmforge tool list)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    p.add_argument("--message", default=None, metavar="TEXT",
                   help="send this one message, print the answer and exit (no interactive loop)")
    p.add_argument("--max-tool-rounds", type=nonneg_int, default=4, metavar="N",
                   help="most rounds of tool calls in one answer (default 4)")
    p.add_argument("--tool-choice", default="auto", choices=["auto", "required", "none"],
                   help="auto: the model decides (default); required: every answer starts with tool calls; none")
    add_sampling_options(p)
    add_device_option(p)
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | fp16 | auto (autocast)")


def cmd_chat(args) -> int:
    from lmforge.infer.tools import get_tools

    _clean_text_args(args, "system", "message", "stop")
    tools = get_tools(args.tools) if args.tools is not None else []   # checked before anything heavy is loaded
    if args.tool_choice == "required" and not tools:
        raise ConfigError("--tool-choice required needs --tools", field="tool_choice")

    import lmforge
    from lmforge import checkpoint
    from lmforge.infer.chat_session import COMMANDS, ChatSession, interactive, printer
    from lmforge.infer.engine import Engine
    from lmforge.interop.hf import is_hf_dir

    path = args.checkpoint if is_hf_dir(args.checkpoint) else checkpoint.resolve(args.checkpoint)
    params = sampling_params(args, path)
    model, tokenizer = lmforge.load(path, device=args.device)
    chat = ChatSession(Engine(model, tokenizer, precision=args.precision), tokenizer, params, tools,
                       system=args.system, max_tool_rounds=args.max_tool_rounds, tool_choice=args.tool_choice)
    if args.message is not None:   # one turn: the answer on stdout, tool calls and notes on stderr
        chat.ask(args.message, printer(sys.stdout, sys.stderr))
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    names = ", ".join(t.name for t in chat.tools)
    banner = (f"lmforge chat: {args.checkpoint} ({chat.context} tokens of context"
              f"{'; tools: ' + names if names else ''}). Commands: {COMMANDS}. Ctrl-C stops an answer.")
    return interactive(chat, banner)


def tool_run_arguments(p) -> None:
    p.add_argument("name", metavar="NAME", help="a built-in tool (see: lmforge tool list)")
    p.add_argument("arguments", metavar="JSON_ARGS", help='its arguments as a JSON object, e.g. '
                   '\'{"expression": "2**64 - 1"}\'')


def cmd_tool_run(args) -> int:
    from lmforge.infer.tools import get_tools

    tool = get_tools([args.name])[0]
    print(tool.run(clean_text(args.arguments, "JSON_ARGS")))   # bad JSON or a refused input: ToolError
    return 0


def cmd_tool_list(args) -> int:
    from lmforge.infer.tools import builtin_tools

    for t in builtin_tools().values():
        print(f"{t.name}: {t.description}\n    arguments: {json.dumps(t.parameters, ensure_ascii=False)}")
    return 0


VERBS = [
    Verb(("generate",), "generate text from a checkpoint (streams to the terminal)", generate_arguments,
         cmd_generate),
    # seeing inside: attention maps, next-token probabilities, continuation logprobs
    Verb(("attention",), "draw attention heat maps of a prompt (all layers x heads, or one map with --layer and "
         "--head)", attention_arguments, cmd_attention),
    Verb(("inspect",), "top-k next tokens after a prompt, and per-token logprobs of a continuation",
         inspect_arguments, cmd_inspect),
    # chat with tool use
    Verb(("chat",), "chat with a model in the terminal (streaming, history, /reset, /system, tools), or send one "
         "--message", chat_arguments, cmd_chat),
    Verb(("tool", "list"), "list the built-in tools and their arguments", no_arguments, cmd_tool_list),
    Verb(("tool", "run"), "run one built-in tool on JSON arguments and print its result", tool_run_arguments,
         cmd_tool_run),
]
