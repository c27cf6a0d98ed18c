"""Test setup: 8 forced CPU devices, set before jax is imported anywhere (every sharding test uses a real mesh)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# JAX's persistent compilation cache, fresh for each test session and inherited by the CLI subprocesses that tests
# start (a sigkill-and-resume test compiles the same train step in three processes): each program compiles once.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="qednano-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------------------------- rollout fixtures
# Session-scoped, shared by the rollout, RL, eval and data-generation tests (keep the names stable):
#   tiny_hf_dir    Path of a tiny random Qwen3 HF checkpoint (hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16)
#                  with a ~512-token BPE tokenizer and Qwen-style thinking chat template, built by our own code.
#   sglang_server  ServerProcess: the real SGLang server (../shared/sglang-cpu/serve.sh) on tiny_hf_dir, on a free
#                  loopback port; skips when QEDNANO_SGLANG_VENV is unset. Attributes .url .port .model_dir;
#                  .stop() / .start() restart it on the same port (tests that refit or restart restore it).
#   native_server  ServerProcess: `python -m qednano_jax.serve` on tiny_hf_dir (same HTTP API).
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_CORPUS = [f"Let n = {i}. Then n^2 = {i * i}, and n + {j} = {i + j} is {'even' if (i + j) % 2 == 0 else 'odd'}."
               for i in range(40) for j in (1, 3)] + [
    "Proof. Suppose, for contradiction, that the claim fails for some integer k.",
    "By induction on n, the sum of the first n odd numbers equals n^2.",
    "Hence the triangle inequality gives |a + b| <= |a| + |b|, which completes the proof.",
    "Therefore x is divisible by 3, and since gcd(x, y) = 1, the prime p cannot divide y.",
    "We conclude that f(x) = 2x + 1 for every real x. QED.",
] * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A model server run as its own process group on a fixed loopback port; `start()` returns once it is healthy."""

    def __init__(self, name: str, model_dir: Path, port: int, launch):
        self.name, self.model_dir, self.port, self._launch = name, Path(model_dir), port, launch
        self.url = f"http://127.0.0.1:{port}"
        self.pid: int | None = None

    def start(self) -> "ServerProcess":
        self.pid = self._launch(self)
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(300):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _launch_sglang(srv: ServerProcess) -> int:
    root = Path(__file__).resolve().parent.parent
    here = Path(os.environ.get("QEDNANO_SGLANG_CPU") or root.parent / "shared" / "sglang-cpu")
    env = {**os.environ, "SGLANG_LOG": str(srv.model_dir.parent / f"sglang-{srv.port}.log")}
    # --dtype float32: SGLang's "auto" would serve an fp32 checkpoint in fp16; the parity tests want fp32.
    # --sleep-on-idle: the scheduler otherwise busy-polls a whole core for the session, starving the other tests.
    r = subprocess.run([str(here / "serve.sh"), os.environ["QEDNANO_SGLANG_VENV"], str(srv.model_dir),
                        str(srv.port), "--dtype", "float32", "--sleep-on-idle"], capture_output=True, text=True, env=env, timeout=400)
    if r.returncode:
        raise RuntimeError(f"sglang serve.sh failed (rc {r.returncode}): {r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def _launch_native(srv: ServerProcess) -> int:
    import requests
    log = open(srv.model_dir.parent / f"serve-{srv.port}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "qednano_jax.serve", "--model-path", str(srv.model_dir),
                             "--port", str(srv.port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"qednano_jax.serve exited with {proc.returncode}; see {log.name}")
        try:
            if requests.get(f"{srv.url}/health_generate", timeout=30).status_code == 200:
                return proc.pid
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"qednano_jax.serve did not become healthy; see {log.name}")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from qednano_jax.config import ModelConfig
    from qednano_jax.data.tokenizer import load_tokenizer, train_tiny_tokenizer
    from qednano_jax.model import qwen3
    from qednano_jax.model.hf import save_hf

    root = tmp_path_factory.mktemp("tiny_qwen3")
    tok_dir = train_tiny_tokenizer(TINY_CORPUS, root / "tokenizer", vocab_size=512)
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.1,
                      bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    return save_hf(cfg, qwen3.init_params(cfg, jax.random.key(1234)), root / "model", tokenizer_dir=tok_dir)


@pytest.fixture(scope="session")
def sglang_server(tiny_hf_dir):
    if not os.environ.get("QEDNANO_SGLANG_VENV"):
        pytest.skip("QEDNANO_SGLANG_VENV is unset: no real SGLang server to test against (.ci/run sets it; see "
                    "../shared/sglang-cpu/README.md)")
    srv = ServerProcess("sglang", tiny_hf_dir, _free_port(), _launch_sglang).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def native_server(tiny_hf_dir):
    srv = ServerProcess("qednano_jax.serve", tiny_hf_dir, _free_port(), _launch_native).start()
    yield srv
    srv.stop()
