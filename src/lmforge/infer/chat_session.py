"""The terminal chat behind `lmforge chat`: a conversation kept within the model's context, and the loop that
reads a line, streams the reply and runs tools.

    chat = ChatSession(engine, tok, params, tools=get_tools("calculator"), system="Be brief.")
    chat.ask("What is 12345 * 678?", on_event=print_event)         # one turn: new messages, history kept
    interactive(chat)                                              # the terminal loop

Context: before each turn the oldest turns (a user message and all that answered it) are dropped until the
rendered conversation plus the reply budget fits the model's context; the budget counted for this is
min(max_tokens, half the context), so a large --max-tokens does not empty the history. The newest message is
always kept (a reply that then runs out of room is cut, finish "length"); a message that cannot fit even alone is
refused. Interactive commands: /reset (forget the conversation, keep the system message), /system TEXT (set or,
without TEXT, remove the system message), /exit (or end of input). Ctrl-C during a reply stops that reply (the
engine request is aborted; what was said so far stays in the history); at the prompt it clears the line.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.assistant import OnEvent, as_tools, check_tool_use, run_chat_turn
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import to_openai
from lmforge.tokenizer.chat import render_chat
from lmforge.verbs import clean_text

COMMANDS = "/reset, /system TEXT, /exit"


class ChatSession:
    """A multi-turn conversation with one model: history, system message, tools, sampling."""

    def __init__(self, engine: Engine, tok, params: SamplingParams | None = None, tools=(),
                 system: str | None = None, max_tool_rounds: int = 4, tool_choice: str = "auto"):
        self.engine, self.tok = engine, tok
        self.params = params or SamplingParams()
        self.tools = as_tools(tools)
        check_tool_use(tok, self.tools)
        self.system = system or None
        self.max_tool_rounds, self.tool_choice = max_tool_rounds, tool_choice
        self.history: list[dict] = []
        self.context = engine.model.config.max_seq_len
        self._declared = [to_openai(t) for t in self.tools] or None
        self.prompt_tokens([])  # a tokenizer that cannot render chats fails here, before the first question

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self, extra: list[dict] = (), history: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if history is None else history) + list(extra)

    def prompt_tokens(self, extra: list[dict], history: list[dict] | None = None) -> int:
        """Tokens of the conversation (plus `extra`) rendered with the generation prompt."""
        ids, _ = render_chat(self.tok, self.messages(extra, history), self._declared, add_generation_prompt=True)
        return len(ids)

    def reserve(self) -> int:
        """Reply tokens counted when fitting the history (see the module docstring)."""
        return min(self.params.max_tokens or self.context, self.context // 2)

    def fit(self, user: dict) -> int:
        """Drop the oldest turns until the conversation plus `user` leaves room for a reply; returns how many
        turns were dropped. A message that cannot fit even alone is a ConfigError (nothing is dropped then)."""
        alone = self.prompt_tokens([user], history=[])
        if alone >= self.context:
            raise ConfigError(f"this message needs {alone} tokens with the system message and tools, but the "
                              f"model's context holds {self.context}: not sent", field="message")
        dropped = 0
        while self.history and self.prompt_tokens([user]) + self.reserve() > self.context:
            nxt = next((i for i, m in enumerate(self.history) if i > 0 and m["role"] == "user"), len(self.history))
            self.history = self.history[nxt:]
            dropped += 1
        return dropped

    def ask(self, text: str, on_event: OnEvent | None = None, should_stop: Callable[[], bool] | None = None
            ) -> list[dict]:
        """One turn: the user's `text`, the model's reply (and tool rounds). Returns the new messages (the user
        message first), which are added to the history."""
        user = {"role": "user", "content": text}
        dropped = self.fit(user)
        if dropped and on_event is not None:
            on_event("dropped", dropped)
        new = run_chat_turn(self.engine, self.tok, self.messages([user]), self.tools, self.params,
                            max_tool_rounds=self.max_tool_rounds, tool_choice=self.tool_choice, on_event=on_event,
                            should_stop=should_stop)
        self.history += [user] + new
        return [user] + new


# ---------------------------------------------------------------------------------------------------------------
# the terminal

def printer(out=None, trace=None) -> OnEvent:
    """An on_event that streams reply text to `out` and tool calls, results and notes to `trace`."""
    def on_event(kind: str, value) -> None:
        o, t = out or sys.stdout, trace or sys.stderr
        if kind == "text":
            o.write(value)
            o.flush()
        elif kind == "tool_call":
            fn = value["function"]
            t.write(f"\n[tool call] {fn['name']} {json.dumps(fn['arguments'], ensure_ascii=False)}\n")
        elif kind == "tool_result":
            t.write(f"[tool result] {value['content']}\n")
        elif kind == "dropped":
            t.write(f"[history: dropped the oldest {value} turn{'s' * (value > 1)} to fit the context]\n")
        elif kind == "finish" and value != "stop":
            t.write({"length": "\n[cut: the reply reached its token limit]",
                     "abort": "\n[stopped]"}.get(value, f"\n[{value}]") + ("\n" if t is not o else ""))
        t.flush()
    return on_event


@contextmanager
def _on_sigint(handler):
    """SIGINT goes to `handler` inside the block (only the main thread may set handlers: elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ask_interruptibly(chat: ChatSession, text: str, on_event: OnEvent) -> list[dict]:
    """chat.ask with Ctrl-C (SIGINT) stopping the reply instead of the program."""
    stop = threading.Event()
    with _on_sigint(lambda *_: stop.set()):
        return chat.ask(text, on_event, stop.is_set)


def interactive(chat: ChatSession, banner: str = "", read: Callable[[str], str] = input, out=None) -> int:
    """Read lines and answer them until /exit or the end of input. Returns the exit code (0)."""
    out = out or sys.stdout
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    show = printer(out, out)
    if banner:
        out.write(banner + "\n")
    # Python's own handler, so that Ctrl-C at the prompt drops the line even when lmforge was started with SIGINT
    # ignored (as a background job of a non-interactive shell is): Python then never raises KeyboardInterrupt
    with _on_sigint(signal.default_int_handler):
        while True:
            try:
                line = clean_text(read("> "), "input")
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("^C\n")
                continue
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "/exit":
                return 0
            if cmd == "/reset":
                chat.reset()
                out.write("[conversation cleared]\n")
            elif cmd == "/system":
                chat.set_system(arg.strip())
                out.write(f"[system message {'set' if arg.strip() else 'removed'}]\n")
            elif cmd.startswith("/"):
                out.write(f"[unknown command {cmd}; commands: {COMMANDS}]\n")
            elif line.strip():
                try:
                    ask_interruptibly(chat, line, show)
                except LmforgeError as e:
                    out.write(f"[error: {e}]")
                out.write("\n")
            out.flush()


__all__ = ["ChatSession", "printer", "ask_interruptibly", "interactive", "COMMANDS"]
