"""The HTTP rollout client (qednano_jax/rollout/sglang.py) against the real SGLang server and against
`python -m qednano_jax.serve`: the same tests, one client. Servers are the session fixtures of tests/conftest.py."""
import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from qednano_jax.config import RolloutConfig
from qednano_jax.data.tokenizer import load_tokenizer, prompt_ids
from qednano_jax.model import qwen3
from qednano_jax.model.hf import load_hf
from qednano_jax.rollout import RolloutError, SamplingParams, make_rollout
from qednano_jax.rollout.native import NativeRollout
from qednano_jax.rollout.refit import PREFIX

from rollout_reference import forward_logprobs

BACKENDS = [pytest.param("native_server", id="serve"),
            pytest.param("sglang_server", id="sglang", marks=pytest.mark.sglang)]
# SGLang runs its forward in a different kernel order (and bf16 where it chooses): logprobs agree to ~2e-3
TOL = {"native_server": 1e-5, "sglang_server": 1e-2}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def ref(tiny_hf_dir):
    cfg, params = load_hf(tiny_hf_dir)
    tok = load_tokenizer(tiny_hf_dir)
    prompts = [prompt_ids(tok, "Prove that n^2 is even."), tok("Let n = 3. Then")["input_ids"],
               tok("By induction on n, the sum")["input_ids"]]
    return cfg, params, tok, prompts, NativeRollout(cfg, params, tok)


def client_for(srv, ref, tmp_path, **kw):
    cfg = RolloutConfig(backend="sglang", urls=(srv.url,), concurrency=8, request_timeout=120, retries=2,
                        backoff=(0.5,), health_timeout=60, refit_dir=str(tmp_path / "refit"), **kw)
    return make_rollout(cfg, ref[0])


GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def test_greedy_equals_native_and_logprobs_match_forward(server, ref, tmp_path):
    name, srv = server
    cfg, params, tok, prompts, native = ref
    client = client_for(srv, ref, tmp_path)
    assert client.health()
    got = client.generate(prompts, GREEDY)
    want = native.generate(prompts, GREEDY)
    for p, (c,), (w,) in zip(prompts, got, want):
        assert c.token_ids == w.token_ids
        assert c.finish_reason == w.finish_reason and c.prompt_tokens == len(p)
        assert c.weight_version == client.weight_version
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        np.testing.assert_allclose(c.logprobs, forward_logprobs(cfg, params, p, c.token_ids, 0), atol=TOL[name])


def test_sampled_logprobs_are_tempered_behaviour_logprobs(server, ref, tmp_path):
    name, srv = server
    cfg, params, _, prompts, _ = ref
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95, top_k=20)
    groups = client_for(srv, ref, tmp_path).generate(prompts, sp, n=3)
    assert [len(g) for g in groups] == [3, 3, 3]
    for p, g in zip(prompts, groups):
        for c in g:
            assert 1 <= len(c.token_ids) <= 10 and c.finish_reason in ("stop", "length")
            np.testing.assert_allclose(c.logprobs, forward_logprobs(cfg, params, p, c.token_ids, 0.8),
                                       atol=TOL[name])
    assert len({tuple(c.token_ids) for g in groups for c in g}) > 3


def test_refit_changes_completions_and_version(server, ref, tmp_path):
    name, srv = server
    cfg, params, tok, prompts, _ = ref
    client = client_for(srv, ref, tmp_path)
    new = qwen3.init_params(cfg, jax.random.key(7))
    new = jax.tree.map(lambda a, b: a if a.ndim == 1 else b * 5.0, params, new)  # peaked: a clear argmax
    try:
        res = client.refit(new, "v1")
        assert res.weight_version == "v1" and res.export_s > 0 and res.update_s > 0
        got = client.generate(prompts, GREEDY)
        want = NativeRollout(cfg, new, tok).generate(prompts, GREEDY)
        assert [g[0].token_ids for g in got] == [g[0].token_ids for g in want]
        assert {g[0].weight_version for g in got} == {"v1"} and client.weight_version == "v1"
        client.refit(new, "v2")
    finally:
        client.refit(params, "restored")  # the session server serves the fixture weights again
    kept = sorted(d.name for d in (tmp_path / "refit").iterdir())
    assert kept == [f"{PREFIX}restored", f"{PREFIX}v2"]  # keep_last = 2, no temp dirs left
    assert [g[0].token_ids for g in client.generate(prompts, GREEDY)] == \
        [g[0].token_ids for g in ref[4].generate(prompts, GREEDY)]


@pytest.mark.slow
def test_killed_server_fails_clearly_then_restarted_server_is_used_again(server, ref, tmp_path):
    name, srv = server
    _, _, _, prompts, native = ref
    client = client_for(srv, ref, tmp_path, **{})
    client = make_rollout(dataclasses.replace(client.cfg, health_timeout=600), ref[0])
    client.generate(prompts[:1], GREEDY)  # gated and in use
    srv.stop()
    impatient = make_rollout(dataclasses.replace(client.cfg, health_timeout=3.0), ref[0])
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=srv.url):
        impatient.generate(prompts, GREEDY)
    assert time.monotonic() - t0 < 3.0 + 12  # the configured timeout plus one probe and one backoff
    restarter = threading.Thread(target=srv.start)
    restarter.start()
    try:
        got = client.generate(prompts, GREEDY)  # fails over to waiting for /health_generate, then retries
    finally:
        restarter.join()
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in native.generate(prompts, GREEDY)]


@pytest.mark.parametrize("thinking", [True, False])
def test_serve_chat_completions_is_the_greedy_generate_of_the_chat_prompt(native_server, tiny_hf_dir, thinking):
    """`/v1/chat/completions` on `python -m qednano_jax.serve`: the prompt is the model dir's chat template (thinking
    opened, or disabled through chat_template_kwargs), the reply is the same greedy tokens `/generate` gives for those
    ids, split at `</think>` into reasoning_content and content."""
    import requests

    from qednano_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_hf_dir)
    messages = [{"role": "user", "content": "Let n = 3. Then n^2 = 9, hence"}]
    r = requests.post(f"{native_server.url}/v1/chat/completions", timeout=120, json={
        "model": "m", "messages": messages, "max_tokens": 12, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": thinking}})
    assert r.status_code == 200, r.text
    reply = r.json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert text.endswith("<|im_start|>assistant\n<think>\n" if thinking else "<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ref = requests.post(f"{native_server.url}/generate", timeout=120, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()
    out = tok.decode(ref["output_ids"], skip_special_tokens=False).replace("<|im_end|>", "").replace(
        "<|endoftext|>", "")
    if "</think>" in out:
        want_reasoning, want_content = out.split("</think>", 1)
    else:
        want_reasoning, want_content = (out, "") if thinking else ("", out)
    msg = reply["choices"][0]["message"]
    assert (msg["reasoning_content"] or "") == want_reasoning.strip("\n")
    assert msg["content"] == want_content.strip()
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref["output_ids"]),
                              "total_tokens": len(ids) + len(ref["output_ids"])}
    assert reply["choices"][0]["finish_reason"] == ("length" if len(ref["output_ids"]) == 12 else "stop")
    bad = requests.post(f"{native_server.url}/v1/chat/completions", timeout=60, json={"messages": messages, "n": 2})
    assert bad.status_code == 400 and "n: 2" in bad.text
