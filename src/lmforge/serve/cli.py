"""`lmforge serve`: load a checkpoint and serve it over HTTP (OpenAI API, metrics, web UI) until interrupted.

The socket is bound here, before the model is loaded, so a port in use or a bad host is a one-line error (exit 2)
at once; --port 0 takes a free port, and the line printed at start says which.
"""
from __future__ import annotations

import argparse

from lmforge.errors import ConfigError
from lmforge.verbs import Verb, add_device_option, positive_int


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {n}")
    return n


def serve_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or run) directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="most completions decoding at once (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="most requests waiting for a batch row; more are refused with 429 (default 64)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients use (default: the checkpoint directory's name)")
    add_device_option(p)
    p.add_argument("--prefix-cache-mb", type=float, default=256, metavar="MB",
                   help="memory for the keys/values of prompt prefixes seen before (a system prompt, the earlier "
                        "turns of a chat), reused instead of prefilled again; 0 turns it off (default 256)")
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | fp16 | auto (autocast)")
    p.add_argument("--rag-db", default=None, metavar="FILE.sqlite",
                   help="an index (lmforge rag index): chat requests with \"rag\": true are answered from it, with "
                        "their sources")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log level (default warning)")


def _listen(host: str, port: int):
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve {host!r}: {e.strerror}", field="host") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}", field="port") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    from pathlib import Path

    name = args.served_model_name if args.served_model_name is not None else Path(args.checkpoint).resolve().name
    if not name.strip():
        raise ConfigError("must not be empty", field="served_model_name")
    try:
        import uvicorn

        from lmforge.serve.app import create_app
    except ImportError as e:
        raise ConfigError(f"lmforge serve needs the server packages ({e.name} is missing): "
                          "pip install 'lmforge[serve]'") from None
    import dataclasses

    import lmforge
    from lmforge import checkpoint
    from lmforge.infer.sampling import SamplingParams, params_from_generation_config
    from lmforge.interop.hf import is_hf_dir

    path = args.checkpoint if is_hf_dir(args.checkpoint) else checkpoint.resolve(args.checkpoint)
    # the checkpoint's sampling defaults (generation_config.json), as `lmforge generate` uses them
    gen = params_from_generation_config(path)
    base = SamplingParams()
    defaults = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)
                if getattr(gen, f.name) != getattr(base, f.name)}
    sock = _listen(args.host, args.port)
    rag = None
    try:
        if args.rag_db is not None:      # the index first: a bad file fails before the model loads
            from lmforge.rag import Index
            from lmforge.rag.cli import load_embedder
            rag = Index(args.rag_db, load_embedder(None, args.rag_db), create=False)
            rag.stats()
        model, tokenizer = lmforge.load(path, device=args.device)
        app = create_app(model, tokenizer, name=name, api_key=args.api_key, max_batch=args.max_batch,
                         max_queue=args.max_queue, defaults=defaults, precision=args.precision,
                         prefix_cache_mb=args.prefix_cache_mb, rag=rag)
    except BaseException:
        sock.close()
        if rag is not None:
            rag.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lmforge serve: {name!r} on http://{shown}:{port} (web UI at /, OpenAI API at /v1, /health, /metrics)"
          + (f"; retrieval from {args.rag_db}" if rag is not None else ""), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_keep_alive=30))
    server.run(sockets=[sock])
    return 0


VERBS = [
    Verb(("serve",), "serve a checkpoint over HTTP: OpenAI-compatible API (streaming), metrics and a web UI",
         serve_arguments, cmd_serve),
]
