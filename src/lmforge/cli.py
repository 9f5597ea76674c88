"""`lmforge VERB ...`: the table of verbs, the parser built from it, and one-line errors.

A verb (lmforge.verbs.Verb) is defined next to the code it drives, in its package's cli.py, with its arguments
and the function that runs it. Adding a verb means adding it to that list; a package with verbs of its own
also goes into VERB_MODULES below. Those modules import torch only inside run functions, so `lmforge --help`
stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge import __version__
from lmforge.errors import ConfigError, LmforgeError
from lmforge.verbs import Verb

# the packages' verb lists, in the order `lmforge --help` shows them (after quickstart)
VERB_MODULES = [
    "lmforge.stages.cli",      # pretrain, distill, sft, reward train|score, dpo
    "lmforge.eval.cli",        # eval bpb
    "lmforge.infer.cli",       # generate, attention, inspect, chat, tool list, tool run
    "lmforge.serve.cli",       # serve
    "lmforge.rag.cli",         # rag index, query, ask, eval
    "lmforge.data.cli",        # data list, data prepare
    "lmforge.tokenizer.cli",   # tokenizer train, encode, stats
    "lmforge.baselines.cli",   # markov train, eval, sample
    "lmforge.interop.cli",     # import hf, export hf, export gguf, lora merge, lora export
]

# verb groups: (help, what their sub-verb is called in usage lines)
GROUPS = {
    "eval": ("evaluate checkpoints", "VERB"),
    "data": ("corpora: list built-ins, prepare token shards", "VERB"),
    "tokenizer": ("train, inspect and measure a byte-level BPE tokenizer", "VERB"),
    "markov": ("n-gram (Markov chain) baseline: train, evaluate, sample", "VERB"),
    "import": ("import a model from another format", "FORMAT"),
    "export": ("export a checkpoint to another format", "FORMAT"),
    "lora": ("LoRA runs: merge the adapters into the base, export them for PEFT", "VERB"),
    "tool": ("the built-in tools a chat model may call: list them, run one", "VERB"),
    "reward": ("reward models: train one on preference pairs, score replies with it", "VERB"),
    "rag": ("retrieval-augmented generation: index documents, query them, answer with citations, measure retrieval",
            "VERB"),
}


# quickstart, the README's main job: the whole pipeline, so its verb lives at the front door
def _quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="YAML recipe (default: the built-in CPU quickstart)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. tokenizer.vocab_size=4096")


def _run_quickstart(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.quickstart import QuickstartConfig, default_recipe, run_quickstart

    cfg = load_config(QuickstartConfig, args.recipe or default_recipe(), list(args.overrides))
    run_quickstart(cfg, args.out)
    return 0


QUICKSTART = Verb(("quickstart",), "run the end-to-end pipeline on built-in data (recipes/cpu-quickstart.yaml)",
                  _quickstart_arguments, _run_quickstart)


def all_verbs() -> list[Verb]:
    verbs = [QUICKSTART]
    for name in VERB_MODULES:
        verbs += importlib.import_module(name).VERBS
    return verbs


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors (a missing option, a value out of its declared range) raised as a
    ConfigError: main() prints them as the same one line as every other error (exit code 2, as argparse's),
    pointing at --help instead of printing the usage block."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmforge", description="Take a language model through its whole life, on a laptop CPU or many GPUs.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    top = parser.add_subparsers(dest="verb", metavar="VERB")
    top.required = True
    groups = {(): top}  # verb path prefix -> the subparsers its verbs are added to

    def subparsers_of(path: tuple[str, ...]):
        if path not in groups:  # a group's parser is made when its first verb comes, so it is listed there
            help, metavar = GROUPS[" ".join(path)]
            group = subparsers_of(path[:-1]).add_parser(path[-1], help=help, description=help)
            groups[path] = group.add_subparsers(dest=f"{path[-1]}_verb", metavar=metavar)
            groups[path].required = True
        return groups[path]

    for verb in all_verbs():
        p = subparsers_of(verb.path[:-1]).add_parser(verb.path[-1], help=verb.help, description=verb.help)
        verb.arguments(p)
        p.set_defaults(_verb=verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        rc = args._verb.run(args)
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
