"""Supervised fine-tuning (stages/sft.py, `lmforge sft`): the gradient sees only assistant targets, a row's loss and
gradient are the same alone or right-padded in a batch, batches are deterministic and cover the data, held-out loss
is the masked token mean, long rows are refused (or cut with --truncate), an end-to-end run overfits a toy set into
a loadable chat checkpoint whose greedy answers end with <|end|>, an imported Hugging Face Llama fine-tunes in its
own template, built-in sources are wired through lmforge.data.tasks, and bad input is one line with nothing
written."""
from __future__ import annotations

import json
import os

import pytest
import torch

import lmforge
from lmforge import checkpoint
from lmforge.cli import main
from lmforge.data.chat import Conversation
from lmforge.errors import ConfigError, DataError
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.stages.sft import ChatRows, SFTConfig, SFTTask, collate, load_conversations, render_rows
from lmforge.tokenizer.bpe import GPT4_PATTERN
from lmforge.tokenizer.chat import END, render_chat
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = [{"prompt": "hi", "completion": "hello"},
       {"prompt": "2+2?", "completion": "4"},
       {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "cat?"},
                     {"role": "assistant", "content": "meow"}, {"role": "user", "content": "dog?"},
                     {"role": "assistant", "content": "woof"}]},
       {"prompt": "sky?", "completion": "blue"}]


def byte_tokenizer() -> Tokenizer:
    return Tokenizer([], GPT4_PATTERN)     # bytes + our specials: every text is its UTF-8 bytes


def tiny_model(tok, max_seq_len=64, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=48,
                                   max_seq_len=max_seq_len, init_std=0.1, **kw))


def convs(rows) -> list[Conversation]:
    from lmforge.data.chat import parse_row
    out = []
    for i, r in enumerate(rows):
        c = parse_row(r)
        c.file, c.line = "toy.jsonl", i + 1
        out.append(c)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# the loss: assistant targets only, and padding changes nothing

def grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x, y, m = batch
    _, loss = model(x, targets=y, loss_mask=m)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_ignores_every_non_assistant_target():
    tok = byte_tokenizer()
    model = tiny_model(tok)
    rows = render_rows(tok, convs(TOY), 63)
    x, y, m = collate(rows, [0, 1, 2, 3], tok.pad_id, "cpu")
    assert 0 < int(m.sum()) < int((y != -1).sum())    # some targets are masked out, some are not
    g = grads(model, (x, y, m))
    # any other token in every non-assistant target: the same gradient, bit for bit
    torch.manual_seed(1)
    other = torch.where((m == 0) & (y != -1), torch.randint_like(y, 0, tok.vocab_size), y)
    assert int(((other != y) & (m == 0)).sum()) > 10
    g2 = grads(model, (x, other, m))
    assert all(torch.equal(g[k], g2[k]) for k in g)
    # while changing one assistant target changes it (the comparison can fail)
    i, j = (m == 1).nonzero()[0].tolist()
    y3 = y.clone()
    y3[i, j] = (y3[i, j] + 1) % tok.vocab_size
    g3 = grads(model, (x, y3, m))
    assert any(not torch.equal(g[k], g3[k]) for k in g)


def test_a_rows_loss_and_gradient_are_the_same_alone_or_padded_in_a_batch():
    tok = byte_tokenizer()
    model = tiny_model(tok)
    rows = render_rows(tok, convs(TOY), 63)
    short = min(range(len(rows)), key=lambda i: len(rows.ids[i]))
    alone = collate(rows, [short], tok.pad_id, "cpu")
    batch = collate(rows, [2, short, 0], tok.pad_id, "cpu")   # the multi-turn row is the longest: right pads
    r = [2, short, 0].index(short)
    assert batch[0].shape[1] > alone[0].shape[1]
    x1, y1, m1 = alone
    xb, yb, mb = batch
    n = x1.shape[1]
    assert torch.equal(xb[r, :n], x1[0]) and bool((yb[r, n:] == -1).all())
    lt_alone = model(x1, targets=y1, loss_mask=m1, reduction="none")[1]
    lt_batch = model(xb, targets=yb, loss_mask=mb, reduction="none")[1]
    torch.testing.assert_close(lt_batch[r, :n], lt_alone[0], atol=1e-5, rtol=1e-5)
    assert float(lt_batch[r, n:].detach().abs().sum()) == 0.0

    def row_grad(x, y, m, row):
        model.zero_grad(set_to_none=True)
        model(x, targets=y, loss_mask=m, reduction="none")[1][row].sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}
    ga, gb = row_grad(x1, y1, m1, 0), row_grad(xb, yb, mb, r)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-6, rtol=1e-4, msg=k)


def test_batches_are_deterministic_bucketed_and_cover_each_epoch():
    tok = byte_tokenizer()
    rows = ChatRows([torch.arange(n).numpy() for n in range(3, 40)], [torch.ones(n).numpy() for n in range(3, 40)],
                    [([], None, "")] * 37)
    a = SFTTask(tok, rows, batch_size=4, seed=3, grad_accum=2)
    b = SFTTask(tok, rows, batch_size=4, seed=3, grad_accum=2)
    assert len(a._epoch_batches(0)) == 10
    seen = []
    for step in range(5):
        for micro in range(2):
            x, y, m = a.batch(step, micro)
            assert all(torch.equal(u, v) for u, v in zip((x, y, m), b.batch(step, micro)))
            seen += [int((row != -1).sum()) + 1 for row in y]          # each row's length
    assert sorted(seen) == list(range(3, 40))                          # one epoch: every row once
    # within a 64-batch bucket rows are sorted by length: here all 37 rows share one bucket, so every batch holds
    # neighbouring lengths and pads little
    x, y, _ = a.batch(0, 0)
    lengths = [int((row != -1).sum()) + 1 for row in y]
    assert max(lengths) - min(lengths) <= 3


def test_token_budget_batches_take_many_short_rows_and_few_long_ones():
    tok = byte_tokenizer()
    lengths = [4] * 60 + [50] * 10 + list(range(5, 45))
    rows = ChatRows([torch.arange(n).numpy() for n in lengths], [torch.ones(n).numpy() for n in lengths],
                    [([], None, "")] * len(lengths))
    a = SFTTask(tok, rows, batch_size=8, seed=1, batch_tokens=60)
    b = SFTTask(tok, rows, batch_size=8, seed=1, batch_tokens=60)
    per_epoch = len(a._epoch_batches(0))
    seen, sizes = [], []
    for g in range(2 * per_epoch + 3):     # over an epoch boundary and into the third epoch
        x, y, m = a.batch(g, 0)
        assert all(torch.equal(u, v) for u, v in zip((x, y, m), b.batch(g, 0)))
        assert x.numel() <= 60 or x.shape[0] == 1                      # the budget, or one row longer than it
        if g < per_epoch:
            seen += [int((row != -1).sum()) + 1 for row in y]
            sizes.append((x.shape[1], x.shape[0]))
    assert sorted(seen) == sorted(lengths)                             # one epoch: every row once
    assert max(n for t, n in sizes if t == 3) >= 10 and all(n == 1 for t, n in sizes if t == 49)
    assert SFTTask(tok, rows, batch_size=8, seed=1, batch_tokens=60).batch(per_epoch + 1, 0)[0].shape == \
        a.batch(per_epoch + 1, 0)[0].shape                             # any step, without the ones before
    with pytest.raises(ConfigError, match="batch_tokens"):
        SFTConfig(batch_tokens=0)


def test_evaluate_is_the_masked_token_mean():
    tok = byte_tokenizer()
    model = tiny_model(tok).eval()
    rows = render_rows(tok, convs(TOY), 63)
    task = SFTTask(tok, rows, rows, batch_size=2, eval_batch_size=3)
    with torch.no_grad():
        got = task.evaluate(model)["val_loss"]
        num = den = 0.0
        for i in range(len(rows)):          # one row at a time, no padding at all
            x, y, m = collate(rows, [i], tok.pad_id, "cpu")
            num += float(model(x, targets=y, loss_mask=m, reduction="sum")[1])
            den += float(m.sum())
    assert got == pytest.approx(num / den, rel=1e-5)


def test_long_rows_are_refused_or_truncated():
    tok = byte_tokenizer()
    long = convs(TOY + [{"prompt": "x" * 100, "completion": "y"}])
    with pytest.raises(DataError) as e:
        render_rows(tok, long, 63)
    assert str(e.value).startswith("toy.jsonl:5: conversation of ") and "--truncate" in str(e.value)
    rows = render_rows(tok, long, 63, truncate=True)   # cut before the reply: nothing to learn, dropped
    assert len(rows) == 4 and max(len(r) for r in rows.ids) <= 64
    cut = render_rows(tok, convs([{"prompt": "q", "completion": "z" * 100}]), 31, truncate=True)
    assert len(cut.ids[0]) == 32 and cut.mask[0][-1] == 1


def test_sources_files_and_builtins(tmp_path):
    f = write_jsonl(tmp_path / "chats.jsonl", TOY * 10)
    train_c, val_c = load_conversations([str(f), "arithmetic:digits=1"], source_n=7, val_fraction=0.5, val_n=3,
                                        seed=0)
    from_file = [c for c in train_c + val_c if c.file == str(f)]
    assert len(from_file) == 40 and 0 < sum(c in val_c for c in from_file) < 40
    # the hash split is by content: identical rows land on the same side
    assert {json.dumps(c.messages) for c in val_c if c.file == str(f)}.isdisjoint(
        {json.dumps(c.messages) for c in train_c if c.file == str(f)})
    arith_train = [c for c in train_c if c.file.startswith("arithmetic")]
    arith_val = [c for c in val_c if c.file.startswith("arithmetic")]
    assert len(arith_train) == 7 and len(arith_val) == 3
    assert all(c.messages[-1]["role"] == "assistant" for c in arith_train)
    with pytest.raises(ConfigError, match="neither a file nor a built-in source"):
        load_conversations(["nosuchsource"], source_n=1, val_fraction=0, val_n=0, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tok = byte_tokenizer()
    model = tiny_model(tok)
    checkpoint.save(d / "base", model=model, model_config=model.config.to_dict(), tokenizer=tok)
    write_jsonl(d / "toy.jsonl", TOY)
    return d


FAST = ["train.threads=1", "train.precision=fp32", "train.progress=false", "train.batch_size=4",
        "train.warmup_steps=5", "train.log_every=10", "val_fraction=0"]


def test_end_to_end_overfits_a_toy_set_into_a_chat_checkpoint(base, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sft", "--checkpoint", str(base / "base"), "--data", str(base / "toy.jsonl"), "--out", str(out),
               "train.max_steps=60", "train.lr=1e-2", "train.sample_every=30", *FAST])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "sft: 60 steps on 4 conversations" in printed and "'dog?' -> 'woof<|end|>'" in printed
    config = checkpoint.read_config(out)
    assert config["stage"] == "sft" and config["chat"] == {"template": "lmforge", "end_of_turn": END,
                                                           "end_of_turn_id": byte_tokenizer().special_tokens[END]}
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.2 * losses[0]
    assert any("samples" in r for r in read_metrics(out / "metrics.jsonl"))
    # a normal checkpoint: the one loader reads it; greedy answers are the demonstrations, ending at <|end|>
    model, tok = lmforge.load(out, device="cpu")
    eot = tok.special_tokens[END]
    gc = json.loads((out / "checkpoint" / "generation_config.json").read_text())
    assert gc["stop_token_ids"] == [eot]
    for row in TOY:
        msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["completion"]}]
        ids, _ = render_chat(tok, msgs[:-1], add_generation_prompt=True)   # multi-turn: the earlier turns too
        res = generate(model, tok, ids, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[eot]),
                       add_bos=False)
        assert res.finish_reason == "stop" and res.token_ids[-1] == eot
        assert res.text == msgs[-1]["content"]


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def save_hf_llama(tmp_path):
    """A tiny Hugging Face Llama directory: a byte-level Llama-3-style tokenizer.json (written by `tokenizers`, no
    merges: quick to build) with the Llama 3 chat template, and a LlamaForCausalLM config + weights written by our
    HF export (which tests/test_interop_hf.py checks transformers loads). Importing transformers' model code would
    cost more than this whole test."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from lmforge.interop.hf import export_hf
    from lmforge.interop.hf_tokenizer import read_hf_tokenizer
    src = tmp_path / "tokenizer-src"
    src.mkdir()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(LLAMA3_SPECIALS)
    t.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                           "chat_template": LLAMA3_TEMPLATE}))
    tok = read_hf_tokenizer(src)
    model = tiny_model(tok, max_seq_len=128, tie_embeddings=False)
    checkpoint.save(tmp_path / "ck", model=model, model_config=model.config.to_dict(), tokenizer=tok)
    hf = export_hf(tmp_path / "ck", tmp_path / "hf", progress=False)
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    return hf


def test_imported_hf_llama_fine_tunes_in_its_own_template(tmp_path, capsys):
    hf = save_hf_llama(tmp_path)
    out = tmp_path / "run"
    rc = main(["sft", "--checkpoint", str(hf), "--data", str(write_jsonl(tmp_path / "toy.jsonl", TOY)),
               "--out", str(out), "train.max_steps=30", "train.lr=1e-2", "sample_n=1", "sample_tokens=8", *FAST])
    assert rc == 0, capsys.readouterr().err
    config = checkpoint.read_config(out)
    assert config["chat"]["template"] == "hf" and config["chat"]["end_of_turn"] == "<|eot_id|>"
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    model, tok = lmforge.load(out, device="cpu")
    assert tok.chat_template == LLAMA3_TEMPLATE          # the model keeps its own template
    ids, mask = render_chat(tok, TOY[2]["messages"])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "meow<|eot_id|>woof<|eot_id|>"


def _ddp_child(rank: int, port: int, argv: list[str]) -> None:
    """One process of a 2-process gloo group, as torchrun would start it (forked: torch is already imported)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rc = 1
    try:
        rc = main(argv)
    finally:
        os._exit(rc)


def test_two_processes_match_one_with_accumulation(base, tmp_path, capsys):
    """DDP over gloo, 2 processes x 1 micro-batch == 1 process x 2 micro-batches (the same batches, the same
    averaged gradient; only the all-reduce's summation order differs)."""
    import multiprocessing
    import socket

    args = ["sft", "--checkpoint", str(base / "base"), "--data", str(base / "toy.jsonl"), "train.max_steps=3",
            "train.grad_accum=2", "train.batch_size=2", "train.log_every=1", "train.lr=1e-2", "sample_n=0",
            *[a for a in FAST if "log_every" not in a and "batch_size" not in a]]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ddp_child, args=(r, port, [*args, "--out", str(tmp_path / "two")])) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0], capsys.readouterr().err[-2000:]
    la = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert len(la) == len(lb) == 3 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-4, (la, lb)
    assert json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written

@pytest.mark.parametrize("rows, words", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "toy.jsonl:2: no assistant turn"),
    ([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     "toy.jsonl:2: messages[0]: unknown role 'wizard'"),
    ([{"prompt": "long " * 30, "completion": "x"}], "toy.jsonl:2: conversation of"),
    (None, "'nosuchsource' is neither a file nor a built-in source"),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys, rows, words):
    data = str(write_jsonl(tmp_path / "toy.jsonl", TOY[:1] + rows)) if rows else "nosuchsource"
    out = tmp_path / "run"
    rc = main(["sft", "--checkpoint", str(base / "base"), "--data", data, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()
