"""`pymoe serve`: the real server (the CLI, in a subprocess) on loopback, with the demo MoE, driven by the
real `openai` client, by http.client and by raw sockets. Every wait is bounded."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from conftest import TESTS, run_pymoe

KEY = "sk-pymoe-test"
NAME = "demo-moe"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT = 60  # seconds, for any one HTTP exchange


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextlib.contextmanager
def serve(model: Path, log: Path, *extra: str) -> Iterator[Served]:
    """`pymoe serve MODEL --port 0 ...` until the block ends, then Ctrl-C: it must exit 0 within 30 s.

    One thread: on a busy 2-core machine llama.cpp's threads wait for each other and two are 10-30x slower."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pymoe", "serve", str(model), "--port", "0", "-t", "1", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=TESTS,
        )
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start: {log.read_text()}"
            time.sleep(0.05)
        yield Served(proc, log, int(m.group(1)))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    text = log.read_text()
    assert rc == 0, text
    assert text.rstrip().endswith("pymoe serve: stopped"), text
    # the summary of chat's /stats, logged at shutdown
    logged = re.search(r"stopped \(requests completed: \d+\); the model since it was loaded:\n((?:.+\n)+)pymoe", text)
    assert logged and re.search(r"^experts +", logged.group(1), re.M), text


@pytest.fixture(scope="module")
def server(demo_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(
        demo_gguf, log, "--ctx-size", "256", "--api-key", KEY, "--model-name", NAME, "--temp", "0",
        "--max-tokens-limit", "64", "--queue-size", "8",
    ) as s:  # fmt: skip
        yield s


@pytest.fixture
def client(server: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=TIMEOUT) as c:
        yield c


def request(port: int, method: str, path: str, body: object = None, *, key: str | None = KEY, raw: bytes | None = None):
    """One HTTP exchange with http.client; returns (status, decoded JSON body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp.headers
    finally:
        conn.close()


def raw_post(port: int, path: str, body: object) -> socket.socket:
    """Sends a POST on a raw socket and returns the socket, to be read from and closed by the caller."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
    sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection: {buf!r}"
        buf += chunk
    return buf


def wait_for(port: int, what: str, cond, timeout: float = 30) -> dict:
    """Polls /stats until cond(server counters) holds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = request(port, "GET", "/stats")[1]["server"]
        if cond(stats):
            return stats
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.05)


def assert_error(status: int, body: dict, want_status: int, param: str | None = None) -> dict:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error" or want_status in (429, 500, 503)
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------- the OpenAI API


def test_models_health_and_stats(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, health, _ = request(server.port, "GET", "/health", key=None)  # no key needed
    assert status == 200 and health["status"] == "ok" and health["model"] == NAME
    status, stats, _ = request(server.port, "GET", "/stats")
    assert status == 200
    assert stats["server"]["n_ctx"] == 256 and stats["server"]["queue_size"] == 8
    for counter in ("requests", "queued", "rejected", "completed", "disconnected"):
        assert isinstance(stats["server"][counter], int)
    model = stats["model"]
    assert model["n_ctx"] == 256 and "generated_tokens" in model and "offload" in model  # None: offload is off
    assert "8 experts" in model["experts"]


def test_chat_streamed_and_not(server, client):
    res = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=32)
    assert res.object == "chat.completion" and res.model == NAME and res.id.startswith("chatcmpl-")
    (choice,) = res.choices
    text = choice.message.content
    assert choice.message.role == "assistant" and "Paris" in text
    assert choice.finish_reason == "stop"
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.usage.prompt_tokens > 5 and 0 < res.usage.completion_tokens <= 32

    pieces, finish, usage, roles = [], None, None, []
    with client.chat.completions.create(
        model=NAME,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk" and chunk.model == NAME
            if chunk.usage is not None:
                usage = chunk.usage
                continue
            (c,) = chunk.choices
            roles += [c.delta.role] if c.delta.role else []
            pieces += [c.delta.content] if c.delta.content else []
            finish = c.finish_reason or finish
    assert roles == ["assistant"] and len(pieces) > 1
    assert "".join(pieces) == text and finish == "stop"
    assert usage.model_dump() == res.usage.model_dump()


def test_completions_streamed_and_not(client):
    res = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert res.object == "text_completion" and res.id.startswith("cmpl-")
    (choice,) = res.choices
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert res.usage.completion_tokens == 8 and res.usage.prompt_tokens == 5

    pieces, finish = [], None
    with client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            assert chunk.object == "text_completion"
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == choice.text and finish == "length"


def test_stop_strings_and_seeded_sampling(client):
    kw = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    res = client.completions.create(**kw, stop=".")
    assert res.choices[0].text == " Paris" and res.choices[0].finish_reason == "stop"
    kw = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_api_key(server):
    with (
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0, timeout=TIMEOUT) as bad,
        pytest.raises(openai.AuthenticationError) as e,
    ):
        bad.models.list()
    assert e.value.status_code == 401
    status, body, headers = request(server.port, "GET", "/v1/models", key=None)
    assert assert_error(status, body, 401)["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    status, body, _ = request(server.port, "POST", "/v1/chat/completions", {"messages": QUESTION}, key="wrong")
    assert_error(status, body, 401)
    status, body, _ = request(server.port, "GET", "/stats", key=None)
    assert_error(status, body, 401)


def test_api_key_from_a_file_or_the_environment(demo_gguf, tmp_path, monkeypatch):
    """Not only on the command line, where other users see it in `ps`."""
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    with serve(demo_gguf, tmp_path / "server.log", "-c", "128", "--api-key-file", str(key_file)) as srv:
        assert_error(*request(srv.port, "GET", "/v1/models", key=None)[:2], 401)
        assert_error(*request(srv.port, "GET", "/v1/models", key="wrong")[:2], 401)
        assert request(srv.port, "GET", "/v1/models")[0] == 200
    from pymoe.serve import resolve_api_key, setup_arg_parser

    parser = setup_arg_parser()
    monkeypatch.setenv("PYMOE_API_KEY", "from-env")
    assert resolve_api_key(parser.parse_args(["m.gguf"])) == "from-env"
    assert resolve_api_key(parser.parse_args(["m.gguf", "--api-key-file", str(key_file)])) == KEY
    monkeypatch.delenv("PYMOE_API_KEY")
    assert resolve_api_key(parser.parse_args(["m.gguf"])) is None
    (tmp_path / "empty").write_text("\n")
    proc = run_pymoe("serve", str(demo_gguf), "--api-key-file", str(tmp_path / "empty"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "must hold one line" in proc.stderr, proc.stderr
    proc = run_pymoe("serve", str(demo_gguf), "--api-key-file", str(key_file), "--api-key", "x")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr, proc.stderr


BAD_BODIES = [
    (b'{"messages": [', None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"model": NAME}, "messages", "messages"),
    ({"messages": "hi"}, "messages", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "wizard"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]", "content"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature", "temperature"),
    ({"messages": QUESTION, "temperature": 3}, "temperature", "temperature"),
    ({"messages": QUESTION, "top_p": True}, "top_p", "top_p"),
    ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens", "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 65}, "max_tokens", "--max-tokens-limit"),
    ({"messages": QUESTION, "stop": [1]}, "stop", "stop"),
    ({"messages": QUESTION, "stream": "yes"}, "stream", "stream"),
    ({"messages": QUESTION, "seed": 1.5}, "seed", "seed"),
    ({"messages": QUESTION, "n": 2}, "n", "n=1"),
    ({"messages": QUESTION, "logprobs": True}, "logprobs", "not supported"),
    ({"messages": QUESTION, "model": 3}, "model", "model"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_BODIES)
def test_bad_chat_requests_are_400(server, body, param, words):
    raw = body if isinstance(body, bytes) else None
    status, reply, _ = request(server.port, "POST", "/v1/chat/completions", body if raw is None else None, raw=raw)
    err = assert_error(status, reply, 400, param)
    assert words in err["message"]


def test_bad_completion_requests_and_limits(server, client):
    for body, param in (
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 99_999_999]}, "prompt"),
        ({"prompt": "", "max_tokens": 1}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
    ):
        status, reply, _ = request(server.port, "POST", "/v1/completions", body)
        assert_error(status, reply, 400, param)
    with pytest.raises(openai.BadRequestError) as e:  # the openai client sees the same errors
        client.chat.completions.create(model=NAME, messages=QUESTION, n=2)
    assert e.value.status_code == 400 and e.value.param == "n"
    # unknown fields are refused, not ignored; null stands for a field left out
    status, reply, _ = request(server.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "foo": [1]})
    assert assert_error(status, reply, 400, "foo")["code"] == "unsupported_parameter"
    status, reply, _ = request(server.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "foo": None})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1
    # bounds on the request itself, not on its content
    status, reply, headers = request(server.port, "POST", "/v1/completions", raw=b"x" * ((1 << 20) + 1))
    assert assert_error(status, reply, 413)["code"] == "request_too_large" and headers["Connection"] == "close"
    status, reply, _ = request(server.port, "GET", "/v2/nothing")
    assert_error(status, reply, 404)
    status, reply, _ = request(server.port, "GET", "/v1/completions")
    assert_error(status, reply, 405)
    status, reply, _ = request(server.port, "DELETE", "/v1/models")
    assert_error(status, reply, 405)


def test_prompt_longer_than_the_context_is_a_clear_400(server, client):
    long_text = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens; the context is 256
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long_text}], max_tokens=8)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert "context holds 256 tokens" in e.value.message and "--ctx-size" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=long_text, max_tokens=8, stream=True)
    assert e.value.code == "context_length_exceeded"
    # and the server goes on serving
    res = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=2, temperature=0)
    assert "Paris" in res.choices[0].text


# ---------------------------------------------------------------------- many clients

CITIES = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Germany": "Berlin"}


def test_concurrent_requests_get_their_own_answers(server, client):
    def ask(country: str, stream: bool) -> str:
        kw = {"model": NAME, "prompt": f"The capital of {country} is", "max_tokens": 6, "temperature": 0}
        if not stream:
            return client.completions.create(**kw).choices[0].text
        with client.completions.create(**kw, stream=True) as s:
            return "".join(chunk.choices[0].text for chunk in s)

    jobs = [(country, i % 2 == 1) for i, country in enumerate(CITIES)]
    sequential = [ask(c, s) for c, s in jobs]
    before = request(server.port, "GET", "/stats")[1]["server"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(ask, c, s) for c, s in jobs]
        concurrent = [f.result(timeout=120) for f in futures]
    assert concurrent == sequential
    for (country, _), text in zip(jobs, concurrent, strict=True):
        assert CITIES[country] in text, (country, text)
    after = request(server.port, "GET", "/stats")[1]["server"]
    assert after["completed"] - before["completed"] == len(jobs) and after["rejected_busy"] == before["rejected_busy"]


def test_queue_full_and_clients_that_leave(demo_gguf, tmp_path):
    """One generating, one waiting (--queue-size 1): the next is refused with 429. Clients that go away
    (waiting or mid-stream) free their place and the worker at once."""
    limit = 1000  # A would run for seconds even on a fast machine (greedy, it does not stop by itself)
    with serve(demo_gguf, tmp_path / "server.log", "-c", "1024", "--api-key", KEY, "--temp", "0",
               "--queue-size", "1", "--max-tokens-limit", str(limit)) as srv:  # fmt: skip
        port = srv.port
        # A: a long streamed answer; its first event means the worker is busy with it
        story = {"prompt": "Once upon a time", "max_tokens": limit, "stream": True}
        long_one = raw_post(port, "/v1/completions", story)
        try:
            head = read_until(long_one, b"data: ")
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            # D: waits in the queue, then leaves without reading
            with raw_post(port, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4}):
                wait_for(port, "D to be queued", lambda s: s["queued"] == 1)
            wait_for(port, "D to leave the queue", lambda s: s["queued"] == 0 and s["disconnected"] == 1)

            # B: waits in the queue (the real client)
            with (
                openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=TIMEOUT) as c,
                ThreadPoolExecutor(1) as pool,
            ):
                b = pool.submit(c.completions.create, model=NAME, prompt="The capital of France is", max_tokens=4)
                wait_for(port, "B to be queued", lambda s: s["queued"] == 1)
                # C: refused, the queue is full
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model=NAME, prompt="Hello", max_tokens=4)
                assert e.value.status_code == 429 and e.value.code == "queue_full"
                assert e.value.response.headers["Retry-After"] == "1"

                # A goes away mid-stream: its generation stops and B is served
                long_one.close()
                t0 = time.monotonic()
                res = b.result(timeout=TIMEOUT)
                waited = time.monotonic() - t0
            assert "Paris" in res.choices[0].text
        finally:
            long_one.close()
        stats = wait_for(port, "the worker to be idle", lambda s: not s["running"])
        assert stats["disconnected"] == 2 and stats["rejected_busy"] == 1 and stats["completed"] == 1
        model = request(port, "GET", "/stats")[1]["model"]
        # A stopped early: the tokens generated in all, less B's 4, are far fewer than A asked for
        assert model["calls"] == 2 and model["generated_tokens"] - 4 < limit // 2, (model, waited)
    log = srv.log.read_text()
    assert "stopped (requests completed: 1); the model since it was loaded:\nspeed        prompt " in log, log
    assert f"generation {model['generated_tokens'] / model['generate_seconds']:.1f} tok/s" in log, log


def test_port_in_use_is_one_clear_line(server, demo_gguf):
    proc = run_pymoe("serve", str(demo_gguf), "--port", str(server.port), "-c", "128", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pick another --port" in proc.stderr, proc.stderr


def read_all(sock: socket.socket) -> bytes:
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
    return buf


def test_library_server_bounds_connections_and_closes_with_requests_in_flight(demo_gguf):
    """`pymoe.server.Server` in this process: one connection over max_connections, all answering requests,
    gets a 503 at once; close() answers the waiting request 503, ends the running stream with an error
    event, and returns."""
    from pymoe import Model
    from pymoe.server import Server

    with Model(demo_gguf, n_ctx=1024, n_threads=1) as model:
        srv = Server(model, port=0, queue_size=1, max_connections=2, max_tokens_limit=1000, sampling={"temperature": 0})
        srv.start()
        socks: list[socket.socket] = []
        try:
            socks.append(raw_post(srv.port, "/v1/completions", {"prompt": "Once upon a time", "stream": True}))
            assert read_until(socks[0], b"data: ").startswith(b"HTTP/1.1 200")
            socks.append(raw_post(srv.port, "/v1/completions", {"prompt": "Hello", "max_tokens": 4}))
            deadline = time.monotonic() + 30
            while srv.stats()["server"]["queued"] != 1:
                assert time.monotonic() < deadline, srv.stats()
                time.sleep(0.02)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as extra:
                refused = read_all(extra)
            assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused

            t0 = time.monotonic()
            srv.close()
            assert time.monotonic() - t0 < 20
            waiting = read_until(socks[1], b"}}")
            assert waiting.startswith(b"HTTP/1.1 503") and b"shutting down" in waiting
            stream = read_until(socks[0], b"data: [DONE]")
            assert b'"error": {"message": "the server is shutting down"' in stream
        finally:
            srv.close()
            for s in socks:
                s.close()
