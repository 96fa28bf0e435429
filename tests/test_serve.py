"""Serving: the app logic in Serve's local testing mode, and one real
HTTP session on loopback (every endpoint, every validation error, streaming, auth, a hot update, the official
`openai` client). The served run is tests/conftest.py's `served_run`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import requests
import torch

from mome_ray.errors import MomeError
from mome_ray.serving import file_version, load_spec
from tests.conftest import ROOT, SERVED_LANGS, _free_port, local_serve, wait_until_ready

LANGS = SERVED_LANGS
TOKEN = "test-token"
PROMPTS = {"en": "The river runs through the old town", "fr": "La rivière traverse la vieille ville",
           "de": "Der Fluss fließt durch die alte Stadt", "py": "def f(x):\n    return x + 1\n"}


class Client(requests.Session):
    """Every request has a timeout: a hung server fails its test rather than stalling the suite."""

    def request(self, *args, timeout=60, **kwargs):
        return super().request(*args, timeout=timeout, **kwargs)


def test_only_safetensors_models_are_served(served_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(served_run, run, symlinks=True)
    (run / "experts" / "de" / "model.safetensors").unlink()
    (run / "experts" / "de" / "pytorch_model.bin").write_bytes(b"a pickle could run code")
    with pytest.raises(MomeError, match="expert 'de'.*only safetensors"):
        load_spec(run)
    with pytest.raises(MomeError, match="no MoE artifact.*mome moe"):
        load_spec(tmp_path / "elsewhere")
    (run / "moe" / "ple.json").write_text("{not json")
    with pytest.raises(MomeError, match="not a valid MoE artifact"):
        load_spec(run)


def test_request_models_and_error_messages():
    from pydantic import ValidationError

    from serve.api import CompletionRequest, GenerateRequest, ScoreRequest
    from serve.http import describe_validation

    for bad in ({"prompt": ""}, {"prompt": "x", "top_p": 0}, {"prompt": "x", "temperature": -1},
                {"prompt": "x", "max_new_tokens": 0}, {"prompt": "x", "seed": -1}, {"prompt": 3},
                {"prompt": "x", "expert": "fr", "top_k": 2}, {"prompt": "x", "surprise": 1}):
        with pytest.raises(ValidationError) as e:
            GenerateRequest(**bad)
        assert describe_validation(e.value.errors())
    with pytest.raises(ValidationError) as e:
        ScoreRequest(prompt="x", top_k=0)
    assert describe_validation(e.value.errors()) == "top_k: Input should be greater than or equal to 1 (got 0)"
    for bad, message in (([], "at least one text"), (["a", ""], "must not be empty"), ([1], "valid string")):
        with pytest.raises(ValidationError, match=message):
            CompletionRequest(prompt=bad)
    assert CompletionRequest(prompt=["hi", "yo"], logprobs=3, user="u").texts == ["hi", "yo"]  # OpenAI extras ignored


# --- the app logic, in-process (Serve's local testing mode: no cluster, no HTTP)


@pytest.fixture(scope="module")
def local_app(served_run):
    from ray import serve

    from serve.app import AppArgs, build_app

    with local_serve():
        yield serve.run(build_app(AppArgs(run_dir=str(served_run))), _local_testing_mode=True)


def test_local_app_routes_scores_mixes_and_generates(local_app):
    from fastapi import HTTPException

    from serve.api import GenerateRequest, RouteRequest, ScoreRequest

    routes = local_app.route.remote(RouteRequest(prompt=list(PROMPTS.values()) + ["   "])).result().results
    assert [r.language for r in routes] == LANGS + ["unknown"]
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-4 for r in routes[:4])
    assert routes[4].expert in LANGS  # no common expert in this MoE: the most probable one

    routed = local_app.score.remote(ScoreRequest(prompt=PROMPTS["de"])).result()
    forced = local_app.score.remote(ScoreRequest(prompt=PROMPTS["de"], expert="de")).result()
    assert routed.experts == ["de"] and routed.logprobs == forced.logprobs and forced.route is None
    mixed = local_app.score.remote(ScoreRequest(prompt=PROMPTS["de"], top_k=2)).result()
    assert len(mixed.experts) == 2 and abs(sum(mixed.weights) - 1) < 1e-6 and mixed.experts[0] == "de"
    assert len(mixed.logprobs) == len(mixed.tokens) == len(routed.tokens)

    gen = lambda **kw: local_app.generate.remote(GenerateRequest(prompt=PROMPTS["py"], **kw)).result()
    a, b = gen(max_new_tokens=8, seed=4), gen(max_new_tokens=8, seed=4)
    assert a.text == b.text and a.experts == ["py"] and a.completion_tokens + (a.finish_reason == "stop") >= 1
    assert gen(max_new_tokens=5, temperature=0, expert="teacher").experts == ["teacher"]
    assert gen(max_new_tokens=4, top_k=2, seed=1).text == gen(max_new_tokens=4, top_k=2, seed=1).text
    with pytest.raises(HTTPException) as e:
        local_app.score.remote(ScoreRequest(prompt="x", expert="klingon")).result()
    assert e.value.status_code == 422 and "no expert 'klingon'" in e.value.detail
    served = local_app.experts.remote().result()
    experts = served.experts
    assert served.variant == "ple"  # the default, best by the grid: no grid here, so PLE
    assert [(x.name, x.kind) for x in experts] == [(l, "language") for l in LANGS] + [("teacher", "teacher")]
    models = local_app.models.remote().result().data
    assert [(m.id, m.kind) for m in models] == [("mome", "moe")] + [(x.name, x.kind) for x in experts]


@pytest.mark.parametrize("variant", ["ple", "jeet", "moe-ce"])
def test_served_equals_evaluated(served_run, variant):
    """/v1/score's log-probabilities are those of the evaluation grid's own model rows (grid.moe_rows over the
    MoE the grid loads, routed by the run's router) for the same text, expert choice and top-k."""
    from ray import serve

    from mome_ray.grid import moe_rows, route_for
    from mome_ray.jeet import JEETModel
    from mome_ray.moe import MoE, load_ple
    from mome_ray.tokenizer import load_tokenizer
    from serve.api import ScoreRequest
    from serve.app import AppArgs, build_app

    bank = load_ple({l: served_run / "experts" / l for l in LANGS}) if variant == "ple" else \
        JEETModel.load(served_run / "moe" / variant)
    routing, route = route_for(served_run, LANGS, served_run / "tokenizer")
    rows = {r.row: r for r in moe_rows(variant, MoE(bank), route, routing, top_k=2)}
    common = " + common" if variant == "moe-ce" else ""  # MoE-CE as trained: its common stack averaged in
    tok = load_tokenizer(served_run / "tokenizer")
    with local_serve():
        app = serve.run(build_app(AppArgs(run_dir=str(served_run), overrides=[f"serve.model={variant}"])),
                        _local_testing_mode=True)
        assert app.experts.remote().result().variant == variant
        for lang, text in PROMPTS.items():
            ids = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])
            for row, select in ((f"router top-1{common}", {}), (f"expert fr forced{common}", {"expert": "fr"}),
                                (f"router top-2 mix{common}", {"top_k": 2})):
                served = app.score.remote(ScoreRequest(prompt=text, **select)).result()
                with torch.no_grad():
                    logits = rows[row].modules(lang)(input_ids=ids).logits
                want = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                assert torch.allclose(torch.tensor(served.logprobs), want, atol=1e-4), (variant, lang, row)
                if not select:
                    assert served.experts == [lang]  # the router is right on these
                assert len(served.experts) == (2 if "top_k" in select else 1)


# --- one real HTTP session on loopback


@pytest.fixture(scope="module")
def http_app(ray_head, served_run, tmp_path_factory):
    """The app deployed the way `serve deploy` does (declarative, through the dashboard's REST API), its token
    in a file the replicas read (the deploy config names the file, never the token)."""
    from ray import serve

    from serve.launch import deploy_config

    port = _free_port()
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    overrides = [f"serve.token_file={token_file}", "serve.limits.max_new_tokens=32", "serve.limits.max_body_bytes=20000"]
    # Serve's REST API (what `serve deploy` calls): PUT the whole declarative config.
    deploy = lambda models=None, more=(): requests.put(
        f"{ray_head['dashboard']}/api/serve/applications/", timeout=60,
        json=deploy_config(str(served_run), None, overrides + list(more), "127.0.0.1", port, models)).raise_for_status()
    deploy()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, headers={"Authorization": f"Bearer {TOKEN}"})
    session = Client()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        yield url, session, deploy
    finally:
        serve.shutdown()


def sse_events(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_http_every_endpoint(http_app):
    url, s, _ = http_app
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}  # liveness: no RPC, no token
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 401  # one RPC per expert: behind the token
    assert s.get(f"{url}/readyz").json() == {"status": "ready", "experts": LANGS + ["teacher"]}
    assert "/v1/generate" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    experts = s.get(f"{url}/v1/experts").json()
    assert [e["name"] for e in experts["experts"]] == LANGS + ["teacher"]
    assert all(len(e["version"]) == 12 and e["params"] > 0 for e in experts["experts"])
    assert experts["router"]["classes"] == sorted(LANGS)

    r = s.post(f"{url}/v1/route", json={"prompt": PROMPTS["fr"]}).json()
    assert r["results"][0]["language"] == "fr"
    score = s.post(f"{url}/v1/score", json={"prompt": PROMPTS["en"]}).json()
    assert score["experts"] == ["en"] and score["perplexity"] > 1 and len(score["logprobs"]) == len(score["tokens"])

    body = {"prompt": PROMPTS["py"], "max_new_tokens": 10, "temperature": 0.8, "seed": 7}
    first, again = (s.post(f"{url}/v1/generate", json=body).json() for _ in range(2))
    assert first["text"] == again["text"] and first["experts"] == ["py"]
    events = sse_events(s.post(f"{url}/v1/generate", json={**body, "stream": True}))
    assert events[0]["experts"] == ["py"] and events[-1]["finish_reason"] in ("stop", "length")
    assert "".join(e.get("text", "") for e in events[1:-1]) == first["text"]  # the same seed, streamed

    done = s.post(f"{url}/v1/completions", json={"model": "mome", "prompt": PROMPTS["de"], "max_tokens": 6,
                                                 "seed": 1}).json()
    assert done["object"] == "text_completion" and done["usage"]["completion_tokens"] <= 6
    assert done["choices"][0]["finish_reason"] in ("stop", "length")
    chunks = sse_events(s.post(f"{url}/v1/completions", json={"model": "teacher", "prompt": "Hello",
                                                              "max_tokens": 5, "stream": True, "seed": 2}))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[0]["model"] == "teacher"


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/generate", b'{"prompt": ', 422, "not valid JSON"),
    ("/v1/generate", b"prompt=hello", 422, "not valid JSON"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ("/v1/generate", {"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ("/v1/generate", {}, 422, "prompt: Field required"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": "many"}, 422, "max_new_tokens: Input should be a valid integer"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 33}, 422, "over the limit of 32"),
    ("/v1/generate", {"prompt": "x", "top_p": 1.5}, 422, "top_p: Input should be less than or equal to 1"),
    ("/v1/generate", {"prompt": "x", "expert": "klingon"}, 422, "no expert 'klingon'"),
    ("/v1/generate", {"prompt": "x", "expert": "fr", "top_k": 2}, 422, "either 'expert' or 'top_k'"),
    ("/v1/generate", {"prompt": "x", "top_k": 5}, 422, "top_k: at most 4"),
    ("/v1/generate", {"prompt": "word " * 60, "max_new_tokens": 32}, 422, "does not fit the context"),
    ("/v1/generate", {"prompt": "x", "colour": "blue"}, 422, "colour: Extra inputs are not permitted"),
    ("/v1/score", {"prompt": "x" * 9000}, 422, "over the limit of 8,000"),
    ("/v1/score", {"prompt": "y" * 30000}, 413, "over the limit of 20,000 bytes"),
    ("/v1/route", {"prompt": ["a"] * 65}, 422, "give 1 to 64 texts"),
    ("/v1/route", {"prompt": []}, 422, "give 1 to 64 texts"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 422, "n: Input should be less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-5"}, 422, "no expert 'gpt-5'"),
    ("/v1/completions", {"prompt": []}, 422, "prompt: give at least one text"),
    ("/v1/completions", {"prompt": ["a", ""]}, 422, "prompt: must not be empty"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 422, "give 1 to 64 texts"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 33}, 422, "max_tokens: 33 is over the limit of 32"),
    ("/v1/completions", {"prompt": [[1, 2]]}, 422, "prompt.list[str].0: Input should be a valid string"),
    ("/v1/completions", {"prompt": ["x", "word " * 60], "max_tokens": 32}, 422, "does not fit the context"),
    ("/v1/nothing", {"prompt": "x"}, 404, "Not Found"),
])
def test_http_client_mistakes_are_4xx_with_a_message(http_app, path, body, status, message):
    url, s, _ = http_app
    r = s.post(url + path, data=body, headers={"Content-Type": "application/json" if body.startswith(b"{") else
                                               "application/x-www-form-urlencoded"}) \
        if isinstance(body, bytes) else s.post(url + path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_http_needs_the_token(http_app):
    url, _, _ = http_app
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.post(f"{url}/v1/route", json={"prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]


def test_the_official_openai_client(http_app):
    import openai

    url, _, _ = http_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    models = client.models.list().data
    assert [m.id for m in models] == ["mome"] + LANGS + ["teacher"] and models[0].variant == "ple"
    assert client.models.retrieve("fr").kind == "language"
    complete = lambda prompt, **kw: client.completions.create(prompt=prompt, max_tokens=5, seed=3, **kw)

    routed = complete(PROMPTS["de"], model="mome")
    (c,) = routed.choices
    assert c.index == 0 and c.finish_reason in ("stop", "length") and routed.model == "mome"
    u = routed.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    greedy = {"prompt": PROMPTS["en"], "max_new_tokens": 5, "temperature": 0, "expert": "fr"}
    forced = complete(PROMPTS["en"], model="fr", temperature=0)  # a forced expert: its name as the model
    assert forced.choices[0].text == http_app[1].post(f"{url}/v1/generate", json=greedy).json()["text"]

    prompts = list(PROMPTS.values())
    alone = [complete(p, model="mome") for p in prompts]
    batch = complete(prompts, model="mome")  # one choice per prompt, each as if it came alone (same seed)
    assert [(c.index, c.text) for c in batch.choices] == [(i, a.choices[0].text) for i, a in enumerate(alone)]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    chunks = list(complete(prompts[:2], model="mome", stream=True, stream_options={"include_usage": True}))
    texts, finished = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        (c,) = chunk.choices
        texts[c.index] += c.text
        finished[c.index] = c.finish_reason or finished[c.index]
    assert texts == [a.choices[0].text for a in alone[:2]] and None not in finished
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == sum(a.usage.total_tokens for a in alone[:2])

    with pytest.raises(openai.UnprocessableEntityError, match="no expert 'klingon'"):
        complete("x", model="klingon")
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-5'"):
        client.models.retrieve("gpt-5")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_hot_update_swaps_one_expert_in_place_without_dropping_requests(http_app, served_run):
    url, s, deploy = http_app
    before = {e["name"]: e["version"] for e in s.get(f"{url}/v1/experts").json()["experts"]}
    statuses, stop = [], threading.Event()

    def load():
        with Client() as c:
            c.headers["Authorization"] = f"Bearer {TOKEN}"
            while not stop.is_set():
                statuses.append(c.post(f"{url}/v1/score", json={"prompt": PROMPTS["fr"], "expert": "fr"}).status_code)

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        deploy({"fr": str(served_run / "retrained-fr")})  # only expert-fr's user_config changes
        for _ in range(240):
            after = {e["name"]: e["version"] for e in s.get(f"{url}/v1/experts").json()["experts"]}
            if after["fr"] != before["fr"]:
                break
            threading.Event().wait(0.5)
        n_during, deadline = len(statuses), time.time() + 60
        while len(statuses) < n_during + 6 and time.time() < deadline:  # a few requests on the new version too
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert after["fr"] != before["fr"] and {k: v for k, v in after.items() if k != "fr"} == \
        {k: v for k, v in before.items() if k != "fr"}
    assert len(statuses) > 6 and set(statuses) == {200}, statuses


def test_a_multiplexed_pool_holding_fewer_experts_than_it_serves_answers_as_the_moe(http_app, served_run):
    """serve.multiplex=2 (en, fr, de in the pool: 3 experts, 2 loaded at a time) and serve.hot=[py]: every
    answer, routed or forced, equals the one-deployment MoE's; mixing is refused with a 422 that says why."""
    url, s, deploy = http_app
    asks = [("/v1/score", {"prompt": PROMPTS[lang]}) for lang in LANGS] + \
        [("/v1/score", {"prompt": PROMPTS["en"], "expert": lang}) for lang in LANGS] + \
        [("/v1/generate", {"prompt": PROMPTS[lang], "max_new_tokens": 8, "temperature": 0.9, "seed": 3}) for lang in LANGS]
    before = [s.post(url + path, json=body).json() for path, body in asks]
    retrained = served_run / "retrained-fr"  # the fr that test_hot_update swapped in, if it ran: keep it
    fr = {e["name"]: e["version"] for e in s.get(f"{url}/v1/experts").json()["experts"]}["fr"]
    deploy({"fr": str(retrained)} if fr == file_version(retrained / "model.safetensors") else None,
           ["serve.multiplex=2", "serve.hot=[py]"])
    for _ in range(240):  # every replica is replaced (the app's args changed): the proxy may answer 404/503 meanwhile
        r = s.get(f"{url}/v1/experts")
        names = [(d["name"], d["params"]) for d in r.json()["experts"]] if r.status_code == 200 else []
        if ("en", None) in names:
            break
        time.sleep(0.5)
    assert names == [("py", names[0][1]), ("en", None), ("fr", None), ("de", None), ("teacher", names[-1][1])]
    for _ in range(2):  # the second round reloads what the cap evicted
        assert [s.post(url + path, json=body).json() for path, body in asks] == before
    r = s.post(f"{url}/v1/score", json={"prompt": PROMPTS["fr"], "top_k": 2})
    assert r.status_code == 422 and "serve.multiplex" in r.json()["error"]["message"]


def test_serve_config_yaml_is_a_valid_deploy_config_for_this_app(served_run):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    config = ServeDeploySchema.parse_obj(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app" and config.http_options.host == "127.0.0.1"
    assert (ROOT / app.args["config"]).is_file()
    build_app({**app.args, "run_dir": str(served_run), "config": str(ROOT / app.args["config"])})  # a dict, as Serve
    assert {d.name for d in app.deployments} <= {"router", "moe", "teacher"}  # an unknown name fails the deploy
