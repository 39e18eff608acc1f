"""Dataset formats, and errors that name the line and the field; nothing half-imported."""

import json

import pytest

from qdpo_core.datasets import parse_lines
from qdpo_core.errors import DataError


def lines(*records):
    return [json.dumps(r) if not isinstance(r, str) else r for r in records]


def test_prompt_formats():
    records = parse_lines(
        lines({"prompt": "Hi?"}, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}], "id": "x"}), "prompts"
    )
    assert records[0]["messages"] == [{"role": "user", "content": "Hi?"}]
    assert records[1]["messages"][0]["role"] == "system" and records[1]["id"] == "x"


def test_trl_and_openai_preferences_normalise_alike():
    trl = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    trl_messages = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    openai = {
        "input": {"messages": [{"role": "user", "content": "2+2?"}]},
        "preferred_output": [{"role": "assistant", "content": "4"}],
        "non_preferred_output": [{"role": "assistant", "content": "5"}],
    }
    parsed = parse_lines(lines(trl, trl_messages, openai), "preferences")
    assert parsed[0] == parsed[1] == parsed[2] == {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}


def test_every_bad_line_is_reported_with_its_field():
    with pytest.raises(DataError) as info:
        parse_lines(lines({"prompt": "ok"}, "{not json", {"text": "x"}, "", {"messages": [{"role": "bot", "content": "x"}]}), "prompts")
    error = info.value
    assert error.message.startswith("line 2: is not valid JSON")
    assert "3 bad lines" in error.message and "nothing was imported" in error.message
    assert [(e["line"], e["field"]) for e in error.lines] == [(2, None), (3, "prompt"), (5, "messages[0].role")]


def test_missing_field_names_it():
    with pytest.raises(DataError, match=r"line 1: field 'rejected' is missing"):
        parse_lines(lines({"prompt": "a", "chosen": "b"}), "preferences")


def test_fields_are_never_silently_dropped():
    with pytest.raises(DataError, match=r"field 'score' is not a known field"):
        parse_lines(lines({"prompt": "a", "chosen": "b", "rejected": "c", "score": 3}), "preferences")


def test_pairs_uploaded_as_prompts_are_pointed_to_the_right_purpose():
    with pytest.raises(DataError, match="purpose 'preferences'"):
        parse_lines(lines({"prompt": "a", "chosen": "b", "rejected": "c"}), "prompts")


def test_empty_file_is_an_error():
    with pytest.raises(DataError, match="holds no records"):
        parse_lines(["", "  "], "prompts")


@pytest.mark.parametrize(
    "line, purpose, field",
    [
        ('{"prompt": "\\ud800"}', "prompts", "prompt"),
        ('{"messages": [{"role": "user", "content": "hi \\udfff"}]}', "prompts", "messages[0].content"),
        ('{"prompt": "ok", "metadata": {"k": "\\ud800"}}', "prompts", "metadata.k"),
        ('{"prompt": "ok", "metadata": {"\\ud800": "v"}}', "prompts", "metadata"),
        ('{"prompt": "ok", "id": ["a", "\\u0000"]}', "prompts", "id[1]"),
        ('{"prompt": "nul \\u0000 inside"}', "prompts", "prompt"),
        ('{"prompt": "a", "chosen": "\\ud83d", "rejected": "c"}', "preferences", "chosen"),
        ('{"text": "Paris.", "title": "\\udc00"}', "references", "title"),
    ],
)
def test_lone_surrogates_and_nul_are_refused_with_line_and_field(line, purpose, field):
    with pytest.raises(DataError) as info:
        parse_lines(['{"prompt": "fine"}' if purpose == "prompts" else line, line], purpose)
    bad = info.value.lines[-1]
    assert (bad["line"], bad["field"]) == (2, field), info.value.lines
    assert "NUL" in bad["message"] or "lone surrogate" in bad["message"]
    assert "\ud800" not in bad["message"] and "\x00" not in bad["message"]  # the message itself stays encodable
    bad["message"].encode("utf-8")
