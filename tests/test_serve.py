"""`leantrain serve` as users meet it: the real server process on 127.0.0.1, the official `openai` client,
raw HTTP for the bad requests, the chat page in headless Chromium, SIGTERM while a stream is open.

The served model is a real tiny run whose weights are drawn wide (init_std 0.3) and barely trained: a
trained tiny model greedily writes nothing but spaces, which would let a broken batch pass; these weights
write varied tokens, so every position and every request's cache has to be right for the texts to match.
"""

import concurrent.futures
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain import api
from leantrain.model.generate import generate as generate_ids
from leantrain.tokens.chat import DEFAULT_TEMPLATE

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
PROMPTS = ["def ", "import os\n", "class Foo:", "x = [1, 2", "return self.", "for i in range(", "# note\n", "if not "]
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                else None)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    cfg = tiny_config(dataset, model__seq_len=256, model__init_std=0.3, optim__lr=1e-6, train__steps=2,
                      train__eval_every=2, checkpoint__every=2)
    run = tmp_path_factory.mktemp("serve") / "run"
    api.train(cfg, run)
    (run / "chat_template.txt").write_text(DEFAULT_TEMPLATE)  # so that `generate --chat` takes this run
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return api.load_model(run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "leantrain.cli", "serve", str(run), "--port", str(port),
                             "--log-level", "warning", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):  # at most ~60 s: importing torch and loading the model
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise AssertionError("the server did not answer /health within a minute")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


@pytest.fixture(scope="module")
def server(run_dir):
    proc, base = start_server(run_dir, "--api-key", KEY)
    try:
        yield base
    finally:
        stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# ---- the openai client ------------------------------------------------------------------------

def test_openai_client_completions_equal_generate(client, loaded, run_dir):
    assert [m.id for m in client.models.list().data] == [run_dir.name]
    eos = loaded.tokenizer.token_to_id("<|endoftext|>")
    for prompt in PROMPTS[:3]:
        want = api.generate(loaded, prompt, max_new_tokens=40, temperature=0)  # what `leantrain generate` prints
        got = client.completions.create(model=run_dir.name, prompt=prompt, max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 40 and got.usage.prompt_tokens == len(loaded.tokenizer.encode(prompt))
        # by default an answer ends at the end-of-text token, as OpenAI's completions do
        ids = generate_ids(loaded.model, loaded.tokenizer.encode(prompt).ids, 40, temperature=0, eos_id=eos)
        streamed = client.completions.create(model=run_dir.name, prompt=prompt, max_tokens=40, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == loaded.tokenizer.decode(ids)


def test_openai_client_streamed_chat_equals_generate_chat(client, loaded, run_dir):
    for question in ("hello", "what is 2+2?"):
        want = api.generate(loaded, question, max_new_tokens=48, temperature=0, chat=True)
        stream = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": question}],
                                                max_tokens=48, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want and len(want) > 10
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
        assert chunks[-1].usage.completion_tokens >= 1
        whole = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": question}],
                                               max_tokens=48, temperature=0)
        assert whole.choices[0].message.content == want


def test_eight_concurrent_requests_each_equal_their_single_text(client, loaded, server):
    want = [api.generate(loaded, p, max_new_tokens=100, temperature=0) for p in PROMPTS]
    steps_before = metric(server, "leantrain_decode_steps_total")

    def ask(prompt):
        r = client.completions.create(model="run", prompt=prompt, max_tokens=100, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == want
    steps = metric(server, "leantrain_decode_steps_total") - steps_before
    assert steps < 8 * 99, f"{steps} decode steps for 8 x 99 tokens: the requests were never decoded together"


def test_prompts_of_one_length_prefilled_as_one_batch_equal_their_single_text(client, loaded):
    by_length = {}
    for p in ["a = 1", "b = 2", "c = 3", "d = 4", "e = 5", "x = y", "if x:", "def f", "n += 1", "i, j", "pass"]:
        by_length.setdefault(len(loaded.tokenizer.encode(p).ids), []).append(p)
    prompts = max(by_length.values(), key=len)  # one request, one length: one prefill forward
    assert len(prompts) >= 3, by_length
    r = client.completions.create(model="run", prompt=prompts, max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [api.generate(loaded, p, max_new_tokens=30, temperature=0) for p in prompts]


def test_sampling_with_a_seed_repeats_and_follows_top_p(client):
    def ask(**kw):
        return client.completions.create(model="run", prompt="def ", max_tokens=20, extra_body={"ignore_eos": True},
                                         **kw).choices[0].text
    assert ask(temperature=0.8, seed=7) == ask(temperature=0.8, seed=7)
    # top_p that keeps only the most likely token is greedy decoding
    assert ask(temperature=0.8, top_p=1e-6, seed=1) == ask(temperature=0)


# ---- bad requests ------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"prompt": "x", ', 400, None),  # malformed JSON
    (b'["prompt"]', 400, None),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": "x", "max_tokens": "10"}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1000000000}', 400, "max_tokens"),  # beyond the context
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "top_k": -1}', 400, "top_k"),
    (b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "x", "n": 2}', 400, "n"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server + "/v1/completions", content=body, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_chat_requests_huge_bodies_and_keys(server):
    post = server + "/v1/chat/completions"
    for body, param in (({"messages": "hi"}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]},
                                                             "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens")):
        r = httpx.post(post, json=body, headers=auth())
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(post, content=b"x" * (10 << 20), headers=auth(), timeout=60)  # 10 MB
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(post, json={"messages": [{"role": "user", "content": "x"}]}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/nowhere").json()["error"]["code"] == "not_found"
    # and the server still serves
    r = httpx.post(post, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}, headers=auth())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    text = httpx.get(server + "/metrics").text
    assert 'leantrain_requests_total{endpoint="/v1/chat/completions",status="413"} 1' in text
    assert "leantrain_request_latency_seconds_bucket" in text and "leantrain_queue_depth 0" in text


def test_client_that_leaves_mid_stream_frees_its_slot(server):
    cancelled = metric(server, "leantrain_cancelled_requests_total")
    body = {"prompt": "def ", "max_tokens": 250, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=auth()) as r:
        assert next(r.iter_lines()).startswith("data: ")
    for _ in range(100):  # bounded: at most ~10 s
        health = httpx.get(server + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0
    assert metric(server, "leantrain_cancelled_requests_total") == cancelled + 1


# ---- the chat page -----------------------------------------------------------------------------

@pytest.mark.skipif(CHROMEDRIVER is None or CHROMIUM is None,
                    reason="chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
def test_chat_page_streams_the_reply_in_headless_chromium(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = "what is 2+2?"
    r = httpx.post(server + "/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0})
    want = r.json()["choices"][0]["message"]["content"]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,700",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        for field, value in (("api-key", KEY), ("temperature", "0"), ("max-tokens", "40")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        reply = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert reply.get_attribute("textContent") == want and len(want) > 10
        png = tmp_path / "chat.png"
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(png)[..., :3]
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20, "the page is (almost) blank"
    assert (img < 0.9).any(axis=-1).mean() > 0.005, "nothing but white on the page"


# ---- limits and shutdown -----------------------------------------------------------------------

def test_full_queue_is_429_and_sigterm_drains_the_open_stream(run_dir):
    proc, base = start_server(run_dir, "--max-batch", "1", "--max-queue", "0")
    try:
        body = {"prompt": "def ", "max_tokens": 250, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            busy = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            proc.send_signal(signal.SIGTERM)  # while the stream is open
            rest = [first, *lines]
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert [x for x in rest if x][-1] == "data: [DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 250  # every token came
        assert proc.wait(timeout=30) == 0
    finally:
        stop_server(proc)


# ---- an exported folder serves the same model --------------------------------------------------

def test_hf_export_folder_loads_as_the_same_model_and_chat_template(run_dir, loaded, tmp_path):
    from leantrain.serve.loader import load_served

    api.export(run_dir, tmp_path / "hf", format="hf")
    from_run, from_export = load_served(run_dir, load_model=api.load_model), load_served(tmp_path / "hf")
    assert from_export.name == "hf" and from_export.eos_id == from_run.eos_id and from_export.seq_len == 256
    ids = from_run.encode("class Foo:")
    assert from_export.encode("class Foo:") == ids
    assert generate_ids(from_export.model, ids, 30, temperature=0) == generate_ids(loaded.model, ids, 30,
                                                                                 temperature=0)
    # the export's Jinja chat_template renders the ids the run's own template gives
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is 2+2?"}]
    assert from_export.chat_ids(messages) == from_run.chat_ids(messages)


# ---- output constraints (response_format, guided_*) --------------------------------------------

MAIL = r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
SUMS = 'root ::= term ("+" term){0,3}\nterm ::= [1-9] [0-9]? | "(" term "+" term ")"\n'


def test_constrained_samples_at_temperature_1_all_parse(client, server):
    """16 prompts per request, one batch, each row its own matcher; these wide random weights are noise that
    never matches unconstrained, so every valid output is the constraint's doing."""
    import re

    prompts = PROMPTS + [p + "x" for p in PROMPTS]
    compiled = metric(server, "leantrain_constraints_compiled_total")

    def complete(seed=3, finished=True, **extra):
        r = client.completions.create(model="run", prompt=prompts, max_tokens=60, temperature=1, seed=seed,
                                      extra_body=extra)
        if finished:
            assert [c.finish_reason for c in r.choices] == ["stop"] * len(prompts), [c.text for c in r.choices]
            return [c.text for c in r.choices]
        return [c.text for c in r.choices if c.finish_reason == "stop"]

    mails = complete(guided_regex=MAIL)
    assert all(re.fullmatch(MAIL, t) for t in mails) and len(set(mails)) > 8, mails
    assert all(re.fullmatch(MAIL, t) for t in complete(seed=4, guided_regex=MAIL))  # the rule from the cache
    sums = complete(guided_grammar=SUMS)
    assert all(isinstance(eval(compile(s, "<sum>", "eval"), {"__builtins__": {}}), int) for s in sums), sums
    # any object: noise at temperature 1 may still be inside a string when max_tokens runs out; the rest parse
    for value in map(json.loads, complete(finished=False, response_format={"type": "json_object"})):
        assert isinstance(value, dict)
    for value in map(json.loads, complete(guided_json=PERSON)):
        assert set(value) == {"name", "age"} and len(value["name"]) <= 6 and 0 <= value["age"] <= 99
    assert metric(server, "leantrain_constraints_compiled_total") == compiled + 4  # the repeat was cached
    free = client.completions.create(model="run", prompt=prompts, max_tokens=20, temperature=1, seed=3,
                                     extra_body={"ignore_eos": True})
    assert not any(re.fullmatch(MAIL, c.text) for c in free.choices)

    def chat(seed):
        r = client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": "a person?"}], max_tokens=60, temperature=1,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        return r.choices[0].finish_reason, json.loads(r.choices[0].message.content)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for reason, value in pool.map(chat, range(8)):
            assert reason == "stop" and set(value) == {"name", "age"}


def test_constrained_and_free_requests_in_one_batch_are_each_right(client, loaded, server):
    """Greedy free rows equal `generate`'s text beside constrained rows, greedy constrained rows equal
    `generate --regex`'s, sampled constrained rows all match: the masks touch their own rows only."""
    import re

    free = {p: api.generate(loaded, p, max_new_tokens=60, temperature=0) for p in PROMPTS[:3]}
    ruled = {p: api.generate(loaded, p, max_new_tokens=60, temperature=0, regex=MAIL) for p in PROMPTS[3:6]}
    steps_before = metric(server, "leantrain_decode_steps_total")

    def ask(job):
        kind, prompt, seed = job
        extra = {"ignore_eos": True} if kind == "free" else {"guided_regex": MAIL}
        r = client.completions.create(model="run", prompt=prompt, max_tokens=60, temperature=1 if seed else 0,
                                      seed=seed, extra_body=extra)
        return r.choices[0].text, r.usage.completion_tokens

    jobs = ([("free", p, None) for p in free] + [("ruled", p, None) for p in ruled]
            + [("ruled", p, s) for s, p in enumerate(PROMPTS, start=1)])
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got, tokens = zip(*pool.map(ask, jobs), strict=True)
    assert list(got[:3]) == list(free.values())
    assert list(got[3:6]) == list(ruled.values()) and all(re.fullmatch(MAIL, t) for t in ruled.values())
    assert all(re.fullmatch(MAIL, t) for t in got[6:]), got[6:]
    steps = metric(server, "leantrain_decode_steps_total") - steps_before
    assert steps < sum(n - 1 for n in tokens), "the requests were never decoded together"


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"guided_regex": "("}, "guided_regex", "does not compile"),
    ({"guided_regex": r"[^\s\S]"}, "guided_regex", "matches no text"),
    ({"guided_regex": 5}, "guided_regex", "must be"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "objec"}}, "guided_json", "objec"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "not supported"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "at most one"),
])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param, words):
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(server + route, json={**body, "max_tokens": 4, **extra}, headers=auth())
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error


def test_a_tokenizer_that_cannot_be_constrained_is_a_400(loaded):
    """A WordPiece tokenizer (not byte-level BPE), and a byte-level one without an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models

    from leantrain.serve.guided import Grammars
    from leantrain.serve.protocol import APIError, Rule

    rule = Rule("regex", "[a-z]+", "guided_regex")
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    for tok, eos in ((wordpiece, 0), (loaded.tokenizer, None)):
        with pytest.raises(APIError) as e:
            Grammars(tok, 512, eos).get(rule)
        assert e.value.status == 400 and e.value.code == "unsupported_tokenizer" and "guided_regex" in e.value.message
    grammars = Grammars(loaded.tokenizer, 512, loaded.tokenizer.token_to_id("<|endoftext|>"))
    assert grammars.get(rule) is grammars.get(Rule("regex", "[a-z]+", "response_format")) and grammars.compiled == 1
