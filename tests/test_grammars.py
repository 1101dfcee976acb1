"""grammars.py: tool choices and response formats as grammars, priced and refused up front, and random token streams
through each grammar (garbage writers under a constraint) that must always come out parseable and schema-valid."""
from __future__ import annotations

import json
import random

import pytest

from grammar_walks import validate, validate_json_text, walk
from grammars import (GrammarCompiler, ResponseFormat, ToolChoice, ToolSpec, closed_objects, forced_prefix,
                      lark_grammar)
from schema_limits import SchemaLimits, SchemaRefused, nested_repeat
from schema_cases import SCHEMAS, UNSUPPORTED, WEATHER
from utils import ToolCallParser

TOOLS = [ToolSpec("get_weather", WEATHER), *(ToolSpec(name, schema) for name, schema in SCHEMAS.items())]
SCHEMA_OF = {t.name: t.parameters for t in TOOLS}


def json_schema(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def compile_for(compiler, tools, choice, fmt=None):
    choice = choice if isinstance(choice, ToolChoice) else ToolChoice.parse(choice)
    fmt = ResponseFormat.parse(fmt)
    prefix = forced_prefix(tools, choice)
    return compiler.compile(tools, choice, fmt, compiler.tokenizer.encode(prefix) if prefix else ()), prefix


def parse_calls(tokenizer, prefix: str, tokens: list[int]):
    parser = ToolCallParser()
    text = parser.push(prefix + tokenizer.decode(tokens, skip_special_tokens=True))
    return text + parser.flush(), parser.calls


# ---- parsing the client's choices ------------------------------------------------------------------------------------
def test_tool_choice_shapes():
    assert ToolChoice.parse(None) == ToolChoice("auto")
    assert ToolChoice.parse("required") == ToolChoice("required")
    assert ToolChoice.parse({"type": "function", "function": {"name": "f"}}) == ToolChoice("function", "f")
    for bad in ("sometimes", {"type": "function"}, {"type": "function", "function": {"name": ""}}, 3):
        with pytest.raises(SchemaRefused, match="tool_choice"):
            ToolChoice.parse(bad)


def test_response_format_shapes():
    assert ResponseFormat.parse(None).kind == "text" and not ResponseFormat.parse({"type": "text"}).is_json
    assert ResponseFormat.parse({"type": "json_object"}).is_json
    fmt = ResponseFormat.parse({"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER}})
    assert fmt.kind == "json_schema" and fmt.schema == WEATHER
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}, "x"):
        with pytest.raises(SchemaRefused, match="response_format"):
            ResponseFormat.parse(bad)


def test_no_grammar_when_nothing_is_constrained():
    assert lark_grammar([], ToolChoice(), ResponseFormat()) is None
    assert lark_grammar([], ToolChoice("none"), ResponseFormat()) is not None  # explicit "none": no call possible
    assert lark_grammar(TOOLS[:1], ToolChoice(), ResponseFormat()) is not None


def test_choices_that_cannot_be_met_are_refused(grammar_compiler):
    with pytest.raises(SchemaRefused, match="needs tools"):
        compile_for(grammar_compiler, [], "required")
    with pytest.raises(SchemaRefused, match="'nope'"):
        compile_for(grammar_compiler, TOOLS, {"type": "function", "function": {"name": "nope"}})


# ---- refusals up front --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keyword", sorted(UNSUPPORTED))
def test_an_unsupported_keyword_is_refused_by_name(grammar_compiler, keyword):
    tools = [TOOLS[0], ToolSpec("bad_tool", UNSUPPORTED[keyword])]
    with pytest.raises(SchemaRefused) as info:
        compile_for(grammar_compiler, tools, "auto")
    assert info.value.where == "tools[1] (bad_tool).parameters"
    assert info.value.keyword == keyword and keyword in str(info.value)
    with pytest.raises(SchemaRefused) as info:
        compile_for(grammar_compiler, [], None, json_schema(UNSUPPORTED[keyword]))
    assert info.value.where.startswith("response_format") and info.value.keyword == keyword


def test_strict_false_tools_skip_their_schema(grammar_compiler):
    """strict: false is the escape hatch: the arguments need only be a JSON object, the schema is not compiled."""
    tools = [ToolSpec("loose", UNSUPPORTED["if"], strict=False)]
    grammar, _ = compile_for(grammar_compiler, tools, "required")
    assert grammar is not None and '"if"' not in grammar.text


@pytest.mark.parametrize("regex", ["^(a{1,100}){1,100}$", "^([a-z]{1,50}){1,50}$", "^(a)\\1$", "^(?<=x)a$",
                                   "^([a-z]{1, 50}){1, 50}$", "^(a{ 1 , 100 }){ 100 }$",
                                   "^[a-z]{1,999}[a-z]{1,999}[a-z]{1,999}$"])
def test_a_regex_that_would_fail_mid_stream_is_refused_up_front(grammar_compiler, regex):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": regex}}, "required": ["a"]}
    with pytest.raises(SchemaRefused) as info:
        compile_for(grammar_compiler, [ToolSpec("t", schema)], "required")
    assert info.value.keyword == "pattern" and info.value.where == "tools[0] (t).parameters"


def test_nested_repetitions_are_weighed_by_a_linear_scan():
    assert nested_repeat("^(a{1,100}){1,100}$") == 10_000
    assert nested_repeat("^([a-z0-9]{1,63}\\.){1,10}[a-z]{2,6}$") == 636
    assert nested_repeat("^(\\d{1,3}\\.){3}\\d{1,3}$") == 12
    assert nested_repeat("((a{2}){3}){4}") == 24 and nested_repeat("(a{2})(b{3})") == 5
    assert nested_repeat("[{]{3}\\p{L}{4}x{1,}") == 8  # braces in classes and escapes are not quantifiers
    # side by side, ambiguous splits grow the lexer's states too: 3 x 999 failed mid-stream; alternatives: the largest
    assert nested_repeat("^[a-z]{1,999}[a-z]{1,999}[a-z]{1,999}$") == 2_997
    assert nested_repeat("^(a{5}b{6}|c{100})d{2}$") == 102 and nested_repeat("a{2}{3}") == 6
    assert nested_repeat("(((((") == 1 and nested_repeat(")))a{7}") == 7  # unbalanced: no crash
    # the grammar engine's regex syntax allows spaces inside the braces (RE2, the validator's, reads them as text)
    assert nested_repeat("^([a-z]{1, 50}){1, 50}$") == 2_500 and nested_repeat("(a{ 3 , }){ 2 }") == 6


def test_objects_with_properties_are_closed_unless_the_schema_opens_them():
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a property named "properties"
        "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
        "free": {"type": "object"},
        "list": {"type": "array", "items": {"anyOf": [{"type": "object", "properties": {"z": {}}}]}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert set(closed["properties"]) == set(schema["properties"])
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in closed["properties"]["free"]  # no properties: any object stays possible
    assert closed["properties"]["list"]["items"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the client's schema is not touched


def test_pricing_limits_come_before_compiling(grammar_tokenizer):
    compiler = GrammarCompiler(grammar_tokenizer, SchemaLimits(max_depth=8, max_nodes=200, max_patterns=2,
                                                               max_pattern_chars=20))
    deep: dict = {"type": "string"}
    for _ in range(10):
        deep = {"type": "object", "properties": {"x": deep}}
    cases = {"deeper than 8": deep,
             "more than 200 nodes": {"type": "object",
                                     "properties": {f"p{i}": {"type": "integer"} for i in range(250)}},
             "more than 2 distinct patterns": {"type": "object", "properties": {
                 f"p{i}": {"type": "string", "pattern": f"^a{i}$"} for i in range(3)}},
             "longer than 20": {"type": "object", "properties": {"p": {"type": "string", "pattern": "a" * 21}}}}
    for message, schema in cases.items():
        with pytest.raises(SchemaRefused, match=message):
            compiler.compile([ToolSpec("t", schema)], ToolChoice(), ResponseFormat())
    # a recursive schema is priced by its text, not expanded; a self-referential dict cannot come off the wire
    ok = {"type": "object", "properties": {"child": {"$ref": "#"}}}
    assert compiler.compile([ToolSpec("t", ok)], ToolChoice(), ResponseFormat()) is not None


def test_compiled_grammars_are_cached(grammar_compiler):
    first, _ = compile_for(grammar_compiler, TOOLS, "auto")
    again, _ = compile_for(grammar_compiler, list(TOOLS), "auto")
    assert again is first
    other, _ = compile_for(grammar_compiler, TOOLS, "required")
    assert other is not first


def test_the_forced_prefix_is_consumed_by_the_template(grammar_compiler, grammar_tokenizer):
    """tool_choice required / named: the prompt ends with the call's opening; the matcher starts after it."""
    grammar, prefix = compile_for(grammar_compiler, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert prefix.startswith("<tool_call>\n") and prefix.endswith('"arguments": ')
    assert grammar.prefix == tuple(grammar_tokenizer.encode(prefix))
    matcher = grammar.matcher()
    brace = grammar_tokenizer.encode("{")[0]
    assert matcher.allows(brace) and not matcher.allows(grammar_tokenizer.encode("<tool_call>")[0])


# ---- random token streams -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS) + ["get_weather"])
def test_random_json_answers_parse_and_validate(grammar_compiler, grammar_tokenizer, name):
    schema = SCHEMA_OF[name]
    grammar, _ = compile_for(grammar_compiler, [], None, json_schema(schema))
    finished = 0
    for seed in range(25):
        w = walk(grammar, grammar_tokenizer.stop_token_ids, random.Random(seed), max_steps=300,
                 check_mask=4 if seed < 3 else 0)
        if w.finished:
            finished += 1
            validate_json_text(grammar_tokenizer._hf.decode(w.tokens, skip_special_tokens=True), schema)
    # an open object (get_weather: additionalProperties allowed) lets a random writer add keys for ever
    wanted = 20 if schema.get("additionalProperties") is False else 5
    assert finished >= wanted, f"only {finished}/25 walks finished within 300 tokens"


def test_random_json_objects_parse(grammar_compiler, grammar_tokenizer):
    grammar, _ = compile_for(grammar_compiler, [], None, {"type": "json_object"})
    for seed in range(20):
        w = walk(grammar, grammar_tokenizer.stop_token_ids, random.Random(seed), max_steps=300)
        if w.finished:
            assert isinstance(json.loads(grammar_tokenizer._hf.decode(w.tokens, skip_special_tokens=True)), dict)


@pytest.mark.parametrize("choice", ["auto", "required", "function", "none"])
def test_random_tool_turns_yield_only_valid_calls(grammar_compiler, grammar_tokenizer, choice):
    """Over the server's own parser: every call is a tool of the request with schema-valid arguments; "required"
    yields only calls, a named choice exactly one call of that tool, "none" never a call, "auto" text and calls."""
    hf = grammar_tokenizer._hf
    wanted = {"type": "function", "function": {"name": "nested"}} if choice == "function" else choice
    grammar, prefix = compile_for(grammar_compiler, TOOLS, wanted)
    seen_calls = seen_text = 0
    for seed in range(40):
        # free text ends at a stop token drawn with probability stop_bias; between calls that ends the turn
        w = walk(grammar, grammar_tokenizer.stop_token_ids, random.Random(seed), max_steps=400,
                 stop_bias=0.02 if choice in ("auto", "none") else 0.5, check_mask=3 if seed < 2 else 0)
        if not w.finished:
            continue
        text, calls = parse_calls(hf, prefix, w.tokens)
        assert "<tool_call>" not in text, "a call that did not parse reached the text"
        for call in calls:
            validate(call.arguments, SCHEMA_OF[call.name])
        seen_calls += bool(calls)
        seen_text += bool(text.strip())
        if choice == "required":
            assert calls and not text.strip()
        elif choice == "function":
            assert [c.name for c in calls] == ["nested"] and not text.strip()
        elif choice == "none":
            assert not calls
    if choice == "auto":
        assert seen_calls and seen_text
    if choice in ("required", "function"):
        assert seen_calls >= 20


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_parallel_tool_calls_false_allows_one_call(grammar_compiler, grammar_tokenizer, choice):
    hf = grammar_tokenizer._hf
    grammar, prefix = compile_for(grammar_compiler, TOOLS[:3], ToolChoice.parse(choice, parallel=False))
    assert ToolChoice.parse(choice, parallel=False).parallel is False and ToolChoice.parse(choice).parallel
    counts = set()
    for seed in range(25):
        w = walk(grammar, grammar_tokenizer.stop_token_ids, random.Random(seed), max_steps=300, stop_bias=0.02)
        if w.finished:
            text, calls = parse_calls(hf, prefix, w.tokens)
            counts.add(len(calls))
            assert "<tool_call>" not in text
    assert counts <= {0, 1} and 1 in counts


def test_auto_with_a_json_answer_is_calls_or_the_document(grammar_compiler, grammar_tokenizer):
    hf = grammar_tokenizer._hf
    schema = SCHEMAS["enums"]
    grammar, prefix = compile_for(grammar_compiler, TOOLS[:2], "auto", json_schema(schema))
    kinds = set()
    for seed in range(30):
        w = walk(grammar, grammar_tokenizer.stop_token_ids, random.Random(seed), max_steps=300)
        if not w.finished:
            continue
        text, calls = parse_calls(hf, prefix, w.tokens)
        if calls:
            kinds.add("calls")
            assert not text.strip()
            for call in calls:
                validate(call.arguments, SCHEMA_OF[call.name])
        else:
            kinds.add("answer")
            validate_json_text(text, schema)
    assert kinds == {"calls", "answer"}


# Passes the pricing (3 x 300) but its lexer runs out of expressions mid-stream for some random strings; llguidance
# shares that lexer state between every copy of a compiled grammar, so later requests failed at their first token.
EXHAUSTING = {"type": "object", "required": ["a"],
              "properties": {"a": {"type": "string", "pattern": "^[a-z]{1,300}[a-z]{1,300}[a-z]{1,300}$",
                                   "maxLength": 999}}}


def _walk_until_failure(grammar, stop_ids) -> bool:
    for seed in range(40):
        try:
            walk(grammar, stop_ids, random.Random(seed), max_steps=2_000, stop_bias=0.0)
        except AssertionError:
            return True
    return False


def test_a_grammar_whose_matcher_failed_is_compiled_afresh(grammar_tokenizer, tiny_tokenizer):
    """Both caches (the server's compiler; the engine process's, which gets the grammar's text)."""
    from types import SimpleNamespace

    from engine.core_process import grammar_cache

    compiler = GrammarCompiler(grammar_tokenizer)
    fmt = ResponseFormat("json_schema", EXHAUSTING)
    loaded = SimpleNamespace(tokenizer=tiny_tokenizer, stop_token_ids=frozenset(grammar_tokenizer.stop_token_ids),
                             paged_model=SimpleNamespace(vocab_size=grammar_tokenizer.vocab_size))
    in_process = grammar_cache(SimpleNamespace(structured_outputs="on"), loaded)
    text = compiler.compile([], ToolChoice(), fmt).text
    for name, get in (("thread", lambda: compiler.compile([], ToolChoice(), fmt)),
                      ("process", lambda: in_process(text, ()))):
        grammar = get()
        assert get() is grammar, name  # compiled once, then reused
        assert _walk_until_failure(grammar, grammar_tokenizer.stop_token_ids), f"{name}: no seed hit the lexer limit"
        assert grammar.failed
        fresh = get()
        assert fresh is not grammar and not fresh.failed, name
        # the next request's matcher starts from a fresh lexer: its first steps go as in a grammar never used
        walk(fresh, grammar_tokenizer.stop_token_ids, random.Random(0), max_steps=20, stop_bias=0.0)
        assert get() is fresh, name
