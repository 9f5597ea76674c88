"""Constrained decoding: a RANDOM-weight model sampled at temperature 1 under a grammar must still produce only
valid outputs (the constraint does all the work), stop when the grammar completes, and never emit a special token
inside the text. Every JSON output is checked with `jsonschema`, every regex output with `regex.fullmatch`."""
from __future__ import annotations

import json

import jsonschema
import pytest
import regex
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer import constrained
from lmforge.infer.constrained import Grammar
from lmforge.infer.request import end_token_ids
from lmforge.infer.sampling import SamplingParams, process_logits, sample
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

BUDGET = 320          # tokens per generation; every test schema is bounded well below it
PAD = 12              # the model's vocabulary is padded past the tokenizer's: padding ids must never be sampled
PROMPTS = ["Answer in JSON:", "Here is the record you asked for.\n", "{"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    # python-docs prose plus a little JSON, so that some tokens straddle grammar boundaries ('": "', '", "')
    from lmforge.data.corpus import python_docs
    docs = [d for _, d in zip(range(40), python_docs())]
    docs += [json.dumps({"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": True, "x": None})] * 20
    return Tokenizer.train(docs, vocab_size=700, progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # init_std 0.3: peaky, arbitrary preferences, so the mask, not the model, decides what is valid
    cfg = ModelConfig(vocab_size=tok.vocab_size + PAD, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                      max_seq_len=512, init_std=0.3)
    return Transformer(cfg).eval()


def run(model, tok, grammar: Grammar, prompt: str, seed: int, budget: int = BUDGET):
    """Sample under the grammar; check the mask's invariants at every step. Returns (ids, finish) where finish
    is 'done' (the grammar cannot continue), 'eos' (an end token was drawn where the grammar may end) or 'length'."""
    m = grammar.matcher()
    V, Vm = tok.vocab_size, model.config.vocab_size
    ends = end_token_ids(tok)
    others = [i for i in range(V) if tok.is_special(i) and i not in ends]
    params, gen = SamplingParams(temperature=1.0), torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt, bos=True)
    cache = model.new_kv_cache(1, max_len=len(ids) + budget)
    out: list[int] = []
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]), kv_cache=cache, logits_to_keep=1)
        while len(out) < budget:
            raw = logits[:, -1, :].float()
            allowed = m.allowed_mask(Vm)
            assert allowed.shape == (Vm,) and allowed.dtype == torch.bool and allowed.any()
            assert not allowed[V:].any(), "model padding ids allowed"
            assert not allowed[others].any(), "a special token allowed inside constrained text"
            assert allowed[ends].all() == m.can_end() and allowed[ends].any() == m.can_end()
            if m.is_done():
                assert allowed.sum() == len(ends)
            masked = m.apply(raw)  # in place
            assert masked.data_ptr() == raw.data_ptr()
            assert torch.equal(torch.isfinite(masked[0]), allowed)
            t = int(sample(process_logits(masked, params), [gen])[0])
            can_end = m.can_end()
            m.accept(t)
            if t in ends:
                assert can_end
                return out, "eos"
            out.append(t)
            if m.is_done():
                return out, "done"
            logits, _ = model(torch.tensor([[t]]), kv_cache=cache, logits_to_keep=1)
    return out, "length"


# ---------------------------------------------------------------------------------------------------------------
# JSON schemas: bounded (maxLength, maxItems, integer ranges, additionalProperties false) so a random model
# finishes; unbounded numbers at the top level end by EOS, which the grammar allows as soon as they are complete.

def obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


NAME = {"type": "string", "maxLength": 8}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCHEMAS = {
    "flat_object": obj({"name": NAME, "age": AGE}),
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", None, True, 3.5]},
    "const": {"const": {"version": 2, "kind": "point"}},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "integer_range": {"type": "integer", "minimum": -50, "maximum": 50},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
    "number_range": obj({"x": {"type": "number", "minimum": -1, "maximum": 1},
                         "y": {"type": "number", "minimum": 0, "maximum": 100}}),
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 6},
    "string_date": {"type": "string", "format": "date"},
    "optional_properties": obj({"id": AGE, "nick": NAME, "admin": {"type": "boolean"}}, required=["id"]),
    "nested_object": obj({"name": NAME, "address": obj({
        "city": {"enum": ["Oslo", "Lima", "Pune"]},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "geo": obj({"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180}})})}),
    "array_of_integers": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                          "minItems": 1, "maxItems": 4},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({
        "id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["new", "old"]}})},
    "nested_arrays": {"type": "array", "minItems": 1, "maxItems": 3,
                      "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
    "tuple_prefix_items": {"type": "array", "prefixItems": [AGE, NAME, {"type": "boolean"}],
                           "items": False, "minItems": 3},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 4},
                         {"type": "null"}]},
    "one_of_tagged": {"oneOf": [obj({"shape": {"const": "circle"}, "r": AGE}),
                                obj({"shape": {"const": "rect"}, "w": AGE, "h": AGE})]},
    "type_list": obj({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    "refs": {"$defs": {"pt": obj({"x": AGE, "y": AGE})}, **obj({"a": {"$ref": "#/$defs/pt"},
                                                                 "b": {"$ref": "#/$defs/pt"}})},
    "tool_call": obj({"name": {"enum": ["get_weather", "search"]},
                      "arguments": obj({"query": NAME, "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                                        "units": {"enum": ["C", "F"]}}, required=["query"])}),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": {"type": "array", "maxItems": 2,
                                                             "items": {"enum": [0, 1]}}})})})}),
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(model, tok, name):
    schema = SCHEMAS[name]
    grammar = Grammar.json_schema(tok, schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    finishes = []
    for k, prompt in enumerate(PROMPTS):
        ids, finish = run(model, tok, grammar, prompt, seed=1000 * k + len(name))
        finishes.append(finish)
        text = tok.decode(ids)
        assert finish != "length", f"hit the {BUDGET}-token budget: {text[:200]!r}"
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{text!r}: {errors}"
    # a closed structure (object, array, string) is done the moment it closes: no end token needed
    if isinstance(schema, dict) and schema.get("type") in ("object", "array", "string"):
        assert finishes == ["done"] * len(PROMPTS)


def test_properties_in_schema_order(model, tok):
    schema = obj({"zeta": AGE, "alpha": AGE, "mid": AGE})
    ids, _ = run(model, tok, Grammar.json_schema(tok, schema), "x", seed=0)
    assert list(json.loads(tok.decode(ids))) == ["zeta", "alpha", "mid"]


def test_schema_given_as_json_text(model, tok):
    schema = SCHEMAS["tool_call"]
    ids, _ = run(model, tok, Grammar.json_schema(tok, json.dumps(schema)), "x", seed=3)
    jsonschema.validate(json.loads(tok.decode(ids)), schema)


def test_teacher_forced_documents(tok):
    """Documents tokenized as the tokenizer would (not as sampled): valid ones are accepted to completion,
    invalid ones are refused at the first offending token, and a refused token leaves the state unchanged."""
    g = Grammar.json_schema(tok, SCHEMAS["nested_object"])
    good = {"name": "Ada", "address": {"city": "Lima", "zip": "01234", "geo": {"lat": -12, "lon": 77}}}
    m = g.matcher()
    for t in tok.encode(json.dumps(good)):
        assert not m.is_done()
        m.accept(t)
    assert m.is_done() and m.can_end()

    for bad in [dict(good, name="much too long"), {**good, "address": {**good["address"], "city": "Rome"}},
                {**good, "address": {**good["address"], "zip": "1234x"}}, {"address": good["address"]}]:
        m, text = g.matcher(), json.dumps(bad)
        with pytest.raises(ValueError, match="not allowed"):
            for t in tok.encode(text):
                m.accept(t)
        assert not m.can_end()
    # after a refusal the matcher continues from where it was
    m = g.matcher()
    m.accept(tok.encode("{")[0])
    with pytest.raises(ValueError):
        m.accept(tok.encode("}")[0])
    with pytest.raises(ValueError):
        m.accept(tok.eos_id)  # the grammar cannot end here
    for t in tok.encode(json.dumps(good)[1:]):
        m.accept(t)
    assert m.is_done()
    m.accept(tok.eos_id)  # an end token is still allowed once done
    assert m.is_done()


# ---------------------------------------------------------------------------------------------------------------
# regex and choices

REGEXES = [r"[A-Z]{2}-[0-9]{3}", r"(cat|dog|bird)s?", r"\d{4}-\d{2}-\d{2}", r"[a-z]{1,8}@[a-z]{1,6}\.(com|org)",
           r"0x[0-9a-f]{1,6}", r"[a-z]+( [a-z]+){0,3}", r"[αβγ🙂]{2,4}", r"(yes|no|maybe)\.", r"-?[1-9][0-9]{0,2}"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(model, tok, pattern):
    g = Grammar.regex(tok, pattern)
    for seed in range(3):
        ids, finish = run(model, tok, g, PROMPTS[seed], seed=seed)
        text = tok.decode(ids)
        assert finish != "length"
        assert regex.fullmatch(pattern, text), (pattern, text)


def test_choices(model, tok):
    options = ["yes", "yes please", "no", 'say "hi"', "new\nline", "back\\slash", "héllo 🙂", "<|eos|>"]
    g = Grammar.choices(tok, options)
    # the first mask allows exactly the tokens that start some option (the specials' TEXT is ordinary text)
    allowed = g.matcher().allowed_mask(tok.vocab_size)
    starts = [i for i in range(tok.vocab_size) if not tok.is_special(i)
              and any(o.encode().startswith(tok.id_to_bytes(i)) for o in options)]
    assert allowed.nonzero().flatten().tolist() == starts
    seen = set()
    for seed in range(24):
        ids, finish = run(model, tok, g, PROMPTS[seed % 3], seed=seed)
        text = tok.decode(ids)
        assert text in options and finish != "length"
        assert finish == ("eos" if text == "yes" else "done")  # "yes" may go on to "yes please": needs an end
        seen.add(text)
    assert len(seen) >= 3  # the sampler really picks among them


# ---------------------------------------------------------------------------------------------------------------
# the Matcher contract

def test_apply_shapes_padding_and_devices(tok):
    g = Grammar.regex(tok, r"ab+")
    m = g.matcher()
    V = tok.vocab_size
    for shape in [(V,), (1, V), (V + PAD,), (1, V + PAD)]:
        x = torch.zeros(shape)
        y = m.apply(x)
        assert y is x
        fin = torch.isfinite(y).reshape(-1)
        assert torch.equal(fin, m.allowed_mask(shape[-1]))
        assert fin.nonzero().flatten().tolist() == [i for i in range(V)
                                                     if not tok.is_special(i) and b"ab".startswith(tok.id_to_bytes(i))]
    x = torch.zeros(1, V, dtype=torch.bfloat16)
    assert torch.isfinite(m.apply(x)).sum() == torch.isfinite(m.apply(torch.zeros(V))).sum()
    with pytest.raises(ValueError):
        m.allowed_mask(V - 1)


def test_end_tokens_follow_can_end(tok):
    m = Grammar.regex(tok, r"ab+").matcher()
    ends = end_token_ids(tok)
    assert not m.can_end() and not m.allowed_mask(tok.vocab_size)[ends].any()
    for t in tok.encode("abbb"):
        m.accept(t)
    assert m.can_end() and not m.is_done()  # more b's may follow
    assert m.allowed_mask(tok.vocab_size)[ends].all()
    m.accept(tok.bos_id)                    # BOS ends a sequence too (generate.end_token_ids)
    assert m.is_done()
    with pytest.raises(ValueError):
        m.accept(tok.encode("b")[0])


def test_matchers_are_independent_and_grammars_cached(tok):
    g1 = Grammar.json_schema(tok, SCHEMAS["flat_object"])
    g2 = Grammar.json_schema(tok, json.dumps(SCHEMAS["flat_object"]))
    a, b = g1.matcher(), g2.matcher()
    for t in tok.encode('{"name": "x", "age": 1}'):
        a.accept(t)
    assert a.is_done() and not b.can_end() and b.num_tokens == 0
    assert b.allowed_mask(tok.vocab_size).nonzero().flatten().tolist() == tok.encode("{")
    assert g1._proto is g2._proto  # compiled once per (tokenizer, spec)


def test_errors(tok):
    cases = [
        (Grammar.json_schema, {"type": "objekt"}, "json_schema", "objekt"),
        (Grammar.json_schema, {"type": "string", "pattern": "(("}, "json_schema", "unclosed group"),
        (Grammar.json_schema, {"type": "string", "minLength": 5, "maxLength": 2}, "json_schema", "minLength"),
        (Grammar.json_schema, {"not": {"type": "string"}}, "json_schema", "not"),
        (Grammar.json_schema, {"$ref": "#/$defs/missing"}, "json_schema", "missing"),
        (Grammar.json_schema, "{not json", "json_schema", "not valid JSON"),
        (Grammar.json_schema, [1, 2], "json_schema", "must be an object"),
        (Grammar.regex, "a(b", "regex", "unclosed group"),
        (Grammar.regex, r"(?=a)a", "regex", "look-around"),
        (Grammar.regex, r"(a)\1", "regex", "backreferences"),
        (Grammar.regex, "", "regex", "non-empty"),
        (Grammar.choices, [], "choices", "non-empty list"),
        (Grammar.choices, "yes", "choices", "non-empty list"),
        (Grammar.choices, ["a", 3], "choices", "non-empty string"),
    ]
    for make, spec, field, words in cases:
        with pytest.raises(ConfigError) as e:
            make(tok, spec)
        assert e.value.field == field and words in str(e.value), (spec, str(e.value))
        assert "\n" not in str(e.value)


def test_missing_library_is_a_user_error(tok, monkeypatch):
    monkeypatch.setattr(constrained, "llguidance", None)
    with pytest.raises(LmforgeError, match="pip install"):
        Grammar.regex(tok, "a+")
