"""`pico-llm serve` with real parts: the server runs as its own process on 127.0.0.1 (uvicorn), and the
official `openai` client talks to it. Sampling must equal `picollm.generate`'s for the same seed."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import picollm
from picollm.cli import main
from picollm.config import SampleConfig
from picollm.sampling import generate
from picollm.serve.protocol import DEFAULT_CHAT_TEMPLATE

openai = pytest.importorskip("openai")

WORDS = "the a cat dog bird sat ran saw on under near mat tree house big small red green and then".split()


def _text(rng: random.Random, n: int) -> str:
    """One long document: the model rarely sees end-of-text, so long generations stay long."""
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def start_server(run: str, *extra: str, timeout: float = 120.0):
    """(process, base url) of `pico-llm serve RUN --port 0`, once it prints where it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "picollm", "serve", run, "--port", "0", "--precision", "fp32",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "listening on http://" in line:
            url = line.split("listening on ")[1].split()[0]
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, url
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen))


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(url: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    files = []
    for i in range(40):
        (tmp / f"doc{i}.txt").write_text(_text(rng, 400))
        files.append(str(tmp / f"doc{i}.txt"))
    assert main(["train", "--input_files", *files, "--input_mode", "documents", "--test_fraction", "0.2",
                 "--models", "transformer", "--n_blocks", "2", "--embed_size", "48", "--n_heads", "4",
                 "--block_size", "48", "--vocab_size", "300", "--epochs", "12", "--max_steps_per_epoch", "15",
                 "--output_dir", str(tmp), "--run_name", "srv", "--precision", "fp32", "--max_new_tokens", "4",
                 "--prompt", "the cat"]) == 0
    return str(tmp / "srv")


@pytest.fixture(scope="module")
def server(run_dir):
    proc, url = start_server(run_dir, "--max_active", "2", "--max_tokens_limit", "2000")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def loaded(run_dir):
    model, tok, _ = picollm.load(run_dir)
    return model, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)


def ours(loaded, prompt: str, n: int = 1, **kw) -> list[str]:
    """picollm's own sampling of the completion (prompt left out), ending at end-of-text."""
    model, tok = loaded
    ids = tok.encode(prompt)
    cfg = SampleConfig(stop_at_eot=True, **kw)
    out = generate(model, torch.tensor([ids] * n), cfg, eot_id=tok.eot_id)
    texts = []
    for row in out[:, len(ids):].tolist():
        if tok.eot_id in row:
            row = row[: row.index(tok.eot_id)]
        texts.append(tok.decode(row))
    return texts


def test_completion_equals_generate(client, loaded):
    r = client.completions.create(model="srv", prompt="the cat sat", max_tokens=20, seed=7, temperature=0.9,
                                  top_p=0.9)
    assert r.choices[0].text == ours(loaded, "the cat sat", max_new_tokens=20, seed=7, temperature=0.9, top_p=0.9)[0]
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(loaded[1].encode("the cat sat"))
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    greedy = client.completions.create(model="srv", prompt="the dog", max_tokens=12, temperature=0)
    assert greedy.choices[0].text == ours(loaded, "the dog", max_new_tokens=12, greedy=True)[0]


def test_n_choices_are_generates_rows(client, loaded):
    r = client.completions.create(model="srv", prompt="a bird", max_tokens=10, seed=3, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == ours(loaded, "a bird", n=3, max_new_tokens=10, seed=3)
    assert len({c.text for c in r.choices}) > 1  # the rows are sampled apart


def test_stream_equals_plain(client):
    kw = dict(model="srv", prompt="the tree", max_tokens=30, seed=11, extra_body={"top_k": 20})  # top_k: an extension
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len([c for c in chunks if c.choices]) > 3  # streamed token by token, not in one piece


def test_chat_plain_and_streamed(client, server):
    msgs = [{"role": "system", "content": "the story"}, {"role": "user", "content": "the cat"}]
    r = client.chat.completions.create(model="srv", messages=msgs, max_tokens=25, seed=5)
    t = DEFAULT_CHAT_TEMPLATE
    prompt = t["system"].replace("{content}", "the story") + t["user"].replace("{content}", "the cat") + t["generation"]
    status, same = post(server + "/v1/completions", {"prompt": prompt, "max_tokens": 25, "seed": 5, "stop": t["stop"]})
    assert status == 200
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == same["choices"][0]["text"]
    assert r.usage.prompt_tokens == same["usage"]["prompt_tokens"]
    chunks = list(client.chat.completions.create(model="srv", messages=msgs, max_tokens=25, seed=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_logprobs(client, loaded, server):
    model, tok = loaded
    r = client.completions.create(model="srv", prompt="the cat", max_tokens=5, seed=1, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    ids = tok.encode("the cat")
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
    top = first.topk(3)
    want = {tok.token_bytes(i).decode("utf-8", "replace"): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
    assert lp.top_logprobs[0] == pytest.approx(want, abs=1e-4)
    assert all(len(alts) == 3 for alts in lp.top_logprobs)  # the trained model's alternatives read apart
    assert lp.token_logprobs[0] == pytest.approx(first[tok.encode(lp.tokens[0])[0]].item(), abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    c = client.chat.completions.create(model="srv", messages=[{"role": "user", "content": "a dog"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2, seed=2)
    content = c.choices[0].logprobs.content
    # bytes are the raw token; token is their UTF-8 text (a token ending inside a character shows U+FFFD)
    assert content and all(len(e.top_logprobs) == 2 and e.token == bytes(e.bytes).decode("utf-8", "replace")
                           for e in content)


def test_stop_strings_and_echo(server):
    base = {"prompt": "the cat", "max_tokens": 60, "seed": 4}
    _, full = post(server + "/v1/completions", base)
    text = full["choices"][0]["text"]
    words = text.split(" ")
    assert len(words) > 4
    stop = " " + words[3][:2]  # ends part-way into a token: found across token boundaries
    _, cut = post(server + "/v1/completions", {**base, "stop": [stop, "zzz-never"]})
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = _sse(server, {**base, "stop": [stop], "stream": True})
    assert "".join(c["choices"][0]["text"] for c in streamed if c.get("choices")) == cut["choices"][0]["text"]
    _, echoed = post(server + "/v1/completions", {**base, "echo": True})
    assert echoed["choices"][0]["text"] == "the cat" + text


def _sse(server: str, body: dict) -> list[dict]:
    req = urllib.request.Request(server + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_concurrent_requests_interleave_without_changing_draws(server, loaded):
    """Six streams at once on two slots: every one completes, each with the tokens it gets alone, though
    two at a time share one batched step of the fused decoder."""
    bodies = [{"prompt": p, "max_tokens": 40, "seed": i, "stream": True}
              for i, p in enumerate(["the cat", "a dog", "the bird", "a tree", "the house", "a mat"])]
    results: dict[int, str] = {}

    def one(i):
        results[i] = "".join(c["choices"][0]["text"] for c in _sse(server, bodies[i]) if c.get("choices"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(len(bodies)))
    for i, b in enumerate(bodies):
        assert results[i] == ours(loaded, b["prompt"], max_new_tokens=40, seed=i)[0]
    assert get(server + "/health")[1]["batch_max"] == 2  # the two slots' requests stepped together


def _engine_transcripts(run_dir, loaded, monkeypatch, max_positions: int):
    """Three requests through an in-process engine whose rounds take max_positions positions: per request,
    each choice's text, token ids and logprobs, finish reason, and the usage; and the rounds' length."""
    from picollm.serve import engine as eng

    model, tok = loaded
    monkeypatch.setattr(eng, "ROUND_SECONDS", 10.0)  # every round as long as ROUND_MAX_POSITIONS allows
    monkeypatch.setattr(eng, "ROUND_MAX_POSITIONS", max_positions)
    served = eng.ServedModel(id="m", run_dir=run_dir, model=model, tokenizer=tok, configs=None, summary={}, created=0)
    specs = [  # prompts, sampling, choices, stop strings, logprobs
        (["the cat"], SampleConfig(max_new_tokens=30, top_p=0.9, seed=1, stop_at_eot=True), 3, [" th", "e a"], None),
        (["a dog", "the bird"], SampleConfig(max_new_tokens=7, seed=2, stop_at_eot=True), 2, [], 2),
        (["the house"], SampleConfig(max_new_tokens=25, greedy=True, stop_at_eot=True), 1, [], None),
    ]
    engine = eng.Engine(max_active=4, max_new_tokens=64)
    done = threading.Semaphore(0)
    logs: list[list] = [[] for _ in specs]
    jobs = [eng.Job(served, [tok.encode(p) for p in prompts], cfg, n, stops, lp,
                    emit=lambda kind, payload, log=log: (log.append((kind, payload)),
                                                         kind in ("done", "error") and done.release()))
            for (prompts, cfg, n, stops, lp), log in zip(specs, logs)]
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=120)
    positions = [pool.positions for pool in engine._pools.values() if pool is not None]
    engine.close()
    out = []
    for job, log in zip(jobs, logs):
        text, tokens, finish = [""] * len(job.choices), [[] for _ in job.choices], [None] * len(job.choices)
        for kind, payload in log:
            assert kind in ("tokens", "done"), payload
            for ev in payload if kind == "tokens" else []:
                text[ev.index] += ev.text
                tokens[ev.index].append(ev.token)
                finish[ev.index] = ev.finish or finish[ev.index]
        out.append((text, tokens, finish, log[-1][1]))
    return out, positions


def test_engine_rounds_of_many_positions_send_what_rounds_of_one_do(run_dir, loaded, monkeypatch):
    """Rounds of 16 positions (the C loop running on past a choice that a stop string, end-of-text or
    max_tokens ended) give every request the same texts, tokens, logprobs, finish reasons and usage as
    rounds of one position: sampled with n > 1 and stop strings, two prompts with logprobs, greedy."""
    one, p1 = _engine_transcripts(run_dir, loaded, monkeypatch, 1)
    many, p16 = _engine_transcripts(run_dir, loaded, monkeypatch, 16)
    assert p1 == [1] and p16 == [16]
    assert one == many
    finishes = [f for _, _, fin, _ in one for f in fin]
    assert "stop" in finishes and "length" in finishes  # both ways of ending were exercised
    assert all(t is not None for t in one[1][1][0])  # the logprobs request got a logprob per token


def test_disconnect_frees_the_slot(run_dir, loaded):
    # 200,000 greedy tokens: minutes of decoding even batched (2,000 took well under a second), so the
    # request is still running when the client goes away; greedy, so it cannot end early by drawing
    # end-of-text by chance (checked: its first 3,000 tokens have none)
    model, tok = loaded
    ids = tok.encode("the cat")
    first = generate(model, torch.tensor([ids]), SampleConfig(max_new_tokens=3000, greedy=True))[0, len(ids):]
    assert tok.eot_id not in first.tolist()
    proc, url = start_server(run_dir, "--max_active", "1", "--max_tokens_limit", "200000")
    try:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "max_tokens": 200000, "stream": True,
                                                            "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # it is streaming
        assert get(url + "/health")[1]["active"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.time() + 60  # a hang guard, not a speed requirement
        while time.time() < deadline:
            health = get(url + "/health")[1]
            if health["cancelled"] >= 1 and health["active"] == 0:
                break
            time.sleep(0.2)
        assert health["cancelled"] == 1 and health["active"] == 0, health
        assert health["tokens"] < 200000  # stopped early
        status, r = post(url + "/v1/completions", {"prompt": "a dog", "max_tokens": 5})  # the one slot is free
        assert status == 200 and r["usage"]["completion_tokens"] >= 1
    finally:
        stop_server(proc)


BAD = [  # (body, status, param or None, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b'{"prompt": "a", "temperature": NaN}', 400, None, "NaN"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": 5}, 400, "prompt", ""),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "a", "max_tokens": 2001}, 400, "max_tokens", "limit of 2000"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"prompt": "a", "top_k": -3}, 400, "top_k", ">= 1"),
    ({"prompt": "a", "n": 0}, 400, "n", "1..16"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs", "0..5"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "a", "logit_bias": {"1": 2}}, 400, "logit_bias", "not supported"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "a", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ({"max_tokens": 3}, 400, "prompt", "missing"),
    ({"prompt": "a " * 200}, 400, "prompt", "longer than the model's context"),
    ({"prompt": [1, 2, 10 ** 6]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": "a", "model": "no-such-model"}, 404, "model", "does not exist"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests(server, body, status, param, words):
    got, r = post(server + "/v1/completions", body, raw=isinstance(body, bytes))
    assert got == status, r
    err = r["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"
    status, health = get(server + "/health")  # the server still answers
    assert status == 200 and health["status"] == "ok"


def test_bad_chat_requests_and_paths(server):
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 3},
                         "max_completion_tokens")):
        status, r = post(server + "/v1/chat/completions", body)
        assert status == 400 and r["error"]["param"] == param, r
    assert get(server + "/v1/nothing")[0] == 404
    assert get(server + "/v1/models/nope")[0] == 404
    status, r = get(server + "/v1/completions")
    assert status == 405 and "error" in r
    # after all of that the server still answers
    status, r = post(server + "/v1/completions", {"prompt": "the", "max_tokens": 3})
    assert status == 200 and r["choices"][0]["text"]


def test_truncation_and_models(server, run_dir, loaded):
    long = "the cat " * 100
    status, r = post(server + "/v1/completions", {"prompt": long, "max_tokens": 3, "truncate_prompt_tokens": 40})
    assert status == 200 and r["usage"]["prompt_tokens"] == 40
    assert post(server + "/v1/completions", {"prompt": "a", "truncate_prompt_tokens": 49})[0] == 400  # past 48
    _, models = get(server + "/v1/models")
    assert [m["id"] for m in models["data"]] == ["srv"] and models["data"][0]["context_length"] == 48
    _, info = get(server + "/pico/info")
    assert info["models"][0]["summary"]["test_loss"] > 0 and info["models"][0]["prompt"] == "the cat"
    # no model named: the one served model
    status, r = post(server + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})
    assert status == 200 and r["model"] == "srv"


def test_serve_command_line_errors(tmp_path, run_dir, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "no run there" in capsys.readouterr().err
    (tmp_path / "t.json").write_text('{"user": "no placeholder"}')
    assert main(["serve", run_dir, "--chat_template", str(tmp_path / "t.json")]) == 2
    assert "{content}" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", run_dir, "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "in use" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- the playground, in a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Selenium through chromium-driver (no driver download)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is absent (make test installs chromium and chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_playground_streams_in_chromium(browser, server, loaded):
    """A person's path through the page: the run's figures show, they type a prompt, move the temperature
    slider to 0 (greedy) and the length slider to its end, press Generate, and watch the text stream in;
    hovering a token shows its probability and the alternatives."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 120)  # a hang guard
    d.get(server + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert d.find_element(By.ID, "model").get_attribute("value") == "srv"
    _, info = get(server + "/pico/info")
    shown = d.find_element(By.CSS_SELECTOR, '#figures dd[data-key="test loss (nats/token)"]').text
    assert float(shown) == pytest.approx(info["models"][0]["summary"]["test_loss"], rel=1e-3)
    # all assets local: nothing but this server was asked for
    hosts = d.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)")
    assert set(hosts) <= {server.removeprefix("http://")}

    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the cat")
    d.find_element(By.ID, "temperature").send_keys(Keys.HOME)  # 0: greedy
    d.find_element(By.ID, "max_tokens").send_keys(Keys.END)  # the server's limit, 2000
    assert d.find_element(By.ID, "temperature-v").text == "0"
    assert d.find_element(By.ID, "max_tokens-v").text == "2000"
    # record how the output grows: streamed text arrives in many pieces, a finished answer in one
    d.execute_script("""window.lengths = [];
        new MutationObserver(() => window.lengths.push(document.getElementById('output').textContent.length))
          .observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true});""")
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    assert d.find_element(By.ID, "error").text == ""

    want = ours(loaded, "the cat", max_new_tokens=2000, greedy=True)[0]
    tokens = d.find_elements(By.CSS_SELECTOR, "#output .tok")
    got = d.execute_script("return [...document.querySelectorAll('#output .tok')].map(s => s.textContent).join('')")
    assert got == want
    lengths = d.execute_script("return window.lengths")
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths)  # it grew piece by piece
    assert f"{len(tokens)} tokens" in d.find_element(By.ID, "status").text

    tok = tokens[min(3, len(tokens) - 1)]
    ActionChains(d).move_to_element(tok).perform()
    tip = d.find_element(By.ID, "tip")
    wait.until(lambda d: tip.is_displayed())
    rows = tip.find_elements(By.CSS_SELECTOR, "tr.alt")
    assert len(rows) == 5  # the top alternatives
    # greedy: the chosen token is the most probable, first in the list, with the probability shown above
    assert "chosen" in rows[0].get_attribute("class")
    p = float(tok.get_attribute("data-p"))
    assert float(rows[0].find_elements(By.TAG_NAME, "td")[1].text) == pytest.approx(p, abs=1e-4)
    assert f"p = {p:.4f}" in tip.find_element(By.CLASS_NAME, "chosen-p").text


def test_int8_weights_serve_what_generate_gives(run_dir, loaded):
    """`serve --weights int8`: the requests decode through the int8 fused decoder, batched, and a seed gives
    what `generate` with the same int8 decoder gives."""
    from picollm.sampling import for_sampling

    model, tok = loaded
    _, dec = for_sampling(model, "int8", "cpu")
    proc, url = start_server(run_dir, "--weights", "int8", "--max_active", "2")
    try:
        for seed, prompt in ((1, "the cat"), (2, "a dog sat")):
            status, r = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 30, "seed": seed})
            assert status == 200
            ids = tok.encode(prompt)
            out = generate(model, torch.tensor([ids]), SampleConfig(max_new_tokens=30, seed=seed, stop_at_eot=True),
                           eot_id=tok.eot_id, decoder=dec)[0, len(ids):].tolist()
            if tok.eot_id in out:
                out = out[: out.index(tok.eot_id)]
            assert r["choices"][0]["text"] == tok.decode(out)
        # the logprob it reports is the int8 step's, not the float32 model's
        status, r = post(url + "/v1/completions", {"prompt": "the cat", "max_tokens": 1, "logprobs": 1, "temperature": 0})
        first = r["choices"][0]["logprobs"]["token_logprobs"][0]
        ids = torch.tensor([tok.encode("the cat")])
        st = dec.new_state(1)
        int8_lp = torch.log_softmax(dec.step(ids, st)[0][0, 0], -1).max().item()
        with torch.no_grad():
            fp32_lp = torch.log_softmax(model(ids)[0, -1].float(), -1).max().item()
        assert abs(first - int8_lp) < 1e-5 and abs(first - fp32_lp) > 1e-4, (first, int8_lp, fp32_lp)
    finally:
        stop_server(proc)
