"""jaxlm.serve: the OpenAI-compatible server, driven by the official `openai` client.

One tiny model, one in-process uvicorn server for the module; greedy outputs are checked
against the static engine (jaxlm.infer.generate), the independent reference.
"""
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from jaxlm.infer import generate
from jaxlm.infer.scheduler import Request, Scheduler
from jaxlm.model import Config
from jaxlm.model.build import create
from jaxlm.model.io.tokenizer import ByteTokenizer
from jaxlm.serve import (DEFAULT_TEMPLATE, Aborted, ChatTemplate, ServingLoop, ShuttingDown,
                         create_app, load_template)
from jaxlm.serve.protocol import Output

CFG = Config(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
             max_position=256)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def lm():
    return create(CFG, seed=0)


def scheduler(lm, **kw):
    kw = {"page_size": 16, "max_seqs": 8, "max_batched_tokens": 128, **kw}
    return Scheduler(lm, tokenizer=kw.pop("tokenizer", TOK), **kw)


@contextlib.contextmanager
def running(app):
    """app served by uvicorn in a thread on a free port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def srv(lm):
    app = create_app(scheduler(lm), tokenizer=TOK, model_name="tiny")
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield type("Srv", (), {"url": url, "app": app, "client": client})


def reference(lm, ids, n):
    return generate(lm, [ids], max_new_tokens=n)[0]


def post(url, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx2.post(url, content=data, headers={"content-type": "application/json"},
                       timeout=60, **kw)


# Completions --------------------------------------------------------------------------
def test_completion_text_prompt_is_greedy_reference(srv, lm):
    r = srv.client.completions.create(model="tiny", prompt="Hello", max_tokens=12,
                                      temperature=0, extra_body={"return_token_ids": True})
    want = reference(lm, TOK.encode("Hello"), 12)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.token_ids == want and choice.prompt_token_ids == TOK.encode("Hello")
    assert choice.text == TOK.decode(want) and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == 17


def test_completion_token_prompt_and_stream(srv, lm):
    ids = [72, 105, 33, 10, 7]
    r = srv.client.completions.create(model="tiny", prompt=[ids], max_tokens=9,
                                      temperature=0, extra_body={"return_token_ids": True})
    want = reference(lm, ids, 9)
    assert r.choices[0].token_ids == want
    chunks = list(srv.client.completions.create(model="tiny", prompt=ids, max_tokens=9,
                                                temperature=0, stream=True,
                                                extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks) == TOK.decode(want)
    assert sum((c.choices[0].token_ids for c in chunks), []) == want
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def _stop_case(lm, prompt):
    """A stop string (one ASCII byte the greedy output holds, not at its start) and
    the text OpenAI would return: everything before its first occurrence."""
    out = reference(lm, TOK.encode(prompt), 24)
    k = next((i for i, t in enumerate(out) if 32 <= t < 127 and i >= 2), None)
    if k is None:
        pytest.skip("the tiny model's greedy output has no printable byte")
    stop = chr(out[k])
    full = TOK.decode(out[:k + 1])
    return stop, full[:full.index(stop)]


def test_stop_string_trims_text(srv, lm):
    stop, want = _stop_case(lm, "Once")
    r = srv.client.completions.create(model="tiny", prompt="Once", max_tokens=24,
                                      temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(srv.client.completions.create(model="tiny", prompt="Once", max_tokens=24,
                                                temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampled_with_seed_is_reproducible(srv):
    kw = dict(model="tiny", prompt="abc", max_tokens=8, temperature=0.8, top_p=0.9,
              seed=7, extra_body={"return_token_ids": True, "top_k": 20, "min_p": 0.01})
    a, b = (srv.client.completions.create(**kw).choices[0].token_ids for _ in range(2))
    assert a == b and len(a) == 8


# Chat ---------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_chat_uses_builtin_template(srv, lm):
    prompt = TOK.encode(ChatTemplate().render(MESSAGES))
    assert ChatTemplate().render(MESSAGES) == \
        "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    want = reference(lm, prompt, 10)
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                           temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == TOK.decode(want)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 10
    chunks = list(srv.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == TOK.decode(want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_template_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    source = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
              "{{ raise_exception('no tools') }}{% endif %}"
              "{% if loop.index0 > 5 %}{% break %}{% endif %}\n"
              "  <{{ m['role'] }}>{% generation %}{{ m['content'] | trim }}{% endgeneration %}"
              "{{ m | tojson }}</s>\n"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=source, bos_token="<s>",
                                 eos_token="</s>")
    hf.save_pretrained(tmp_path)
    messages = MESSAGES + [{"role": "assistant", "content": " <b>é</b> "}]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert load_template(str(tmp_path)).render(messages) == want
    # the other stored form: a list of named templates in tokenizer_config.json
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": source}]
    config["bos_token"] = {"content": "<s>"}
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert load_template(str(tmp_path)).render(messages) == want
    with pytest.raises(ValueError, match="no tools"):
        load_template(str(tmp_path)).render([{"role": "tool", "content": ""}])
    assert load_template(None).source == DEFAULT_TEMPLATE


def test_output_holds_back_a_possible_stop_string():
    out = Output(TOK, stop_strings=["END"])
    out.add(TOK.encode("abcE"))
    assert out.delta(final=False) == "abc"      # "E" may start "END"
    out.add(TOK.encode("N"))
    assert out.delta(final=False) == ""
    out.add(TOK.encode("Dxyz"))
    assert out.stopped and out.text == "abc" and out.delta(final=True) == ""


# Other routes -------------------------------------------------------------------------
def test_models_health_metrics(srv):
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    assert httpx2.get(srv.url + "/health").json() == {"status": "ok"}
    text = httpx2.get(srv.url + "/metrics").text
    for name in ("jaxlm_queue_length", "jaxlm_running_sequences", "jaxlm_pages_in_use",
                 "jaxlm_pages_total", "jaxlm_time_to_first_token_seconds_bucket",
                 "jaxlm_time_per_output_token_seconds_count",
                 "jaxlm_generated_tokens_total", "jaxlm_tokens_per_second",
                 "jaxlm_compiled_programs", "jaxlm_prefix_hit_tokens"):
        assert name in text
    served = sum(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("jaxlm_requests_total{outcome=\"length\"}")
                 or line.startswith("jaxlm_requests_total{outcome=\"stop\"}"))
    assert served >= 3


def test_tokens_per_second_gauge_is_the_windowed_rate(monkeypatch):
    from jaxlm.serve import metrics as M
    clock = iter([0.0, 2.0, 20.0, 21.0])
    monkeypatch.setattr(M.time, "monotonic", lambda: next(clock))
    m = M.Metrics()
    rate = lambda: m.throughput._value.get()  # noqa: E731
    m.scheduler_stats({"tokens_total": 0})
    m.scheduler_stats({"tokens_total": 100})
    assert rate() == 50.0                        # 100 tokens in 2 s
    m.scheduler_stats({"tokens_total": 100})     # 18 s idle: the window forgets t = 0
    m.scheduler_stats({"tokens_total": 130})
    assert rate() == pytest.approx(30 / 19)      # since t = 2, the window's oldest kept


# Errors -------------------------------------------------------------------------------
def _error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("body,param", [
    ('{"model": "tiny", "prompt": "x",', None),                       # malformed JSON
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x" * 300}, "prompt"),               # > max_len
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "tiny", "prompt": [1, 999]}, "prompt"),                # id out of vocab
    ({"model": "tiny"}, "prompt"),
])
def test_bad_completion_requests(srv, body, param):
    _error(post(srv.url + "/v1/completions", body), 400, param)


def test_bad_chat_requests_and_routes(srv):
    url = srv.url + "/v1/chat/completions"
    _error(post(url, {"model": "tiny", "messages": "hi"}), 400, "messages")
    _error(post(url, {"model": "tiny", "messages": [{"content": "x"}]}), 400)
    _error(post(url, {"model": "tiny", "messages": MESSAGES, "temperature": "hot"}), 400)
    _error(httpx2.get(srv.url + "/v1/nothing"), 404)
    with pytest.raises(openai.BadRequestError):  # the client parses our error JSON
        srv.client.completions.create(model="tiny", prompt="x", max_tokens=0)
    r = srv.client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert r.choices[0].finish_reason == "length"  # still serving


def test_no_tokenizer_and_api_key(lm):
    app = create_app(scheduler(lm, tokenizer=None), model_name="ids", api_key="sekret")
    with TestClient(app) as c:
        auth = {"Authorization": "Bearer sekret"}
        _error(c.post("/v1/completions", json={"prompt": [1, 2]}), 401)
        _error(c.post("/v1/completions", json={"prompt": [1, 2]},
                      headers={"Authorization": "Bearer wrong"}), 401)
        _error(c.get("/v1/models"), 401)
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "hi"}, headers=auth)
        _error(r, 400, "prompt")
        assert "no tokenizer" in r.json()["error"]["message"]
        _error(c.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=auth), 400)
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3,
                                            "temperature": 0}, headers=auth)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
        assert "token_ids" not in r.json()["choices"][0]
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3,
                                            "temperature": 0, "return_token_ids": True},
                   headers=auth)
        assert r.json()["choices"][0]["token_ids"] == reference(lm, [1, 2], 3)


def test_queue_full_is_429(lm):
    sched = scheduler(lm)
    gate, stepping, step = threading.Event(), threading.Event(), sched.step

    def gated_step():  # holds the engine thread inside a step until the test lets go
        stepping.set()
        gate.wait(30)
        return step()
    sched.step = gated_step
    app = create_app(sched, tokenizer=TOK, model_name="tiny", max_queue=1)
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    with running(app) as url, ThreadPoolExecutor(3) as pool:
        sent = [pool.submit(post, url + "/v1/completions", body)]
        assert stepping.wait(30)
        # the engine is stuck in a step: the first request waits in the scheduler (or the
        # next one on the command queue), so at most one more gets in before a 429
        while len(sent) < 3 and not (sent[-1].done() and sent[-1].result().status_code
                                     == 429):
            sent.append(pool.submit(post, url + "/v1/completions", body))
            with contextlib.suppress(TimeoutError):
                sent[-1].result(1)
        refused = sent[-1].result(1)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        gate.set()
        assert all(f.result().status_code == 200 for f in sent[:-1])
        assert post(url + "/v1/completions", body).status_code == 200


def test_disconnect_mid_stream_frees_pages(srv, monkeypatch):
    serving, step = srv.app.state.serving, srv.app.state.scheduler.step

    def slow_step():  # ≥ 2 s for 200 tokens (4 a call), so the hang-up comes well before
        time.sleep(0.04)
        return step()
    monkeypatch.setattr(srv.app.state.scheduler, "step", slow_step)
    before = serving.stats()["pages_used"]
    cancelled = srv.app.state.metrics.requests.labels(outcome="cancelled")._value.get()
    with httpx2.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/completions",
                      json={"prompt": [5] * 40, "max_tokens": 200, "stream": True,
                            "return_token_ids": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]   # a few chunks, then hang up
            assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = serving.stats()
        if stats["running"] == 0 and stats["pages_used"] == before:
            break
        time.sleep(0.02)
    assert stats["running"] == 0 and stats["pages_used"] == before, stats
    assert srv.app.state.metrics.requests.labels(outcome="cancelled")._value.get() \
        == cancelled + 1


def test_stop_aborts_what_is_left(lm):
    sched = scheduler(lm)
    serving = ServingLoop(sched, max_queue=8)
    serving.start()

    async def main():
        stream = serving.submit(Request(prompt=[1, 2, 3], max_tokens=200))
        await stream.accepted()
        await stream.next()
        stopped = asyncio.ensure_future(asyncio.to_thread(serving.stop, 0.0))
        with pytest.raises(Aborted):
            while True:
                await stream.next()
        assert await stopped
        with pytest.raises(ShuttingDown):
            serving.submit(Request(prompt=[1], max_tokens=1))
    asyncio.run(main())
    assert sched.stats()["running"] == 0 and sched.stats()["pages_used"] == 0


# The CLI ------------------------------------------------------------------------------
def test_cli_bad_flags():
    r = subprocess.run([sys.executable, "-m", "jaxlm.serve", "--hf", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, eos_token_id=1)
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path)
    want = hf.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False,
                       eos_token_id=1, pad_token_id=0)[0, 3:].tolist()
    # a small menu (one table width, one prefill shape) keeps the warm-up to 3 programs
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.serve", "--hf", str(tmp_path),
                             "--port", "0", "--model-name", "llama", "--shutdown-timeout",
                             "5", "--max-seqs", "2", "--max-batched-tokens", "16",
                             "--max-len", "64", "--page-size", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving llama on http://"), (line, proc.stderr.read())
        url = line.split()[-1]
        r = post(url + "/v1/completions", {"model": "llama", "prompt": [3, 4, 5],
                                           "max_tokens": 4, "return_token_ids": True,
                                           "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
        assert "compiled 3 step programs" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Soak ---------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as f:
            kb = next(line for line in f if line.startswith("VmRSS")).split()[1]
        return int(kb) * 1024


@pytest.mark.slow
def test_soak_no_failures_no_leaks(lm):
    """2,000 requests from 16 concurrent clients: valid ones (plain, streamed, sampled),
    streams hung up early and bad requests mixed in. No valid request fails, every page
    comes back, and RSS grows by at most 64 MiB from the first half to the second."""
    app = create_app(scheduler(lm, max_seqs=16), tokenizer=TOK, model_name="tiny",
                     max_queue=10_000)
    n, failures, rss = 2000, [], []

    def one(i, c, url):
        rng = random.Random(i)
        kind = rng.random()
        body = {"prompt": [rng.randrange(256) for _ in range(rng.randrange(1, 40))],
                "max_tokens": rng.randrange(1, 12), "temperature": rng.choice([0, 0.7]),
                "seed": i}
        if kind < 0.1:      # a bad request
            r = c.post(url + "/v1/completions", json={**body, "top_p": 2})
            return r.status_code == 400 or failures.append((i, r.status_code, r.text))
        if kind < 0.2:      # a stream hung up after its first chunk
            with c.stream("POST", url + "/v1/completions",
                          json={**body, "max_tokens": 64, "stream": True}) as r:
                next(r.iter_lines())
            return
        r = c.post(url + "/v1/completions", json={**body, "stream": kind < 0.4})
        if r.status_code != 200 or ("[DONE]" not in r.text and "choices" not in r.json()):
            failures.append((i, r.status_code, r.text))

    with running(app) as url:
        clients = [httpx2.Client(timeout=120) for _ in range(16)]
        with ThreadPoolExecutor(16) as pool:
            for half in range(2):
                ids = range(half * n // 2, (half + 1) * n // 2)
                list(pool.map(lambda i: one(i, clients[i % 16], url), ids))
                rss.append(_rss_bytes())
        for c in clients:
            c.close()
        deadline = time.monotonic() + 30
        while app.state.serving.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = app.state.serving.stats()
    assert not failures, failures[:5]
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["pages_used"] == 0
    assert rss[1] - rss[0] < 64 * 2**20, rss
