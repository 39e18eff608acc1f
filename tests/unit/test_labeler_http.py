"""The OpenAI-compatible labeler against real HTTP servers on localhost (tests/chat_server.py).

Log-probs read over HTTP must equal the local model's own; an endpoint without log-probs falls back
to parsed verdicts; timeouts, 5xx, refused credentials, malformed and non-completion answers
become LabelerUnavailable / LabelerBadResponse naming the setting to fix.
"""

import time

import pytest
from chat_server import LocalChatModel, create_app, serve

from qdpo_cli.demo import free_port
from qdpo_core.config import LabelerSpec
from qdpo_core.labelers import LabelerBadResponse, LabelerUnavailable
from qdpo_core.labelers.local import LocalLabeler
from qdpo_core.labelers.openai_api import OpenAILabeler
from qdpo_core.labelers.pairwise import compare, comparison_prompt


def _labeler(base_url, **settings):
    return OpenAILabeler(LabelerSpec(kind="openai", base_url=base_url, model="test-model", **settings), "rlaif.labeler")


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    return LocalChatModel(tiny_model_dir)


def test_log_probs_over_http_equal_the_local_models(tokenizer):
    # the bundled SmolLM2 puts "1" and "2" among its 20 likeliest first tokens; a random tiny model does not
    from qdpo_core.models import resolve_model_dir

    chat = LocalChatModel(resolve_model_dir("smollm2-135m-instruct"))
    local = LocalLabeler(chat.model, chat.tokenizer, "smollm2", batch_size=2)
    conversations = [
        comparison_prompt([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "It is Berlin, a city in Germany."),
        comparison_prompt([{"role": "user", "content": "Name a yellow fruit."}], "I like cars.", "Banana."),
        comparison_prompt([{"role": "user", "content": "2+2?"}], "4", "5"),
    ]
    app = create_app(chat=chat)
    with serve(app) as base_url:
        remote = _labeler(base_url, max_concurrency=2).choose(conversations, ("1", "2"))
    expected = local.choose(conversations, ("1", "2"))  # batched, left-padded: must match one-by-one serving
    for got, want in zip(remote, expected):
        assert got.source == "logprobs"
        assert got.logprobs == pytest.approx(want.logprobs, abs=2e-3)
        assert got.probs == pytest.approx(want.probs, abs=1e-3)
    asked = [r["payload"] for r in app.state.requests]
    assert len(asked) == 3 and all(p["logprobs"] is True and p["top_logprobs"] == 20 and p["max_tokens"] == 1 for p in asked)


def test_free_text_replies_come_back_stripped_and_greedy_at_temperature_zero(tiny_chat):
    conversation = [{"role": "user", "content": "Say something."}]
    with serve(create_app(chat=tiny_chat)) as base_url:
        labeler = _labeler(base_url)
        first, second = labeler.reply([conversation, conversation], max_tokens=6)
    expected, _, _ = tiny_chat.complete(conversation, 6, 0.0, 0, None)
    assert first == second == expected.strip() and first


def test_endpoint_without_log_probs_falls_back_to_parsed_verdicts():
    app = create_app(mode="rule")
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    with serve(app) as base_url:
        labeler = _labeler(base_url)
        [comparison] = compare(labeler, [(question, "Rayleigh scattering of sunlight by air molecules.", "Magic.")])
    # the rule judge prefers the longer answer in both orders, so the swap-averaged label is decisive
    assert comparison.p_first == 1.0
    assert comparison.sources == ("parsed", "parsed")
    assert comparison.forward.text == "Response 1 is better." and comparison.swapped.text == "I prefer Response 2."
    assert labeler.logprobs_supported is False
    payloads = [r["payload"] for r in app.state.requests]
    # first ask wants log-probs; once none came back, verdicts are read from short replies only
    assert payloads[0].get("logprobs") is True
    assert all(not p.get("logprobs") and p["max_tokens"] > 1 for p in payloads[2:])
    assert len(payloads) == 3  # one probe, then one plain ask per order


def test_timeout_is_retried_then_reported_with_the_setting_to_fix():
    app = create_app(mode="slow", delay=5)
    with serve(app) as base_url:
        labeler = _labeler(base_url, timeout_seconds=0.3, max_retries=1)
        started = time.monotonic()
        with pytest.raises(LabelerUnavailable) as info:
            labeler.choose([[{"role": "user", "content": "1 or 2?"}]], ("1", "2"))
        elapsed = time.monotonic() - started
    assert info.value.param == "rlaif.labeler.base_url"
    assert base_url in info.value.message and "timeout_seconds=0.3" in info.value.message
    assert info.value.to_dict()["code"] == "labeler_unavailable"
    assert len(app.state.requests) == 2  # the first try and one retry
    assert elapsed < 4  # gave up on time, did not wait for the slow answers


@pytest.mark.parametrize("mode, words", [("malformed", "not JSON"), ("no_choices", "without 'choices'")])
def test_answers_that_are_not_chat_completions_are_a_clear_error(mode, words):
    app = create_app(mode=mode)
    with serve(app) as base_url:
        with pytest.raises(LabelerBadResponse) as info:
            _labeler(base_url, max_retries=2).reply([[{"role": "user", "content": "hi"}]], max_tokens=4)
    assert words in info.value.message and base_url in info.value.message
    assert info.value.param == "rlaif.labeler.base_url" and info.value.code == "labeler_bad_response"
    assert len(app.state.requests) == 1  # garbage is not retried


def test_unreachable_endpoint_is_reported():
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LabelerUnavailable, match="cannot be reached") as info:
        _labeler(base_url, max_retries=1).reply([[{"role": "user", "content": "hi"}]], max_tokens=4)
    assert base_url in info.value.message


def test_server_errors_are_retried_until_the_retries_run_out(tiny_chat):
    conversation = [[{"role": "user", "content": "hi"}]]
    recovering = create_app(mode="flaky", fail_first=2, chat=tiny_chat)
    with serve(recovering) as base_url:
        [text] = _labeler(base_url, max_retries=2).reply(conversation, max_tokens=4)
    assert text and len(recovering.state.requests) == 3
    failing = create_app(mode="flaky", fail_first=5, chat=tiny_chat)
    with serve(failing) as base_url:
        with pytest.raises(LabelerUnavailable, match="HTTP 503") as info:
            _labeler(base_url, max_retries=1).reply(conversation, max_tokens=4)
    assert len(failing.state.requests) == 2 and "2 attempts" in info.value.message


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    app = create_app(mode="rule", api_key="s3cret")
    conversation = [[{"role": "user", "content": "Ready?"}]]
    with serve(app) as base_url:
        monkeypatch.delenv("TEST_LABELER_KEY", raising=False)
        with pytest.raises(LabelerUnavailable, match="TEST_LABELER_KEY"):
            _labeler(base_url, api_key_env="TEST_LABELER_KEY").reply(conversation, max_tokens=2)
        monkeypatch.setenv("TEST_LABELER_KEY", "s3cret")
        assert _labeler(base_url, api_key_env="TEST_LABELER_KEY").reply(conversation, max_tokens=2) == ["Yes"]
    assert app.state.requests[-1]["authorization"] == "Bearer s3cret"
