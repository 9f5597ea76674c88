"""`lmforge serve`: an OpenAI-compatible HTTP server over the continuous-batching engine, with a web UI.

app.py (routes) -> handlers.py (completions, chat, tool calls) -> loop.py (the one engine thread);
openai_api.py (request bodies, response shapes), inspect_api.py (tokenize, attention), metrics.py (Prometheus),
static/ (the UI). The verb is in cli.py.
"""
