"""Streaming text processing in utils.py: the incremental detokenizer, stop strings and the tool-call parser."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from utils import (TOOL_CLOSE, TOOL_OPEN, IncrementalDetokenizer, ParsedCall, StopMatcher, ToolCallParser,
                   parse_tool_call)

REPLACEMENT = "\ufffd"


# ---- IncrementalDetokenizer -----------------------------------------------------------------------------------------
def stream_ids(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


MULTIBYTE_STRINGS = [
    "é",
    "café naïve crème brûlée",
    "日本語",
    "日本語のテキストです。",
    "中文：你好，世界！",
    "한국어 텍스트",
    "Привет, мир",
    "emoji 😀 in text 🎉!",
    "😀👍🏽🇬🇧",
    "👨‍👩‍👧‍👦 family",
    "mixed: é日😀a",
    "15°C and ☀ sunny → ok",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛",
    "plain ascii text, no surprises",
    "tabs\tand\nnewlines\n\n",
    '{"location": "Zürich", "unit": "°C"}',
]


def test_some_characters_are_split_over_several_tokens(tiny_tokenizer):
    # Guard: without tokens that carry partial UTF-8 sequences the other detokenizer tests prove nothing.
    ids = tiny_tokenizer.encode("日本語😀")
    assert any(tiny_tokenizer.decode([i]) == REPLACEMENT for i in ids)


@pytest.mark.parametrize("text", MULTIBYTE_STRINGS)
def test_deltas_never_split_a_character_and_concatenate_to_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    deltas, tail = stream_ids(tiny_tokenizer, ids)
    for delta in deltas:
        assert REPLACEMENT not in delta, (text, deltas)
    assert tail == ""
    assert "".join(deltas) + tail == tiny_tokenizer.decode(ids)
    assert "".join(deltas) == text


@pytest.mark.parametrize("text", MULTIBYTE_STRINGS)
def test_each_character_is_released_as_soon_as_it_is_complete(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    detok = IncrementalDetokenizer(tiny_tokenizer)
    emitted = ""
    for k, token_id in enumerate(ids, start=1):
        emitted += detok.push(token_id)
        so_far = tiny_tokenizer.decode(ids[:k])
        assert so_far.startswith(emitted)
        if not so_far.endswith(REPLACEMENT):  # no incomplete character pending: nothing may be held back
            assert emitted == so_far


def test_random_strings_property(tiny_tokenizer):
    rng = random.Random(1234)
    alphabet = list("abcXYZ 019,.!?<>{}\"'\n\t") + list("éüßñçø") + list("日本語中文字한국") + \
        ["😀", "🎉", "👍🏽", "🇫🇷", "‍", "°", "€", "𝟙", "Ж", "ض"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = tiny_tokenizer.encode(text)
        deltas, tail = stream_ids(tiny_tokenizer, ids)
        assert all(REPLACEMENT not in d for d in deltas), (text, deltas)
        assert "".join(deltas) + tail == tiny_tokenizer.decode(ids), text


def test_random_token_ids_concatenate_to_decode(tiny_tokenizer):
    # A random model emits arbitrary byte tokens, even invalid UTF-8: the stream must still equal decode().
    rng = random.Random(99)
    vocab = len(tiny_tokenizer)
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
        deltas, tail = stream_ids(tiny_tokenizer, ids)
        expected = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) + tail == expected, ids


def test_incomplete_character_at_end_of_stream_is_released_by_flush(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ok 日")
    partial = ids[:-1]  # "日" is three byte tokens: drop the last one
    assert tiny_tokenizer.decode(partial).endswith(REPLACEMENT)
    deltas, tail = stream_ids(tiny_tokenizer, partial)
    assert "".join(deltas) == "ok "
    assert tail == REPLACEMENT
    assert "".join(deltas) + tail == tiny_tokenizer.decode(partial)


def test_special_tokens_are_skipped_and_tool_tags_are_kept(tiny_tokenizer):
    text = 'Hi <tool_call>\n{"name": "f"}\n</tool_call>'
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tiny_tokenizer.encode(text) + [im_end]
    assert tiny_tokenizer.convert_tokens_to_ids(TOOL_OPEN) in ids  # the tag is one added token
    deltas, tail = stream_ids(tiny_tokenizer, ids)
    assert "".join(deltas) + tail == text


def test_flush_twice_returns_nothing_more(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer)
    out = "".join(detok.push(i) for i in tiny_tokenizer.encode("abc é"))
    out += detok.flush()
    assert out == "abc é"
    assert detok.flush() == ""


# ---- StopMatcher ----------------------------------------------------------------------------------------------------
def run_stops(stops, chunks):
    matcher = StopMatcher(stops)
    outputs = []
    for chunk in chunks:
        outputs.append(matcher.push(chunk))
        if matcher.stopped:
            break
    if not matcher.stopped:
        outputs.append(matcher.flush())
    return outputs, matcher.stopped


def splits(text, parts):
    """Every way to cut ``text`` into ``parts`` consecutive (possibly empty) chunks."""
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), parts - 1):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


STOP_CASES = [
    # (stops, text, visible, stopped)
    (["END"], "Hello world END trailing", "Hello world ", True),
    (["END"], "Hello EN world E", "Hello EN world E", False),
    (["\n\nUser:", "###"], "Answer: 42.\n\nUser: more", "Answer: 42.", True),
    (["###", "\n\nUser:"], "a # b ## c ### d", "a # b ## c ", True),
    (["<|stop|>"], "x <|sto y <|stop|> z", "x <|sto y ", True),
    (["ab", "xyz"], "aaaxyzab", "aaa", True),
    (["日本"], "こんにちは日本語", "こんにちは", True),
]


@pytest.mark.parametrize(("stops", "text", "visible", "stopped"), STOP_CASES)
def test_stop_split_at_every_position(stops, text, visible, stopped):
    for parts in (1, 2, 3):
        for chunks in splits(text, parts):
            outputs, did_stop = run_stops(stops, chunks)
            assert "".join(outputs) == visible, chunks
            assert did_stop == stopped, chunks
            emitted = ""
            for out in outputs:
                emitted += out
                assert visible.startswith(emitted), chunks


def test_stop_character_by_character():
    outputs, stopped = run_stops(["STOP"], list("go go STOP no"))
    assert stopped
    assert "".join(outputs) == "go go "


def test_earliest_stop_wins_whatever_the_order():
    for stops in (["world", "lo"], ["lo", "world"]):
        matcher = StopMatcher(stops)
        assert matcher.push("Hello world") == "Hel"
        assert matcher.stopped


def test_text_is_held_back_only_while_it_may_start_a_stop():
    matcher = StopMatcher(["END"])
    assert matcher.push("abcE") == "abc"
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"
    assert matcher.push("yEND") == "y"
    assert matcher.stopped


def test_held_back_part_is_the_longest_possible_stop_prefix():
    matcher = StopMatcher(["abcd", "cx"])
    assert matcher.push("zzabc") == "zz"  # "abc" may start "abcd", "c" may start "cx"
    assert matcher.push("q") == "abcq"
    assert not matcher.stopped


def test_stop_flush_releases_a_held_prefix_at_end_of_stream():
    matcher = StopMatcher(["END"])
    assert matcher.push("abcEN") == "abc"
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_stop_drops_the_rest_of_the_chunk_and_flush_is_empty():
    matcher = StopMatcher(["END"])
    assert matcher.push("one END two") == "one "
    assert matcher.stopped
    assert matcher.flush() == ""


def test_no_stops_and_empty_stops_pass_text_through():
    for stops in ([], [""]):
        matcher = StopMatcher(stops)
        assert matcher.push("a") == "a"
        assert matcher.push("b E") == "b E"
        assert matcher.flush() == ""
        assert not matcher.stopped


# ---- parse_tool_call ----------------------------------------------------------------------------------------------
def test_parse_tool_call_valid():
    call = parse_tool_call('{"name": "get_weather", "arguments": {"location": "London"}}')
    assert call == ParsedCall("get_weather", {"location": "London"})


def test_parse_tool_call_arguments_as_json_string():
    body = json.dumps({"name": "get_weather", "arguments": json.dumps({"location": "Paris"})})
    assert parse_tool_call(body) == ParsedCall("get_weather", {"location": "Paris"})


def test_parse_tool_call_parameters_alias_and_missing_arguments():
    assert parse_tool_call('{"name": "f", "parameters": {"x": 1}}') == ParsedCall("f", {"x": 1})
    assert parse_tool_call('{"name": "f"}') == ParsedCall("f", {})


def test_parse_tool_call_keeps_unicode_and_nesting():
    body = '{"name": "f", "arguments": {"city": "Zürich 日本", "opts": {"days": [1, 2]}}}'
    assert parse_tool_call(body) == ParsedCall("f", {"city": "Zürich 日本", "opts": {"days": [1, 2]}})


@pytest.mark.parametrize("body", [
    "",
    "not json",
    '{"name": "f", "arguments": {"x": 1}',  # unterminated
    '{"name": "f"} trailing',
    "[1, 2]",
    '"get_weather"',
    "null",
    '{"arguments": {"x": 1}}',  # no name
    '{"name": "", "arguments": {}}',
    '{"name": 5, "arguments": {}}',
    '{"name": "f", "arguments": [1, 2]}',
    '{"name": "f", "arguments": "not json"}',
    '{"name": "f", "arguments": "[1, 2]"}',
    '{"name": "f", "arguments": 3}',
])
def test_parse_tool_call_rejects_malformed_bodies(body):
    assert parse_tool_call(body) is None


def test_parse_tool_call_deeply_nested_body_is_not_a_call():
    assert parse_tool_call("[" * 5000 + "]" * 5000) is None


# ---- ToolCallParser -----------------------------------------------------------------------------------------------
def call_block(name, arguments):
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CLOSE}"


LONDON = call_block("get_weather", {"location": "London"})
PARIS = call_block("get_weather", {"location": "Paris"})
LONDON_CALL = ParsedCall("get_weather", {"location": "London"})
PARIS_CALL = ParsedCall("get_weather", {"location": "Paris"})
INVALID = f"{TOOL_OPEN}\n{{not json}}\n{TOOL_CLOSE}"
NOT_TAGS = "Use <tool> when a < b, <tool_c or <tool_callx>; <"

PARSER_CASES = {
    # name: (model output, visible text, calls)
    "text_only": ("Just an answer, no tools.", "Just an answer, no tools.", []),
    "text_then_call": ("Let me check.\n" + LONDON, "Let me check.", [LONDON_CALL]),
    "call_only": (LONDON, "", [LONDON_CALL]),
    "two_calls_newlines": ("\n" + LONDON + "\n" + PARIS + "\n", "", [LONDON_CALL, PARIS_CALL]),
    "two_calls_adjacent": (LONDON + PARIS, "", [LONDON_CALL, PARIS_CALL]),
    "call_on_one_line": ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "", [ParsedCall("f", {})]),
    "text_after_calls": (LONDON + "\n\n" + PARIS + "\n\nDone: é日😀.", "Done: é日😀.", [LONDON_CALL, PARIS_CALL]),
    "text_call_text_call": ("First.\n" + LONDON + "\nSecond.\n" + PARIS, "First.\n\nSecond.",
                            [LONDON_CALL, PARIS_CALL]),
    "whitespace_around_calls": (" \n\t" + LONDON + " \n \n" + PARIS + "\n\n  \n", "", [LONDON_CALL, PARIS_CALL]),
    "invalid_block_is_text": ("Hmm." + INVALID, "Hmm." + INVALID, []),
    "invalid_between_valid": (LONDON + "\n" + INVALID + "\n" + PARIS, INVALID, [LONDON_CALL, PARIS_CALL]),
    "unterminated_complete_json": ("Sure.\n" + LONDON[:-len(TOOL_CLOSE)], "Sure.", [LONDON_CALL]),
    "unterminated_incomplete_json": ("Sure." + LONDON[:30], "Sure." + LONDON[:30], []),
    "unterminated_close_prefix": ("Sure." + LONDON[:-3], "Sure." + LONDON[:-3], []),
    "not_tags": (NOT_TAGS, NOT_TAGS, []),
    "not_tag_then_tag": ("x <<tool" + LONDON, "x <<tool", [LONDON_CALL]),
    "tag_prefix_at_end": ("Ends with <tool_ca", "Ends with <tool_ca", []),
    "stray_close_tag": ("a </tool_call> b", "a </tool_call> b", []),
    # an argument may contain the tag's text: the call ends at the first close outside a JSON string
    "close_tag_inside_a_string": (call_block("note", {"text": "use </tool_call> to close", "q": "a\\\"</tool_call>"})
                                  + " ok", "ok", [ParsedCall("note", {"text": "use </tool_call> to close",
                                                                      "q": "a\\\"</tool_call>"})]),
    # a malformed call (an unclosed string) still ends at its first close, as text; what follows still parses
    "unbalanced_quote_block_then_call": (f'{TOOL_OPEN}{{"name": "x, "a": 1}}{TOOL_CLOSE} then' + LONDON,
                                         f'{TOOL_OPEN}{{"name": "x, "a": 1}}{TOOL_CLOSE} then', [LONDON_CALL]),
}


def run_parser(chunks):
    parser = ToolCallParser()
    outputs = [parser.push(c) for c in chunks]
    outputs.append(parser.flush())
    return outputs, parser.calls


def assert_clean_stream(outputs, visible, chunks):
    """Output grows only along the final visible text; no markup unless the visible text has it."""
    emitted = ""
    for out in outputs:
        emitted += out
        assert visible.startswith(emitted), (chunks, outputs)
        for tag in (TOOL_OPEN, TOOL_CLOSE):
            if tag not in visible:
                assert tag not in out, (chunks, outputs)
    for out in outputs[:-1]:  # pushes never deliver whitespace-only text
        assert out == "" or out.strip(), (chunks, outputs)


@pytest.mark.parametrize("name", PARSER_CASES)
def test_tool_call_parser_whole_text(name):
    text, visible, calls = PARSER_CASES[name]
    outputs, parsed = run_parser([text])
    assert "".join(outputs) == visible
    assert parsed == calls


@pytest.mark.parametrize("name", PARSER_CASES)
def test_tool_call_parser_every_split_in_two_and_three(name):
    text, visible, calls = PARSER_CASES[name]
    for parts in (2, 3):
        for chunks in splits(text, parts):
            outputs, parsed = run_parser(chunks)
            assert "".join(outputs) == visible, chunks
            assert parsed == calls, chunks
            assert_clean_stream(outputs, visible, chunks)


@pytest.mark.parametrize("name", PARSER_CASES)
def test_tool_call_parser_character_by_character(name):
    text, visible, calls = PARSER_CASES[name]
    outputs, parsed = run_parser(list(text))
    assert "".join(outputs) == visible
    assert parsed == calls
    assert_clean_stream(outputs, visible, list(text))


def test_tag_prefix_is_held_until_it_becomes_a_tag():
    parser = ToolCallParser()
    assert parser.push("Checking <tool") == "Checking"
    assert parser.push("_call>\n{\"name\": \"f\", ") == ""
    assert parser.push('"arguments": {}}\n</tool_call>') == ""
    assert parser.flush() == ""
    assert parser.calls == [ParsedCall("f", {})]


def test_tag_prefix_is_released_when_it_is_not_a_tag():
    parser = ToolCallParser()
    assert parser.push("if a <") == "if a"
    assert parser.push(" b") == " < b"
    assert parser.push(" <tool") == ""
    assert parser.push(">") == " <tool>"
    assert parser.calls == []


def test_calls_are_delivered_as_soon_as_the_block_closes():
    parser = ToolCallParser()
    parser.push("Let me look.\n" + LONDON)
    assert parser.calls == [LONDON_CALL]
    parser.push("\n" + PARIS[:20])
    assert parser.calls == [LONDON_CALL]
    parser.push(PARIS[20:])
    assert parser.calls == [LONDON_CALL, PARIS_CALL]


def test_invalid_block_keeps_the_whitespace_before_it():
    text = "Hmm.\n" + INVALID
    outputs, calls = run_parser([text])
    assert calls == []
    assert "".join(outputs) == text


def test_deeply_nested_invalid_block_is_delivered_as_text():
    block = TOOL_OPEN + "[" * 5000 + TOOL_CLOSE
    outputs, calls = run_parser(["a", block])
    assert calls == []
    assert "".join(outputs) == "a" + block


def test_stop_that_completes_first_wins_whatever_the_chunking():
    for chunks in (["abcd"], ["abc", "d"], ["a", "b", "c", "d"], ["ab", "cd"]):
        matcher = StopMatcher(["abcd", "bc"])
        out = "".join(matcher.push(c) for c in chunks)
        assert (out, matcher.stopped) == ("a", True), chunks


def test_stop_matcher_shows_nothing_after_stopping():
    matcher = StopMatcher(["END"])
    assert matcher.push("one END two") == "one "
    assert matcher.push(" three") == "" and matcher.flush() == ""
