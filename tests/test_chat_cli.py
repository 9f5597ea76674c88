"""`lmforge chat` as a user meets it: the real program driven through a pseudo-terminal (two turns and more, the
history trimmed to the context on screen, /reset, /system, an unknown command, Ctrl-C during an answer and at the
prompt, /exit and end of input), and `--message` for one scripted turn (with a tool call), checked against the
library's own answer.

The test models are untrained, with the chat tokens' rows of the LM head zeroed: greedy decoding then never
ends a reply by itself, so every answer runs to its token limit — short ones for the conversation, one as long as
a 4096-token context for Ctrl-C to stop.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint, load
from lmforge.cli import main
from lmforge.infer.assistant import run_chat_turn
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(autouse=True)
def pytorch_decode_step(monkeypatch):
    """The chat mechanics do not depend on the decode kernel: use the PyTorch step (same logits) rather than wait
    for the native one to be compiled (a one-time build, minutes on a loaded machine)."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")


TEXT = "The quick brown fox jumps over the lazy dog. 12 + 34 = 46. What is 7 * 8? It is 56.\n"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"small": a 96-token context, "long": 4096}: the same untrained weights."""
    d = tmp_path_factory.mktemp("chat")
    tok = Tokenizer.train([TEXT * 30], vocab_size=256 + 16 + 40, progress=False)
    out = {}
    for name, ctx in (("small", 96), ("long", 4096)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                                        max_seq_len=ctx, init_std=0.3, tie_embeddings=False))
        with torch.no_grad():
            for i in tok.special_tokens.values():   # no <|end|> (nor any marker) under greedy decoding
                model.lm_head.weight[i] = 0
        out[name] = checkpoint.save(d / name, model=model, model_config=model.config.to_dict(), tokenizer=tok)
    return out


def _env():
    # LMFORGE_NATIVE=0 (set by the fixture above) travels to the program
    env = dict(os.environ, TERM="dumb", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("PYTHONSTARTUP", None)
    return env


class Terminal:
    """The chat program on the slave side of a pty; we read and type on the master side."""

    def __init__(self, *args: str, sigint: object = signal.SIG_DFL):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the real program, with the pty as its controlling terminal
            signal.signal(signal.SIGINT, sigint)   # as a shell would start it (SIG_IGN: as a background job)
            os.execve(sys.executable, [sys.executable, "-m", "lmforge", "chat", *args], _env())
        self.buf, self.pos = "", 0

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        """Wait for `pattern` (a regex) in the output after what earlier expects consumed."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} in the output; after the last match it was:\n"
                                     f"{self.buf[self.pos:]!r}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:   # EIO: the program closed the terminal (exited)
            return False
        self.buf += data.decode("utf-8", "replace")
        return bool(data)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        self.kill()
        raise AssertionError(f"the program did not exit; its output ended with {self.buf[-500:]!r}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminals():
    started = []

    def start(*args, **kw):
        t = Terminal(*map(str, args), **kw)
        started.append(t)
        return t
    yield start
    for t in started:
        t.kill()


PROMPT = r"\n> "
TURN_DONE = r"\[cut: the reply reached its token limit\]\r?\n> "


def test_conversation_through_a_terminal(ckpts, terminals):
    t = terminals("--checkpoint", ckpts["small"], "--temperature", "0", "--max-new-tokens", "8")
    t.expect(r"96 tokens of context\). Commands: /reset, /system TEXT, /exit")
    t.expect(PROMPT)
    t.type("hello\n")                            # turn 1: streamed, ends at the token limit, back at the prompt
    t.expect(TURN_DONE)
    t.type("and then?\n")                        # turn 2, on top of turn 1
    turn2 = t.expect(TURN_DONE)
    assert "history: dropped" not in t.buf
    for i in range(6):                           # the context (96 tokens) fills: the oldest turns go, on screen
        t.type(f"question number {i}\n")
        t.expect(TURN_DONE)
        if "[history: dropped the oldest" in t.buf[turn2.end():]:
            break
    else:
        raise AssertionError(f"the history was never trimmed:\n{t.buf}")
    t.type("/reset\n")
    t.expect(r"\[conversation cleared\]\r?\n> ")
    mark = t.pos
    t.type("fresh start\n")                      # nothing left to drop after /reset
    t.expect(TURN_DONE)
    assert "history: dropped" not in t.buf[mark:]
    t.type("/system Answer briefly.\n")
    t.expect(r"\[system message set\]\r?\n> ")
    t.type("/system\n")
    t.expect(r"\[system message removed\]\r?\n> ")
    t.type("/nonsense\n")
    t.expect(r"\[unknown command /nonsense; commands: /reset, /system TEXT, /exit\]\r?\n> ")
    t.type("/exit\n")
    assert t.wait() == 0


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "sigint-ignored"])
def test_ctrl_c_stops_the_answer_not_the_program(ckpts, terminals, inherited):
    t = terminals("--checkpoint", ckpts["long"], "--temperature", "0", "--max-new-tokens", "4000", sigint=inherited)
    t.expect(PROMPT)
    for turn in ("tell me a long story\n", "another one\n"):
        t.type(turn)
        t.expect(re.escape(turn.strip()) + r"\r?\n")    # the terminal's echo of the line
        t.expect(r"[^\n]{20}")                            # the answer is streaming...
        t0 = time.monotonic()
        t.type("\x03")                                    # Ctrl-C: the terminal sends SIGINT
        stopped = t.expect(r"\[stopped\]\r?\n> ")
        assert time.monotonic() - t0 < 30
        answer = t.buf[:stopped.start()].rsplit(turn.strip(), 1)[1]
        assert len(answer) < 3000                         # far from its 4000-token limit
    t.type("\x03")                                        # at the prompt: the line is dropped, the chat goes on
    t.expect(r"\^C\r?\n> ")
    t.type("/reset\n")
    t.expect(r"\[conversation cleared\]")
    os.write(t.fd, b"\x04")                               # Ctrl-D (end of input) leaves too
    assert t.wait() == 0
    assert "Traceback" not in t.buf and "interrupted" not in t.buf


def _chat(capsys, *args):
    """`lmforge chat ARGS` in this process: (exit code, stdout, stderr)."""
    rc = main(["chat", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_one_message_matches_the_library(ckpts, capsys):
    """--message: the answer on stdout (the same text as run_chat_turn gives), notes on stderr, exit 0."""
    rc, out, err = _chat(capsys, "--checkpoint", ckpts["small"], "--message", "Say hello.", "--temperature", "0",
                         "--max-new-tokens", "7", "--system", "Be kind.")
    assert rc == 0, err
    model, tok = load(ckpts["small"])
    new = run_chat_turn(model, tok, [{"role": "system", "content": "Be kind."},
                                     {"role": "user", "content": "Say hello."}],
                        params=SamplingParams(temperature=0, max_tokens=7))
    assert out == new[-1]["content"] + "\n" and new[-1]["content"]
    assert err.strip() == "[cut: the reply reached its token limit]"


def test_one_message_with_a_tool_call(ckpts, capsys):
    """--tools calculator --tool-choice required: the call and its result on stderr, the final answer on stdout,
    each the same as the library's turn."""
    rc, out, err = _chat(capsys, "--checkpoint", ckpts["long"], "--message", "What is 2+2?", "--tools", "calculator",
                         "--tool-choice", "required", "--max-tool-rounds", "1", "--temperature", "0",
                         "--max-new-tokens", "600")
    assert rc == 0, err
    model, tok = load(ckpts["long"])
    new = run_chat_turn(model, tok, [{"role": "user", "content": "What is 2+2?"}], ["calculator"],
                        SamplingParams(temperature=0, max_tokens=600), max_tool_rounds=1, tool_choice="required")
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"]
    call = new[0]["tool_calls"][0]["function"]
    assert f"[tool call] calculator {json.dumps(call['arguments'], ensure_ascii=False)}\n" in err
    assert f"[tool result] {new[1]['content']}\n" in err
    assert out == new[2]["content"] + "\n"


def test_one_message_errors_are_one_line(ckpts, capsys):
    for args, why in [(["--tools", "calculator"], "context holds 96"),     # the tools alone overflow 96 tokens
                      (["--tool-choice", "required"], "--tool-choice required needs --tools"),
                      (["--tools", "calculator,abacus"], "unknown tool 'abacus'")]:
        rc, out, err = _chat(capsys, "--checkpoint", ckpts["small"], "--message", "hi", *args)
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and why in err
