"""Control-message parsing and speaker-name rules (diglett.engine.protocol)."""

from __future__ import annotations

import json

import pytest

from diglett.engine.protocol import (
    CLOSE_CODES,
    MAX_NAME_LEN,
    EndMsg,
    EnrollEndMsg,
    EnrollMsg,
    FormatMsg,
    ProtocolError,
    StreamMsg,
    check_speaker_name,
    error,
    parse_control,
)


def bad(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_control(text)
    assert info.value.code == "bad_message"
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


def parse(obj) -> object:
    return parse_control(json.dumps(obj))


# ------------------------------------------------------------------- valid
def test_parse_each_type():
    assert isinstance(parse({"type": "enroll", "speaker": "alice"}), EnrollMsg)
    assert isinstance(parse({"type": "enroll_end"}), EnrollEndMsg)
    assert isinstance(parse({"type": "stream"}), StreamMsg)
    assert isinstance(parse({"type": "end"}), EndMsg)
    m = parse({"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"})
    assert isinstance(m, FormatMsg)
    assert (m.sample_rate, m.encoding) == (48000, "pcm_f32le")


def test_format_encoding_defaults_to_s16():
    m = parse({"type": "format", "sample_rate": 44100})
    assert m.encoding == "pcm_s16le"


def test_enroll_keeps_speaker():
    assert parse({"type": "enroll", "speaker": "Bob Smith-2.0"}).speaker == (
        "Bob Smith-2.0"
    )


def test_unknown_fields_are_ignored():
    m = parse(
        {"type": "enroll", "speaker": "alice", "lang": "en", "extra": {"a": [1, 2]}}
    )
    assert m.speaker == "alice"
    assert isinstance(parse({"type": "stream", "id": 7, "note": None}), StreamMsg)
    assert isinstance(parse({"type": "end", "reason": "done"}), EndMsg)
    m = parse({"type": "format", "sample_rate": 8000, "channels": 1})
    assert m.sample_rate == 8000


def test_whitespace_around_json_is_fine():
    assert isinstance(parse_control('  {"type": "stream"}\n'), StreamMsg)


def test_format_values_are_not_range_checked_here():
    """The range check is check_format's job (unsupported_format), not parsing."""
    assert parse({"type": "format", "sample_rate": 7999}).sample_rate == 7999
    assert parse({"type": "format", "sample_rate": 8000, "encoding": "x"}).encoding


# ------------------------------------------------------------ bad messages
@pytest.mark.parametrize(
    "text",
    ["", "hello", "{", '{"type": "stream"', "{'type': 'stream'}", "\x00", "\ud800"],
)
def test_not_json(text):
    bad(text)


@pytest.mark.parametrize(
    "text",
    ["[]", '[{"type": "stream"}]', '"stream"', "42", "null", "true", "NaN", "3.5"],
)
def test_not_an_object(text):
    bad(text)


@pytest.mark.parametrize(
    "obj",
    [{}, {"speaker": "alice"}, {"type": None}, {"type": 5}, {"type": ["stream"]}],
)
def test_missing_or_non_string_type(obj):
    bad(json.dumps(obj))


@pytest.mark.parametrize(
    "kind",
    ["ready", "label", "Stream", "STREAM", " stream", "hello", "", "x" * 10000],
)
def test_unknown_type(kind):
    e = bad(json.dumps({"type": kind}))
    assert len(e.message) < 500


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "format", "sample_rate": "48000"},
        {"type": "format", "sample_rate": 48000.5},
        {"type": "format", "sample_rate": 48000.0},
        {"type": "format", "sample_rate": True},
        {"type": "format", "sample_rate": None},
        {"type": "format", "sample_rate": [48000]},
        {"type": "format"},
        {"type": "format", "sample_rate": 48000, "encoding": 5},
        {"type": "format", "sample_rate": 48000, "encoding": None},
        {"type": "format", "sample_rate": 48000, "encoding": ["pcm_s16le"]},
        {"type": "enroll"},
        {"type": "enroll", "speaker": 5},
        {"type": "enroll", "speaker": None},
        {"type": "enroll", "speaker": ["alice"]},
        {"type": "enroll", "speaker": {"name": "alice"}},
        {"type": "enroll", "speaker": True},
    ],
)
def test_wrong_field_types(obj):
    bad(json.dumps(obj))


def test_huge_number_is_bad_message():
    bad('{"type": "format", "sample_rate": 1e400}')
    bad('{"type": "format", "sample_rate": ' + "9" * 5000 + "}")


@pytest.mark.parametrize("depth", [100000, 30000, 5000, 2000])
def test_deeply_nested_lists(depth):
    bad("[" * depth + "]" * depth)


@pytest.mark.parametrize("depth", [20000, 3000])
def test_deeply_nested_inside_a_valid_message(depth):
    bad('{"type": "stream", "x": ' + "[" * depth + "]" * depth + "}")
    bad('{"type": "format", "sample_rate": ' + "[" * depth + "]" * depth + "}")


def test_deeply_nested_objects():
    depth = 10000
    bad('{"a": ' * depth + "1" + "}" * depth)


def test_moderately_nested_unknown_field_is_ignored():
    text = '{"type": "stream", "x": ' + "[" * 500 + "]" * 500 + "}"
    assert isinstance(parse_control(text), StreamMsg)


def test_oversized_message():
    bad(json.dumps({"type": "stream", "pad": "x" * 200_000}))
    bad(json.dumps({"type": "enroll", "speaker": "a" * 1_000_000}))


# ------------------------------------------------------------ speaker names
@pytest.mark.parametrize(
    "name",
    [
        "a",
        "alice",
        "Bob",
        "bob_2",
        "mary-jane",
        "dr. who",
        "A.B-C_D 9",
        "0",
        "x" * 64,
        "Zoë",
        "Søren",
        "李雷",
        "Noises",
        "silent",
        "noise1",
    ],
)
def test_valid_speaker_names(name):
    check_speaker_name(name)
    assert parse({"type": "enroll", "speaker": name}).speaker == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 65,
        "x" * 1000,
        "noise",
        "silence",
        "a/b",
        "/",
        "../etc",
        "alice!",
        "a,b",
        "a:b",
        "a\tb",
        "a\nb",
        "a\x00b",
        "<script>",
        "a\u200bb",  # zero-width space
        "😀",
        "a\\b",
        "a'b",
        'a"b',
    ],
)
def test_invalid_speaker_names(name):
    with pytest.raises(ProtocolError) as info:
        check_speaker_name(name)
    assert info.value.code == "bad_message"
    bad(json.dumps({"type": "enroll", "speaker": name}))


def test_name_length_limits():
    assert MAX_NAME_LEN == 64
    check_speaker_name("n" * 64)
    with pytest.raises(ProtocolError):
        check_speaker_name("n" * 65)


def test_lone_surrogate_name_is_bad_message():
    bad('{"type": "enroll", "speaker": "\\ud800"}')


# ----------------------------------------------------------------- helpers
def test_error_message_shape():
    assert error("bad_message", "why") == {
        "type": "error",
        "code": "bad_message",
        "message": "why",
    }
    json.dumps(error("x", "y"))


def test_close_codes():
    assert CLOSE_CODES == {
        "frame_too_large": 1009,
        "rate_exceeded": 1008,
        "overloaded": 1013,
        "internal": 1011,
        "session_expired": 4404,
        "unauthorized": 4401,
    }


def test_parsed_messages_are_frozen():
    m = parse({"type": "enroll", "speaker": "alice"})
    with pytest.raises(Exception):
        m.speaker = "bob"


def test_random_garbage_never_crashes():
    import random

    rng = random.Random(1234)
    alphabet = '{}[]":,0123456789abcdeftnrul .-\\'
    seeds = [
        '{"type": "enroll", "speaker": "alice"}',
        '{"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"}',
    ]
    for _ in range(3000):
        s = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(s))
            op = rng.random()
            if op < 0.4:
                s[i] = rng.choice(alphabet)
            elif op < 0.7:
                del s[i]
            else:
                s.insert(i, rng.choice(alphabet))
        text = "".join(s)
        try:
            parse_control(text)
        except ProtocolError as exc:
            assert exc.code == "bad_message"
