"""Reading and validating the JSONL files users supply.

Accepted shapes (one JSON object per line, blank lines ignored):

- prompts:      {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
- references:   {"text": "...", "title": "..."}   (passages for the factuality scorer)
- preferences:  TRL      {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                OpenAI   {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
                          "non_preferred_output": [{...}]}

Every record may also carry "id" and "metadata". Any other field is an error, not silently dropped.
Every string in a record (keys included) must be valid Unicode without NUL: a JSON escape such as
"\\ud800" decodes to a lone surrogate that no later step could write out again.
Everything is checked before anything is used: a `DataError` lists every bad line (line number,
field, message), so a file is accepted whole or not at all. No torch here (the API validates uploads).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdpo_core.config import text_problem
from qdpo_core.errors import DataError

ROLES = ("system", "user", "assistant")
PASSTHROUGH_FIELDS = {"id", "metadata"}
MAX_LISTED_ERRORS = 50


class _LineError(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _messages(value: Any, field: str, must_end_with: str | None = None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _LineError(field, "must be a non-empty list of {'role', 'content'} messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise _LineError(where, "must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _LineError(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _LineError(f"{where}.content", "must be a non-empty string")
        out.append({"role": role, "content": content})
    if must_end_with and out[-1]["role"] != must_end_with:
        raise _LineError(field, f"the last message must have role '{must_end_with}'; got '{out[-1]['role']}'")
    return out


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _LineError(field, "must be a non-empty string")
    return value


def _prompt_messages(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, field)}]
    if not isinstance(value, list):
        raise _LineError(field, f"must be a string or a list of {{'role', 'content'}} messages; got {type(value).__name__}")
    return _messages(value, field, must_end_with="user")


def _response_text(value: Any, field: str) -> str:
    """A response given as a string or as a list holding one assistant message."""
    if isinstance(value, str):
        return _text(value, field)
    msgs = _messages(value, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _LineError(field, "must be a string or a list with exactly one assistant message")
    return msgs[0]["content"]


def _check_text_everywhere(value: Any, field: str | None = None) -> None:
    """Every string and key, at any depth, is valid Unicode without NUL; the error names where."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise _LineError(field, problem)
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key)
            if problem is not None:  # the field is named by its parent: the bad key itself cannot be echoed
                raise _LineError(field, f"has a key that {problem}")
            _check_text_everywhere(item, f"{field}.{key}" if field else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text_everywhere(item, f"{field}[{i}]" if field else f"[{i}]")


def _check_fields(record: dict, allowed: set[str], hint: str) -> None:
    for key in record:
        if key not in allowed and key not in PASSTHROUGH_FIELDS:
            raise _LineError(key, f"is not a known field ({hint})")


def parse_prompt_record(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _LineError(None, "each line must be a JSON object")
    if "chosen" in record or "preferred_output" in record:
        raise _LineError("chosen" if "chosen" in record else "preferred_output", "looks like a preference pair; upload it with purpose 'preferences'")
    if "prompt" in record and "messages" in record:
        raise _LineError("prompt", "give either 'prompt' or 'messages', not both")
    if "messages" in record:
        _check_fields(record, {"messages"}, "a prompt line has 'prompt' or 'messages'")
        messages = _prompt_messages(record["messages"], "messages")
    elif "prompt" in record:
        _check_fields(record, {"prompt"}, "a prompt line has 'prompt' or 'messages'")
        messages = _prompt_messages(record["prompt"], "prompt")
    else:
        raise _LineError("prompt", "is missing (give 'prompt': str or 'messages': [...])")
    return _with_passthrough(record, {"messages": messages})


def parse_preference_record(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _LineError(None, "each line must be a JSON object")
    if "input" in record or "preferred_output" in record or "non_preferred_output" in record:
        _check_fields(record, {"input", "preferred_output", "non_preferred_output"}, "OpenAI preference format")
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in record:
                raise _LineError(key, "is missing (OpenAI preference format needs input, preferred_output, non_preferred_output)")
        if not isinstance(record["input"], dict) or "messages" not in record["input"]:
            raise _LineError("input.messages", "is missing")
        messages = _messages(record["input"]["messages"], "input.messages", must_end_with="user")
        chosen = _response_text(record["preferred_output"], "preferred_output")
        rejected = _response_text(record["non_preferred_output"], "non_preferred_output")
    else:
        _check_fields(record, {"prompt", "chosen", "rejected"}, "TRL format has prompt, chosen, rejected")
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise _LineError(key, "is missing (TRL format needs prompt, chosen, rejected)")
        messages = _prompt_messages(record["prompt"], "prompt")
        chosen = _response_text(record["chosen"], "chosen")
        rejected = _response_text(record["rejected"], "rejected")
    return _with_passthrough(record, {"messages": messages, "chosen": chosen, "rejected": rejected})


def _with_passthrough(record: dict, parsed: dict) -> dict:
    for key in PASSTHROUGH_FIELDS:
        if key in record:
            parsed[key] = record[key]
    return parsed


def parse_passage_record(record: Any) -> dict:
    """A reference passage for the factuality scorer: {"text": str, "title"?: str}."""
    if not isinstance(record, dict):
        raise _LineError(None, "each line must be a JSON object with a 'text' field")
    _check_fields(record, {"text", "title"}, "a passage has 'text' and optionally 'title'")
    if "text" not in record:
        raise _LineError("text", "is missing (each passage needs 'text')")
    text = _text(record["text"], "text")
    if "title" in record and not isinstance(record["title"], str):
        raise _LineError("title", "must be a string")
    return _with_passthrough(record, {"text": text, **({"title": record["title"]} if "title" in record else {})})


PARSERS = {"prompts": parse_prompt_record, "preferences": parse_preference_record, "references": parse_passage_record}


def parse_lines(lines: Iterable[str | bytes], purpose: str, param: str = "file") -> list[dict]:
    """Parse every line; raise one DataError listing all bad lines, or return all records.

    `param` names the setting the file came from in the error (an upload is "file").
    """
    if purpose not in PARSERS:
        raise DataError(f"purpose: got {purpose!r}; use one of {', '.join(PARSERS)}", param="purpose")
    parse = PARSERS[purpose]
    records: list[dict] = []
    errors: list[dict] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append({"line": number, "field": None, "message": "is not valid UTF-8"})
                continue
        text = raw.lstrip("\ufeff").strip()
        if not text:
            continue
        try:
            record = json.loads(text)
            _check_text_everywhere(record)
            records.append(parse(record))
        except json.JSONDecodeError as exc:
            errors.append({"line": number, "field": None, "message": f"is not valid JSON ({exc.msg} at column {exc.colno})"})
        except _LineError as exc:
            errors.append({"line": number, "field": exc.field, "message": exc.message})
    if errors:
        first = errors[0]
        prefix = "" if param == "file" else f"{param}: "
        where = prefix + f"line {first['line']}: " + (f"field '{first['field']}' " if first["field"] else "")
        more = f" ({len(errors)} bad lines in all; nothing was imported)" if len(errors) > 1 else " (nothing was imported)"
        raise DataError(where + first["message"] + more, param=param, lines=errors[:MAX_LISTED_ERRORS])
    if not records:
        prefix = "the file" if param == "file" else f"{param}: the file"
        raise DataError(f"{prefix} holds no records; a {purpose} file needs at least one JSON line", param=param)
    return records


def read_jsonl(path: str | Path, purpose: str, param: str = "dataset") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{param}: file {path.name} not found", param=param)
    with path.open("rb") as handle:
        return parse_lines(handle, purpose, param="file" if param == "dataset" else param)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write atomically: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def load_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file this package wrote itself (no validation)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
