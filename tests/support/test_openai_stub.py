"""The stub itself speaks enough OpenAI for litellm (so tests that use it test something real)."""

import pytest

from tests.support.openai_stub import Reply, StubServer, chat_completion


def test_litellm_round_trip_and_error_status():
    import litellm

    def handler(body, n):
        if n == 0:
            return Reply(status=500, body={"error": {"message": "boom"}})
        return Reply(body=chat_completion("hello", prompt_tokens=3, completion_tokens=2))

    with StubServer(handler) as stub:
        with pytest.raises(Exception, match="boom"):
            litellm.completion(model="openai/stub", api_base=stub.url, api_key="x", max_retries=0,
                               messages=[{"role": "user", "content": "hi"}])
        out = litellm.completion(model="openai/stub", api_base=stub.url, api_key="x",
                                 messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "hello"
    assert out.usage.total_tokens == 5
    assert stub.requests[1]["messages"][0]["content"] == "hi"
