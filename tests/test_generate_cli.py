"""`lmforge generate` modes: --n, a grammar, best-of / self-consistency / beam, speculative, and their errors."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.infer.engine import Engine
from lmforge import load
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.search import beam_search, best_of_n
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = 'In the beginning God created the heaven and the earth. {"name": "Ada", "age": 36} 1 2 3 42\n'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmforge.checkpoint import save as save_checkpoint
    tok = Tokenizer.train([TEXT * 30], vocab_size=272 + 50, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                                    max_seq_len=96, init_std=0.3))
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    save_checkpoint(path, model=model, model_config=model.config.to_dict(), tokenizer=tok)
    return path


def run(capsys, *argv):
    rc = main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_n_completions_match_the_engine(ckpt, capsys):
    rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "In the", "--n", "3", "--seed", "4",
                       "--max-new-tokens", "6", "--temperature", "0.9", "--ignore-eos")
    assert rc == 0 and "3 completions" in err
    model, tok = load(ckpt, device="cpu")
    expected = Engine(model, tok).generate(["In the"], SamplingParams(n=3, seed=4, max_tokens=6, temperature=0.9,
                                                                       ignore_eos=True))[0]
    for i, r in enumerate(expected):
        assert f"--- completion {i} (length) ---\n{r.text}\n" in out


def test_json_schema_and_choices(ckpt, tmp_path, capsys):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    for seed in range(3):
        rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "{", "--json-schema", str(f),
                           "--seed", str(seed), "--max-new-tokens", "80")
        assert rc == 0, err
        jsonschema.validate(json.loads(out), schema)
    rc, out, _ = run(capsys, "--checkpoint", str(ckpt), "--prompt", "In", "--choices", "heaven", "earth",
                     "--seed", "1")
    assert rc == 0 and out.strip() in ("heaven", "earth")


def test_search_modes_print_the_library_answer(ckpt, capsys):
    model, tok = load(ckpt, device="cpu")
    rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "In the", "--beam", "3",
                       "--max-new-tokens", "8")
    best = beam_search(model, tok, "In the", n_beams=3, max_tokens=8, progress=False).best
    assert rc == 0 and out == best.text + "\n" and "beam 3" in err
    rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "In the", "--best-of", "4", "--seed", "2",
                       "--max-new-tokens", "8", "--temperature", "1")
    best = best_of_n(model, tok, "In the", SamplingParams(n=4, seed=2, max_tokens=8, temperature=1),
                     progress=False).best
    assert rc == 0 and out == best.text + "\n" and "mean lp" in err
    rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "1 2 3", "--self-consistency", "5",
                       "--seed", "0", "--max-new-tokens", "8")
    assert rc == 0 and "votes:" in err


def test_speculative_prompt_lookup_is_greedy_identical(ckpt, capsys):
    args = ["--checkpoint", str(ckpt), "--prompt", "the heaven and the earth. the heaven and",
            "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"]
    rc, plain, _ = run(capsys, *args)
    rc2, spec, err = run(capsys, *args, "--lookahead", "3")
    assert rc == rc2 == 0 and plain == spec and "prompt lookup" in err and "accepted" in err
    rc3, draft, err = run(capsys, *args, "--draft-checkpoint", str(ckpt))
    assert rc3 == 0 and draft == plain and "100% of proposed tokens accepted" in err


@pytest.mark.parametrize("extra, message", [
    (["--beam", "2", "--best-of", "2"], "cannot be combined"),
    (["--beam", "2", "--n", "2"], "--n is for plain sampling"),
    (["--regex", "a+", "--choices", "x"], "give one of --json-schema, --regex, --choices"),
    (["--regex", "a+", "--beam", "2"], "works with plain sampling"),
    (["--json-schema", "missing.json"], "JSON schema file not found"),
    (["--regex", "(unclosed"], "regex"),
    (["--logit-bias", "5:1"], "expected TOKEN_ID=BIAS"),
    (["--beam", "0"], "argument --beam: must be >= 1"),
])
def test_bad_combinations_are_one_line_errors(ckpt, capsys, extra, message):
    if any(a in extra for a in ("--regex", "--json-schema")):
        pytest.importorskip("llguidance")
    rc, out, err = run(capsys, "--checkpoint", str(ckpt), "--prompt", "x", *extra)
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
