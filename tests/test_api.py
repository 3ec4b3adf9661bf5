"""`chipspan api`, started as a subprocess and asked with the official `openai` client: its answers
are `chipspan chat --prompt`'s, plain and streamed, concurrent requests are all answered, and bad
requests get OpenAI-style 4xx errors while the server stays up."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from chipspan.cli import main
from chipspan.data import template_tools
from chipspan.errors import ChipspanError
from chipspan.infer.api import RequestError, ServerSettings, parse_chat_request

pytestmark = pytest.mark.multiprocess

KEY = "sk-test-key"
FLAGS = ["--template", "default", "--do_sample", "false", "--max_new_tokens", "12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_workspace):
    """(base URL, model id) of a `chipspan api` subprocess serving tiny_workspace's model."""
    port = free_port()
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    model = tiny_workspace / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "chipspan", "api", "--model_name_or_path", str(model), *FLAGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"chipspan api did not start:\n{process.stdout.read()}")
        time.sleep(0.3)
    yield url, model.resolve().name
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def chat_answer(model_folder, message: str, *flags) -> str:
    """What `chipspan chat --prompt` prints for ``message`` (its trailing newline dropped)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["chat", "--model_name_or_path", str(model_folder), *FLAGS, *flags, "--prompt", message]) == 0
    return out.getvalue().removesuffix("\n")


def test_plain_and_streamed_answers_are_chats(server, client, tiny_workspace):
    url, name = server
    assert [m.id for m in client.models.list()] == [name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = chat_answer(tiny_workspace / "model", "Hello", "--system", "Be brief.")
    plain = client.chat.completions.create(model=name, messages=messages)
    assert plain.choices[0].message.content == want and want
    assert plain.usage.completion_tokens > 0 and plain.usage.total_tokens > plain.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_request_settings_apply(server, client):
    _, name = server
    ask = [{"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(model=name, messages=ask).choices[0].message.content
    short = client.chat.completions.create(model=name, messages=ask, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.startswith(short.choices[0].message.content)
    cut = full[len(full) // 2 :][:3]
    stopped = client.chat.completions.create(model=name, messages=ask, stop=[cut])
    assert stopped.choices[0].message.content == full[: full.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(model=name, messages=ask, temperature=1.5, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # the request's seed repeats


def test_concurrent_requests_are_all_answered(server, client):
    _, name = server
    questions = ["Hello", "How are you?", "Name a colour.", "Count to three."]

    def ask(question):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}])
        return reply.choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


def test_bad_requests_get_4xx_json_and_the_server_stays_up(server, client):
    url, name = server
    auth = {"Authorization": f"Bearer {KEY}"}

    def refused(status, body=None, content=None, headers=auth, path="/chat/completions"):
        answer = httpx.post(url + path, json=body, content=content, headers=headers, timeout=60)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["message"] and error["type"]
        return error

    refused(400, content=b'{"model": ')
    refused(400, content=b"[1, 2")
    assert refused(404, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})["param"] == "model"
    assert refused(401, {"model": name, "messages": []}, headers={"Authorization": "Bearer wrong"})["code"] == (
        "invalid_api_key"
    )
    refused(401, {"model": name, "messages": []}, headers={})
    for body in (
        {"model": name, "messages": []},
        {"model": name, "messages": [{"role": "assistant", "content": "hi"}]},
        {"model": name, "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
        {"model": name, "messages": [{"role": "user", "content": {"image": 1}}]},
        {"model": name, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": name, "messages": [{"role": "user", "content": "hi"}], "n": 2},
        {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"model": name, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        {"model": name, "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5},
    ):
        refused(400, body)
    assert httpx.get(url + "/nowhere", headers=auth).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content  # still up


def test_a_conversation_past_the_context_is_a_400(server, client, tiny_workspace):
    _, name = server
    context = json.loads((tiny_workspace / "model" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(openai.BadRequestError, match="model's context"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi " * context}])


class FakeEngine:
    context, name = 4096, "m"


def test_openai_messages_become_the_templates_turns():
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "now?"}]},
            {"role": "assistant", "content": "I will look."},
            {"role": "tool", "content": "sunny"},
        ],
        "temperature": 0,
        "max_tokens": 5,
        "stop": "END",
    }
    chat = parse_chat_request(body, "m", FakeEngine())
    assert chat.system == "Be brief."
    assert chat.turns == [("user", "Weather now?"), ("assistant", "I will look."), ("observation", "sunny")]
    assert chat.changes == {"temperature": 0, "max_new_tokens": 5} and chat.stop == ["END"]
    with pytest.raises(RequestError, match="'tools' must be a list"):
        parse_chat_request({**body, "tools": [{"type": "function"}]}, "m", FakeEngine())
    with pytest.raises(RequestError, match="tool_choice"):
        parse_chat_request({**body, "tools": [WEATHER], "tool_choice": "required"}, "m", FakeEngine())
    assert parse_chat_request({**body, "tools": [WEATHER], "tool_choice": "none"}, "m", FakeEngine()).tools == ""


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLS = [{"name": "get_weather", "arguments": {"city": "巴黎", "days": 2}}, {"name": "time", "arguments": {}}]


@pytest.mark.parametrize("tool_format", ["default", "llama3", "qwen", "mistral", "glm4"])
def test_function_calls_read_back_from_the_text_training_writes(tool_format):
    calls = CALLS[:1] if tool_format == "glm4" else CALLS  # glm4 has no parallel calls
    text = template_tools.calls_text(tool_format, json.dumps(calls))
    got = template_tools.extract_calls(tool_format, text)
    assert [(name, json.loads(arguments)) for name, arguments in got] == [(c["name"], c["arguments"]) for c in calls]
    for answer in ("Paris is the capital of France.", '{"a": 1}', "Action: x\nAction Input: not json", ""):
        assert template_tools.extract_calls(tool_format, answer) is None


def test_tools_reach_the_prompt_as_the_template_lists_them(tiny_workspace):
    from chipspan.args import parse_run_arguments
    from chipspan.data.encode import encode_prompt
    from chipspan.infer.engine import Engine

    run = parse_run_arguments(["--model_name_or_path", str(tiny_workspace / "model"), *FLAGS], {})
    engine = Engine.load(run, report=lambda _: None)
    turns, tools = [("user", "Weather in Paris?")], json.dumps([WEATHER["function"]])
    with_tools = engine.prompt_ids(turns, tools=tools)
    assert with_tools == encode_prompt(turns, engine.template, engine.tokenizer, "", tools)
    assert with_tools != engine.prompt_ids(turns) and "get_weather" in engine.tokenizer.decode(with_tools)
    with pytest.raises(ChipspanError, match="cannot be listed in tool format lf-0.5"):  # 0.5's reading drops it
        engine.prompt_ids(turns, tools=json.dumps([{"name": "x", "parameters": {}}]))


class ScriptedEngine:
    """An engine whose answer is given: what the server makes of the answer is under test."""

    context, name = 4096, "m"

    def __init__(self, answer: str):
        from chipspan.infer.engine import Completion

        self.answer, self.asked, self.completion = answer, [], Completion
        self.settings = None

    def with_settings(self, **changes):
        return changes

    def generate(self, turns, system, settings, stop, on_text, within_context, tools):
        self.asked.append((turns, tools))
        if on_text is not None:
            on_text(self.answer)
        return self.completion(self.answer, 5, 7, "stop")

    def function_calls(self, answer):
        return template_tools.extract_calls("default", answer)


def test_a_function_call_answer_comes_back_as_tool_calls(tmp_path):
    from starlette.testclient import TestClient

    from chipspan.infer.api import Server

    engine = ScriptedEngine('Action: get_weather\nAction Input: {"city": "Paris"}')
    client = TestClient(Server(engine, ServerSettings()).app)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny in Rome."},
        {"role": "user", "content": "And Paris?"},
    ]  # fmt: skip
    body = {"model": "m", "messages": messages, "tools": [WEATHER]}
    reply = client.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    turns, tools = engine.asked[0]
    assert turns[1] == ("function", '[{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert turns[2] == ("observation", "sunny") and json.loads(tools) == [WEATHER["function"]]
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    text = client.post("/v1/chat/completions", json={**body, "tools": []}).json()["choices"][0]
    assert text["message"]["content"] == engine.answer and text["finish_reason"] == "stop"  # no tools offered


@pytest.mark.parametrize(
    "variable,value,message",
    [("API_PORT", "80000", "API_PORT='80000': must be a whole number in [0, 65535]"), ("API_QUEUE", "0", "API_QUEUE")],
)
def test_bad_server_settings_are_one_line_before_weights_load(
    tiny_workspace, monkeypatch, capsys, no_weight_loading, variable, value, message
):
    monkeypatch.setenv(variable, value)
    assert main(["api", "--model_name_or_path", str(tiny_workspace / "model"), *FLAGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chipspan: error: ") and message in err[0]


def test_environment_as_llamafactory_reads_it():
    settings = ServerSettings.from_environment({"API_HOST": "127.0.0.1", "API_PORT": "9000", "API_KEY": "k"})
    assert (settings.host, settings.port, settings.key, settings.model_name) == ("127.0.0.1", 9000, "k", None)
    assert ServerSettings.from_environment({}) == ServerSettings("0.0.0.0", 8000, None, None, 64)
