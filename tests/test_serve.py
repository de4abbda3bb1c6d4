"""The Serve app on 127.0.0.1, through the real `openai` client and plain HTTP: chat and completion
(streaming and not) with correct usage, API keys, a 4xx in OpenAI's format for every kind of bad
request, 16 concurrent clients answered as if one at a time, and a client that leaves mid-stream."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import yaml
from conftest import METRICS_PORT, PROMPT, _free_port, generation_run, make_model

from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.model.io import save_pretrained
from retro_ray.training.prompts import chat_prompt, format_passage


KEY = "sk-test-0123456789"
ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_tokens": 400, "max_prompt_tokens": 480, "max_n": 2, "max_body_bytes": 20000, "max_passages": 4,
          "passages": 1, "max_seqs": 16, "kv_tokens": 8192, "stream_interval_ms": 0}  # 0: every step's tokens


@pytest.fixture(scope="module")
def app(built_db, tmp_path_factory):
    """The app of a tiny run (random Retro as its tuned model), deployed from cluster/serve.yaml
    with small CPU shares; yields (base URL, config, tokenizer)."""
    from ray import serve

    from retro_ray.core.layout import model_dir, tuned
    from retro_ray.serving.deployments import start

    folder = tmp_path_factory.mktemp("serve")
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    cfg = generation_run(built_db, folder, neighbors_stage=False)
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key_file": str(key_file)})})
    tok = tokenizer.load_run_tokenizer(cfg, Storage())
    save_pretrained(make_model("retro", len(tok), tok.eos_token_id), model_dir(tuned(cfg)))
    spec = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    application = spec["applications"][0]
    application["args"]["serve"] = LIMITS
    for d in application["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.1  # beside the session's other actors on 2 CPUs
    serve_file = folder / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(spec))
    url = start(cfg, str(serve_file), host="127.0.0.1", port=_free_port())
    yield url, cfg, tok
    serve.shutdown()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_chat_and_completion_streaming_and_not_with_usage(app):
    url, cfg, tok = app
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["pretrain-instruct"]

    done = c.completions.create(model="pretrain-instruct", prompt=PROMPT, max_tokens=20, temperature=0,
                                extra_body={"retrieval": "encoder"})
    assert done.usage.prompt_tokens == len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert done.usage.completion_tokens == 20 and done.usage.total_tokens == done.usage.prompt_tokens + 20
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    fed = done.usage.prompt_tokens + 20 - 1  # the last token is never fed back
    assert [r["chunk"] for r in done.choices[0].model_extra["neighbors"]] == list(range(fed // 64))
    chunks = list(c.completions.create(model="pretrain-instruct", prompt=PROMPT, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"retrieval": "encoder"}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == done.choices[0].text
    assert len([ch for ch in chunks if ch.choices]) > 2  # token by token, not one block
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage

    messages = [{"role": "user", "content": "When was the Battle of Hastings?"}]
    chat = c.chat.completions.create(model="pretrain-instruct", messages=messages, max_tokens=12, temperature=0,
                                     extra_body={"retrieval": "both", "passages": 1})
    [passage] = chat.choices[0].model_extra["passages"]
    assert {"chunk_id", "doc_id", "score", "title", "text"} <= set(passage) and passage["title"]
    prompt = chat_prompt(messages, [format_passage(passage["text"], passage["title"])], "retro", tok)
    assert f"title: {passage['title']}, source: " in prompt  # every passage in a prompt carries its title
    assert prompt.endswith("Assistant:") and passage["text"].split()[0] in prompt
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert chat.usage.completion_tokens == 12 and chat.choices[0].message.role == "assistant"
    streamed = list(c.chat.completions.create(model="pretrain-instruct", messages=messages, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"retrieval": "both", "passages": 1}))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == chat.choices[0].message.content
    assert streamed[-1].usage == chat.usage

    two = c.chat.completions.create(model="pretrain-instruct", messages=messages, max_tokens=6, temperature=0, n=2,
                                    stream=True, extra_body={"retrieval": "off"})
    texts = ["", ""]
    for ch in two:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""  # n choices, streamed side by side

    found = requests.post(f"{url}/v1/retrieve", json={"query": "Battle of Hastings", "k": 3},
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [len(row["passages"]) for row in found["data"]] == [3]
    assert {"chunk_id", "doc_id", "score", "title", "text"} <= set(found["data"][0]["passages"][0])


def test_question_mode_feeds_the_encoder_the_questions_passages_and_short_answers_ask_as_tuned(app):
    """retrieval "question": the passages retrieved for the question go in the prompt and the
    encoder reads the top k of them for every chunk (InstructRetro); short_answer asks in the QA
    form the model was tuned on. The served answer equals the engine's, given those passages."""
    from retro_ray.core.layout import model_dir, tuned
    from retro_ray.model.io import load_model
    from retro_ray.serving.generate import Generator, SamplingParams
    from retro_ray.training.prompts import qa_prompt

    url, cfg, tok = app
    question = "When was the Battle of Hastings?"
    found = requests.post(f"{url}/v1/retrieve", json={"query": question, "k": 2},
                          headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["passages"]
    texts = [format_passage(p["text"], p["title"]) for p in found]
    chat = client(url).chat.completions.create(
        model="pretrain-instruct", messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0,
        extra_body={"retrieval": "question", "passages": 1, "short_answer": True, "ignore_eos": True})
    prompt = qa_prompt(question, texts[:1], "retro", tok)
    assert prompt.endswith("Assistant: The answer is")
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert [p["chunk_id"] for p in chat.choices[0].model_extra["passages"]] == [found[0]["chunk_id"]]
    engine = Generator(load_model(Storage(), model_dir(tuned(cfg))), tok)
    local = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop=["\n\nUser:", "\n"], ignore_eos=True),
                            mode="question", neighbor_passages=[texts])[0]
    assert chat.choices[0].message.content == local.text


def test_api_key_is_needed_except_for_health(app):
    url, _, _ = app
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").models.list()
    missing = requests.get(f"{url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{url}/health").status_code == 200


LONG = " ".join(["word"] * 490)  # over max_prompt_tokens=480
CHAT = {"model": "pretrain-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [  # (case, method, path, body (dict, or raw bytes), status, param, code)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "x", ', 400, None, "invalid_json"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("no model", "POST", "/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model", "missing"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "pretrain-instruct"}, 400, "messages", "missing"),
    ("empty messages", "POST", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "too_short"),
    ("unknown role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
     400, "messages.0.role", "literal_error"),
    ("assistant last", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", None),
    ("max_tokens a string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens",
     "int_type"),
    ("stream a string", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": "a", "stream": "yes"},
     400, "stream", "bool_type"),
    ("temperature too high", "POST", "/v1/chat/completions", {**CHAT, "temperature": 5}, 400, "temperature",
     "less_than_equal"),
    ("n over the limit", "POST", "/v1/chat/completions", {**CHAT, "n": 3}, 400, "n", None),
    ("max_tokens over the limit", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 401}, 400, "max_tokens",
     None),
    ("prompt over the limit", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": LONG}, 400,
     "prompt", "context_length_exceeded"),
    ("prompt + max_tokens over the context", "POST", "/v1/completions",
     {"model": "pretrain-instruct", "prompt": LONG[:600], "max_tokens": 400, "retrieval": "off"}, 400,
     "max_tokens", "context_length_exceeded"),
    ("empty prompt", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": "", "retrieval": "off"},
     400, "prompt", None),
    ("five stop strings", "POST", "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, 400, "stop", None),
    ("passages over the limit", "POST", "/v1/chat/completions", {**CHAT, "passages": 5}, 400, "passages", None),
    ("unknown retrieval mode", "POST", "/v1/chat/completions", {**CHAT, "retrieval": "sometimes"}, 400,
     "retrieval", "literal_error"),
    ("body too large", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": "x" * 30000}, 413, None,
     "body_too_large"),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("unknown route", "GET", "/v1/engines", None, 404, None, "not_found"),
    ("wrong method", "GET", "/v1/completions", None, 405, None, "method_not_allowed"),
    ("retrieve: k over the limit", "POST", "/v1/retrieve", {"query": "x", "k": 9}, 400, "k", None),
    ("deeply nested JSON", "POST", "/v1/completions", b'{"model": "x", "prompt": ' + b"[" * 5000 + b"]" * 5000
     + b"}", 400, None, "invalid_json"),
    ("NaN temperature", "POST", "/v1/completions", b'{"model": "pretrain-instruct", "prompt": "a", '
     b'"temperature": NaN}', 400, None, "invalid_json"),
    ("Infinity top_p", "POST", "/v1/completions", b'{"model": "pretrain-instruct", "prompt": "a", '
     b'"top_p": Infinity}', 400, None, "invalid_json"),
    ("seed past 64 bits", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": "a", "seed": 2**70},
     400, "seed", "less_than"),
    ("negative seed", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": "a", "seed": -1},
     400, "seed", "greater_than_equal"),
    ("lone surrogate in the prompt", "POST", "/v1/completions",
     b'{"model": "pretrain-instruct", "prompt": "a \\ud800 b"}', 400, "prompt", "invalid_text"),
    ("lone surrogate in a message", "POST", "/v1/chat/completions",
     b'{"model": "pretrain-instruct", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages.0.content", "invalid_text"),
    ("zero max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens",
     "greater_than_equal"),
    ("huge max_tokens", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**30}, 400, "max_tokens", None),
    ("zero n", "POST", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n", "greater_than_equal"),
    ("messages not a list", "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages",
     "list_type"),
    ("too many prompts", "POST", "/v1/completions", {"model": "pretrain-instruct", "prompt": ["a"] * 50}, 400, "n",
     None),
]


@pytest.mark.parametrize("case,method,path,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_each_bad_request_gets_its_4xx_in_openai_format(app, case, method, path, body, status, param, code):
    url, _, _ = app
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    r = requests.request(method, f"{url}{path}", data=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code), error


def test_a_poisoned_request_among_8_fails_alone(app):
    """Seven requests and one whose text no tokenizer takes, at once: seven answers, one 400."""
    url, _, _ = app
    bodies = [{"model": "pretrain-instruct", "prompt": PROMPT[: 30 + 7 * i], "max_tokens": 12, "temperature": 0,
               "retrieval": "encoder"} for i in range(8)]

    def post(i: int) -> requests.Response:
        data = json.dumps(bodies[i]).encode()
        if i == 5:
            data = data.replace(b'"prompt": "', b'"prompt": "\\ud800')
        return requests.post(f"{url}/v1/completions", data=data, timeout=120,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert [r.status_code for r in answers] == [400 if i == 5 else 200 for i in range(8)]
    assert answers[5].json()["error"]["param"] == "prompt"
    assert all(r.json()["usage"]["completion_tokens"] == 12 for i, r in enumerate(answers) if i != 5)


def test_16_concurrent_clients_get_what_each_gets_alone(app):
    from ray import serve

    url, _, _ = app
    c = client(url)
    words = PROMPT.split()
    requests = [dict(prompt=" ".join(words[i:] + words[:i]), max_tokens=16 + i % 3,
                     extra_body={"retrieval": "encoder" if i % 2 else "off"}) for i in range(16)]

    def ask(kw: dict) -> str:
        return c.completions.create(model="pretrain-instruct", temperature=0, **kw).choices[0].text

    alone = [ask(kw) for kw in requests]
    generator = serve.get_deployment_handle("Generator", app_name="retro")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert generator.statistics.remote().result()["largest_batch"] > 1  # requests decoded together


def test_a_client_that_leaves_mid_stream_frees_its_slot(app):
    from ray import serve

    url, _, _ = app
    generator = serve.get_deployment_handle("Generator", app_name="retro")
    before = generator.statistics.remote().result()
    with requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, stream=True,
                       json={"model": "pretrain-instruct", "prompt": PROMPT, "max_tokens": 360, "stream": True,
                             "retrieval": "encoder", "temperature": 0, "ignore_eos": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: "))  # decoding has started
    deadline = time.time() + 60
    while (stats := generator.statistics.remote().result())["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["kv_used_positions"] == 0 and stats["cancelled"] - before["cancelled"] == 1
    assert stats["tokens"] - before["tokens"] < 360  # dropped at a step, not decoded to the end
    after = client(url).completions.create(model="pretrain-instruct", prompt="The battle", max_tokens=5,
                                           temperature=0, extra_body={"retrieval": "off", "ignore_eos": True})
    assert after.usage.completion_tokens == 5


def scrape(prefix: str, label: str) -> dict[str, float]:
    """Ray's Prometheus endpoint -> {metric name: value summed over the series with ``label``}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and label in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


def test_the_engines_metrics_are_on_rays_endpoint_under_vllms_names(app):
    """After a few requests Ray's metrics endpoint has the engine's figures, named as vLLM names
    them (under Ray's ``ray_`` and our ``retro_ray_``) with a model_name label; idle, the gauges are 0."""
    url, _, _ = app
    for i in range(3):
        client(url).completions.create(model="pretrain-instruct", prompt=PROMPT[: 60 + i], max_tokens=8, temperature=0,
                                       extra_body={"retrieval": "encoder", "ignore_eos": True})
    p, deadline = "ray_retro_ray_", time.time() + 120
    histograms = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds",
                  "retrieval_latency_seconds")
    while True:  # each process exports its metrics on its own clock: wait for every figure
        found = scrape(p, 'model_name="pretrain-instruct"')
        short = [name for name in histograms if found.get(f"{p}{name}_count", 0) < 3]
        if found.get(f"{p}generation_tokens_total", 0) >= 24 and not short and \
                found.get(f"{p}num_requests_running", 1) == 0:
            break
        assert time.time() < deadline, (short, sorted(found))
        time.sleep(2)
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_retrieving", "kv_cache_usage_perc"):
        assert found[p + name] == 0, name  # idle
    for name in histograms:
        assert found[f"{p}{name}_sum"] > 0, name
    assert found[f"{p}prompt_tokens_total"] >= 3 * 10


def test_a_stream_comes_at_the_clients_pace_one_message_an_interval(app):
    """With serve.stream_interval_ms, the first token goes out at once and then what an interval
    gathered as one message: far fewer messages than tokens, the same text."""
    from ray import serve

    from retro_ray.serving.deployments import build

    url, cfg, _ = app
    batched = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={**LIMITS, "stream_interval_ms": 400})})
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    serve.run(build(batched, {"Ingress": small, "Generator": small, "Retriever": small}), name="batched",
              route_prefix="/batched")
    try:
        body = {"model": "pretrain-instruct", "prompt": PROMPT, "max_tokens": 60, "temperature": 0,
                "retrieval": "encoder", "ignore_eos": True}
        whole = requests.post(f"{url}/batched/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}).json()["choices"][0]["text"]
        with requests.post(f"{url}/batched/v1/completions", json={**body, "stream": True}, timeout=120, stream=True,
                           headers={"Authorization": f"Bearer {KEY}"}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                      if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == whole
        assert 2 <= len(events) <= 30  # 60 tokens: a message for the first, then one an interval
    finally:
        serve.delete("batched")


def test_the_deployments_fit_a_one_gpu_node_and_an_eight_gpu_one(app):
    from retro_ray.serving.deployments import deployment_options

    _, cfg, _ = app
    for node in ({"CPU": 8, "GPU": 1}, {"CPU": 96, "GPU": 8}):
        options = deployment_options(cfg, node)
        actors = {name: options[name]["ray_actor_options"] for name in ("Ingress", "Generator", "Retriever")}
        assert actors["Generator"]["num_gpus"] == 1 and "num_gpus" not in actors["Retriever"]  # the retriever on CPU
        assert sum(a.get("num_gpus", 0) for a in actors.values()) <= 1  # one replica of each fits one GPU
        assert sum(a["num_cpus"] for a in actors.values()) <= node["CPU"]
        shared = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"retriever_gpus": 0.25})})
        actors = deployment_options(shared, node)
        assert [actors[n]["ray_actor_options"]["num_gpus"] for n in ("Generator", "Retriever")] == [0.75, 0.25]
    laptop = deployment_options(cfg, {"CPU": 2})
    assert all("num_gpus" not in o["ray_actor_options"] for o in laptop.values())
    assert laptop["Generator"]["ray_actor_options"]["num_cpus"] == 1
    # torch's threads in the Generator keep OpenMP's default wait (sleeping ones served 0.55-0.7 of
    # the speed); the Retriever's sleep at once, off the Generator's cores between its bursts
    assert "runtime_env" not in laptop["Generator"]["ray_actor_options"]
    assert laptop["Retriever"]["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_serve_config_files_are_valid_serve_configs(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from retro_ray.core.errors import UserError
    from retro_ray.serving.deployments import read_serve_file

    spec = read_serve_file(str(ROOT / "cluster" / "serve.yaml"))
    assert set(spec.deployments) == {"Ingress", "Generator", "Retriever"}
    for options in spec.deployments.values():
        assert options["max_ongoing_requests"] > 0
        assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(options["autoscaling_config"])
    assert spec.http_options["request_timeout_s"] > 0
    llm = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "cluster" / "serve-llm.yaml").read_text()))
    assert llm.applications[0].import_path == "ray.serve.llm:build_openai_app"
    bad = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    bad["applications"][0]["args"]["serve"] = {"max_tokens": "many"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"bad.yaml: not a Serve config file of retro-ray: .*max_tokens"):
        read_serve_file(str(tmp_path / "bad.yaml"))


@pytest.mark.slow  # a whole job, submitted and stopped
def test_serve_job_answers_until_stopped(app, tmp_path):
    """`python jobs/serve.py` (what `ray job submit` runs): its own Ray, the run's model, an answer,
    then SIGTERM (`ray job stop`) takes the app down and ends with exit code 0."""
    import os
    import signal
    import subprocess
    import sys

    _, cfg, _ = app
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    port = _free_port()
    env = {**os.environ, "RETRO_RAY_API_KEY": "sk-from-env"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", str(config), "--port",
                             str(port), "--set", "serve.api_key_file=null"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # every line, as it comes
    reader.start()
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 240
        while time.time() < deadline and proc.poll() is None and not any("serving the OpenAI API" in x for x in lines):
            time.sleep(1)
        answer = client(url, key="sk-from-env").chat.completions.create(
            model="pretrain-instruct", messages=[{"role": "user", "content": "Who won at Hastings?"}], max_tokens=4,
            temperature=0)
        assert answer.usage.completion_tokens == 4
        assert requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-2000:]
    assert f"serving the OpenAI API at http://127.0.0.1:{port}/v1" in out
    assert "sk-from-env" not in out


def test_the_replica_keeps_nothing_per_request(app):
    """500 requests, 8 at a time: the engine is empty after each wave, its cache one free range
    again, and the replica's memory flat once warm."""
    from ray import serve

    url, _, _ = app
    generator = serve.get_deployment_handle("Generator", app_name="retro")
    body = {"model": "pretrain-instruct", "max_tokens": 3, "temperature": 0.7, "retrieval": "encoder",
            "ignore_eos": True}
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))

    def ask(i: int) -> int:
        r = session.post(f"{url}/v1/completions", json={**body, "prompt": PROMPT[: 40 + i % 50], "seed": i},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(100))) == {200}
        warm = generator.statistics.remote().result()
        assert set(pool.map(ask, range(100, 500))) == {200}
    after = generator.statistics.remote().result()
    assert after["finished"] - warm["finished"] == 400 and after["running"] == 0 and after["waiting"] == 0
    assert after["kv_used_positions"] == 0 and after["kv_free_ranges"] == 1 and after["free_rows"] == LIMITS["max_seqs"]
    assert after["rss_mb"] - warm["rss_mb"] < 25, (warm["rss_mb"], after["rss_mb"])


def test_a_replica_lost_mid_stream_ends_its_stream_with_an_error_and_its_replacement_serves(app):
    """Runs last: it kills the Generator replica. The client's stream ends with an error event
    within seconds, never hangs, and the next request is answered by the replica Serve starts."""
    import ray

    url, _, _ = app
    replica = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and "REPLICA" in a["name"] and "#Generator#" in a["name"])
    events = []
    with requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, stream=True,
                       json={"model": "pretrain-instruct", "prompt": PROMPT, "max_tokens": 380, "stream": True,
                             "retrieval": "encoder", "temperature": 0, "ignore_eos": True}) as r:
        lines = r.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: "))  # decoding has started
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        killed = time.time()
        events = [line for line in lines if line.startswith("data: ")]
    assert time.time() - killed < 30
    assert events[-1] == "data: [DONE]" and "generation_failed" in events[-2], events[-3:]
    deadline = time.time() + 120
    while True:
        try:
            after = client(url).completions.create(model="pretrain-instruct", prompt="The battle", max_tokens=5,
                                                   temperature=0, extra_body={"retrieval": "off", "ignore_eos": True})
            break
        except openai.APIStatusError:
            assert time.time() < deadline, "no replica took over"
            time.sleep(1)
    assert after.usage.completion_tokens == 5
