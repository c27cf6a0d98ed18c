"""Multi-host SFT: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo CPU collectives: the jax 0.10
default of jax_cpu_collectives_implementation) against one process with 8 devices fed the same global batches.

Each host reads its own rows (row i goes to host i % 2) and feeds its half of every global batch; the reference
runs the real SFT loop in this (8-device) process with the two hosts' batches concatenated in host order, which is
how `make_array_from_process_local_data` lays them out. Checked: same losses, per-host data shards, metrics /
TensorBoard / HF export written once (process 0), orbax checkpoints saved and restored by both processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

OVERRIDES = ["train.batch_size=8", "data.seq_len=64", "data.max_examples=16", "optim.schedule=constant",
             "optim.warmup_ratio=0", "checkpoint.every=2", "train.progress=false", "train.log_every=1"]
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_env(i: int, hosts: int, port: int) -> dict:
    """The environment of process i of `hosts` (8 CPU devices in all), joined by jax.distributed on 127.0.0.1."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // hosts}", "JAX_PLATFORMS": "cpu"}
    if hosts > 1:
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(hosts),
                "JAX_PROCESS_ID": str(i)}
    return env


def _train(args: list[str], run_dir: Path, hosts: int, tag: str, kill_after_step: int | None = None) -> list[str]:
    """`python -m qednano_jax.train ARGS train.run_dir=RUN_DIR` as `hosts` processes (8 CPU devices in all) joined by
    jax.distributed on 127.0.0.1; with kill_after_step, every process is SIGKILLed once that step's checkpoint
    exists, otherwise each must exit 0. Returns the processes' outputs."""
    port = _free_port()
    procs, logs = [], []
    for i in range(hosts):
        log = open(run_dir.parent / f"{tag}.process{i}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, "-m", "qednano_jax.train", *args, f"train.run_dir={run_dir}"],
                                      env=_host_env(i, hosts, port), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        if kill_after_step is not None:
            import time
            done = run_dir / "checkpoints" / str(kill_after_step)
            deadline = time.time() + 600
            while not done.is_dir() and time.time() < deadline and all(p.poll() is None for p in procs):
                time.sleep(0.1)
            for p in procs:
                p.kill()
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    if kill_after_step is None:
        assert codes == [0] * hosts, "\n\n".join(o[-3000:] for o in outs)
    return outs


class _HostsConcat:
    """One iterator over several hosts' packed-batch iterators: their rows concatenated in host order."""

    def __init__(self, iters):
        self.iters = iters

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iters]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [it.get_state() for it in self.iters]

    def set_state(self, state):
        for it, s in zip(self.iters, state):
            it.set_state(s)


def _reference_losses(tmp_path, monkeypatch, steps: int) -> dict[int, float]:
    """The SFT loop in this 8-device process, fed both hosts' row shards (process_count=2) side by side."""
    from qednano_jax.config import load_config
    from qednano_jax.data import sft as sft_data
    from qednano_jax.train import sft

    real = sft_data.sft_batches

    def two_hosts(cfg_data, *, batch_rows, process_index=0, process_count=1, **kw):
        parts = [real(cfg_data, batch_rows=batch_rows // 2, process_index=p, process_count=2, **kw) for p in (0, 1)]
        stats = sft_data.DataStats(**{f: sum(getattr(s, f) for _, s in parts)
                                      for f in sft_data.DataStats.__dataclass_fields__})
        return _HostsConcat([iter(ds) for ds, _ in parts]), stats

    monkeypatch.setattr(sft_data, "sft_batches", two_hosts)
    cfg = load_config(None, OVERRIDES + [f"train.steps={steps}", f"train.run_dir={tmp_path / 'ref'}"])
    return sft.run(cfg, log=lambda m: None)["losses"]


@pytest.mark.slow
def test_two_hosts_match_one_host_and_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    outs = _train([*OVERRIDES, "train.steps=4"], run_dir, 2, "first")
    for i, out in enumerate(outs):
        assert "data: 8 rows" in out, out[-2000:]  # each host read its own half of the 16 rows
    consumed = [run_dir / f"consumed.process_{i}.jsonl" for i in range(2)]
    if all(p.exists() for p in consumed):  # the per-host audit trail: host p only ever saw rows i % 2 == p
        for p, path in enumerate(consumed):
            ids = [i for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]
            assert ids and all(i % 2 == p for i in ids)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # process 0 alone writes metrics
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    # the HF export: each host wrote the file of its own layers, process 0 the rest and the index
    files = sorted(p.name for p in (run_dir / "hf").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], files
    index = json.loads((run_dir / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.mlp.up_proj.weight"] == files[0] and index["model.norm.weight"] == files[2]
    assert index[f"model.layers.{max(int(k.split('.')[2]) for k in index if k.startswith('model.layers.'))}"
                 ".mlp.up_proj.weight"] == files[1]
    ckpt = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]
    assert sorted(p.name for p in (ckpt / "4" / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                                    "process_1-of-2.json"]

    # restart both processes for 2 more steps: they resume from step 4
    outs = _train([*OVERRIDES, "train.steps=6", "train.allow_resume_changes=true"], run_dir, 2, "resume")
    for out in outs:
        assert "resumed from" in out and "step 4" in out, out[-2000:]
    got = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        got[m["step"]] = m["loss"]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]

    want = _reference_losses(tmp_path, monkeypatch, 6)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-5)
    assert got[6] < got[1]  # it trains
    # the per-host export holds the same weights as the one-process run's single-file export, and transformers
    # loads it with no missing or unexpected tensor
    import jax
    from transformers import AutoModelForCausalLM

    from qednano_jax.model.hf import load_hf
    (_, two), (_, one) = load_hf(run_dir / "hf"), load_hf(tmp_path / "ref" / "hf")
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=3e-5)  # 6 steps of float drift
    _, info = AutoModelForCausalLM.from_pretrained(run_dir / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


_EXPORT = """
import sys
from qednano_jax import sharding
sharding.maybe_initialize_distributed()
from qednano_jax.config import load_config
from qednano_jax.model.hf import save_hf
from qednano_jax.train import sft, step
cfg = load_config(None, ["model.num_layers=3", "model.initializer_range=0.3", "mesh.shape.fsdp=-1"])
mesh, rules = sft.mesh_and_rules(cfg)
params = step.random_params(cfg.model, 7, step.param_shardings(cfg.model, mesh, rules))
save_hf(cfg.model, params, sys.argv[1], dtype=sys.argv[2])
"""


def _export(out: Path, hosts: int) -> Path:
    """The embedded default model with 3 layers (seeded params, fsdp over all 8 devices), exported in bf16 by
    `hosts` processes joined by jax.distributed on 127.0.0.1."""
    port, procs = _free_port(), []
    for i in range(hosts):
        procs.append(subprocess.Popen([sys.executable, "-c", _EXPORT, str(out), "bfloat16"],
                                      env=_host_env(i, hosts, port), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    for p in procs:
        log = p.communicate(timeout=600)[0].decode()
        assert p.returncode == 0, log[-3000:]
    return out


def test_per_host_export_of_an_uneven_layer_count_equals_the_one_host_export(tmp_path):
    """3 layers over 2 hosts: host 0 writes layers 0-1, host 1 layer 2, process 0 the rest and the index (no
    gather of the layers); the tensors equal a one-process export of the same seeded params, in bf16, and
    transformers loads it with no missing or unexpected tensor and the same logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    for n in (1, 2):
        _export(tmp_path / f"hf{n}", n)
    one_dir, two_dir = tmp_path / "hf1", tmp_path / "hf2"
    assert [p.name for p in one_dir.glob("*.safetensors")] == ["model.safetensors"]
    files = sorted(p.name for p in two_dir.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], files
    index = json.loads((two_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert [index[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(3)] == [files[0], files[0], files[1]]
    assert index["model.norm.weight"] == index["model.embed_tokens.weight"] == files[2]
    one = load_file(one_dir / "model.safetensors")
    two = {}
    for f in files:
        part = load_file(two_dir / f)
        assert not set(part) & set(two) and all(index[k] == f for k in part)
        two |= part
    assert sorted(two) == sorted(one) == sorted(index)
    for name in one:
        assert one[name].dtype == two[name].dtype == torch.bfloat16 and torch.equal(one[name], two[name]), name
    logits = []
    for d in (one_dir, two_dir):
        m, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, torch_dtype=torch.float32)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits.append(m(torch.tensor([[1, 50, 900, 7, 4096]])).logits.numpy())
    np.testing.assert_array_equal(logits[0], logits[1])
    assert np.abs(logits[0]).max() > 0


def test_sglang_serves_the_per_host_export(tmp_path):
    """The real SGLang server (bf16) starts from the 3-file export of 2 processes; the logprobs of its 8 greedy tokens
    match transformers on the same files, and do not match them with host 1's layer (2) replaced by layer 1."""
    venv = os.environ.get("QEDNANO_SGLANG_VENV")
    if not venv:
        pytest.skip("set QEDNANO_SGLANG_VENV to a SGLang venv (see ../shared/sglang-cpu/README.md)")
    import requests
    import torch
    from transformers import AutoModelForCausalLM
    model = _export(tmp_path / "hf2", 2)
    serve = Path(os.environ.get("QEDNANO_SGLANG_CPU") or REPO.parent / "shared/sglang-cpu") / "serve.sh"
    port, prompt = _free_port(), [1, 50, 900, 7, 4096]
    pid = int(subprocess.run([str(serve), venv, str(model), str(port), "--skip-tokenizer-init", "--dtype",
                              "bfloat16", "--sleep-on-idle"], check=True, capture_output=True, text=True,
                             timeout=400).stdout.split()[-1])
    try:
        r = requests.post(f"http://127.0.0.1:{port}/generate", timeout=120, json={
            "input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}}).json()
    finally:
        os.kill(pid, 15)
    got = [(lp, t) for lp, t, _ in r["meta_info"]["output_token_logprobs"]]
    assert len(got) == 8, r
    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)

    def error():  # max |SGLang logprob - transformers'| over the tokens SGLang chose
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([prompt + [t for _, t in got]])).logits[0], -1).numpy()
        return max(abs(lp - logp[len(prompt) - 1 + i, t]) for i, (lp, t) in enumerate(got))

    served = error()
    with torch.no_grad():  # host 1's layer swapped for host 0's last one
        m.model.layers[2].load_state_dict(m.model.layers[1].state_dict())
    assert served < 0.08 and error() > 0.3, (served, error())


# ----------------------------------------------------------------------------------------------- RL and RC

RL_OVERRIDES = ["train.steps=2", "rl.micro_batch_rows=8", "train.progress=false", "checkpoint.every=1",
                "checkpoint.async_save=false", "train.export_hf=false"]


def _per_step(run_dir: Path) -> dict:
    return {json.loads(x)["step"]: json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rl", "rc"])
def test_two_host_rl_and_rc_match_one_host_and_resume_after_sigkill(tmp_path, stage):
    """The tiny RL / RC demos (native engine on process 0's devices, native judge) on 2 processes x 4 devices give
    one 8-device process's per-step loss and grad norm; killed after step 1 and re-run, they resume on both hosts
    and end where the uninterrupted run does, each step logged once (by process 0)."""
    args = [f"configs/{stage}-tiny.yaml", *RL_OVERRIDES]
    _train(args, tmp_path / "one", 1, "one")
    _train(args, tmp_path / "two", 2, "two", kill_after_step=1)
    outs = _train(args, tmp_path / "two", 2, "resume")
    assert "resumed from" in outs[0] and "step 1" in outs[0], outs[0][-2000:]
    one, two = _per_step(tmp_path / "one"), _per_step(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for s in (1, 2):
        for k in ("loss", "grad_norm", "reward_mean", "completion_len_mean"):
            assert abs(two[s][k] - one[s][k]) <= 1e-5 * max(1.0, abs(one[s][k])), (s, k, one[s][k], two[s][k])


@pytest.mark.slow
def test_two_host_rl_over_http_serve_matches_one_host(tmp_path, tiny_hf_dir, native_server):
    """The RL loop with `python -m qednano_jax.serve` as the rollout backend: on 2 processes, process 0 talks to
    the server and both take part in each refit's export (process 0 writes it); per-step loss and grad norm equal one
    8-device process's. The server is put back on its own checkpoint afterwards."""
    import requests

    from qednano_jax.rollout.refit import update_from_disk
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"Show {i} < {i + 1}.", "rubrics": "7 pts: a proof."}) + "\n"
                            for i in range(4)))
    extra = [f"train.init={tiny_hf_dir}", f"data.tokenizer={tiny_hf_dir}", f"data.path={rows}", "data.seq_len=128",
             "rollout.backend=sglang", f"rollout.urls=[{native_server.url}]", "rollout.health_timeout=60",
             "grader.max_tokens=4"]
    try:
        args = ["configs/rl-tiny.yaml", *RL_OVERRIDES, *extra]
        _train([*args, f"rollout.refit_dir={tmp_path / 'r1'}"], tmp_path / "one", 1, "one")
        _train([*args, f"rollout.refit_dir={tmp_path / 'r2'}"], tmp_path / "two", 2, "two")
    finally:
        update_from_disk(requests.Session(), native_server.url, tiny_hf_dir, "default", timeout=120)
    one, two = _per_step(tmp_path / "one"), _per_step(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for s in (1, 2):
        for k in ("loss", "grad_norm", "reward_mean", "completion_len_mean"):
            assert abs(two[s][k] - one[s][k]) <= 1e-5 * max(1.0, abs(one[s][k])), (s, k, one[s][k], two[s][k])
    # the refit exports of the 2-process run: written once (by process 0), one per weight version, loadable
    exported = sorted(p.name for p in (tmp_path / "r2").iterdir())
    assert exported == ["weights-1", "weights-2"], exported
