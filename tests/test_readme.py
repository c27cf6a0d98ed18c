"""The README's demo blocks (each ```bash block right after a `<!-- readme-test -->` line), run in order and as
written with bash, in a copy of what a fresh clone holds (the tracked and unignored files; `.venv` points at the
running interpreter's environment). The blocks build on each other (the eval and data-generation demos read the
SFT demo's export), so they run in one directory. Then the figures the README promises are checked: the demo's
RL reward rises and the eval of its output beats the eval of the SFT export it started from."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^<!-- readme-test -->\n```bash\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def test_the_tagged_blocks_are_the_demos():
    blocks = readme_blocks()
    assert len(blocks) >= 4, "README lost its <!-- readme-test --> blocks"
    text = "\n".join(blocks)
    for cmd in ("qednano_jax.train configs/demo/sft.yaml", "qednano_jax.train configs/demo/rl.yaml",
                "qednano_jax.eval configs/demo/eval.yaml", "qednano_jax.train configs/rl-tiny.yaml",
                "qednano_jax.train configs/rc-tiny.yaml", "qednano_jax.data.distill configs/datagen/demo.yaml"):
        assert cmd in text, cmd


@pytest.mark.slow
def test_readme_demo_commands_run_as_written(tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_PLATFORMS"))}
    env["PATH"] = f"{repo / '.venv' / 'bin'}:{env['PATH']}"
    for i, block in enumerate(readme_blocks()):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=1200)
        assert r.returncode == 0, f"README block {i + 1} failed:\n{block}\n--- stdout\n{r.stdout[-3000:]}\n" \
                                  f"--- stderr\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    runs = repo / "runs"

    def metrics(run: str) -> list[dict]:
        return [json.loads(x) for x in (runs / run / "metrics.jsonl").read_text().splitlines()]

    # the SFT demo (the set-up command): 40 steps, the loss down from about ln(151936) = 11.9 by more than 3.5
    sft_tiny = [m["loss"] for m in metrics("sft-tiny")]
    assert len(sft_tiny) == 40 and sft_tiny[0] > 11.5 and sum(sft_tiny[-3:]) / 3 < sft_tiny[0] - 3.5, sft_tiny
    # the RL and RC demos: each step once, rewards in [0, 1], no grader failure, a checkpoint at the end
    for run, steps in (("rl-tiny", 4), ("rc-tiny", 3)):
        ms = metrics(run)
        assert [m["step"] for m in ms] == list(range(1, steps + 1)), run
        assert all(0 <= m["reward_mean"] <= 1 and m["grader_total_failures"] == 0 for m in ms), run
        assert (runs / run / "checkpoints" / str(steps)).is_dir(), run
    # the answer demo: the SFT export answers in the format and gets at least a quarter right; RL raises the reward
    # (README: 0.40 over the first 3 steps, 0.69 over the last 5) and the eval of its export beats the SFT one's
    # (README: 45.8% -> 72.9%)
    sft = json.loads((runs / "demo-eval-sft" / "summary.json").read_text())[0]
    rl = json.loads((runs / "demo-eval-rl" / "summary.json").read_text())[0]
    assert sft["mean"] >= 25 and rl["mean"] >= sft["mean"] + 10, (sft, rl)
    rewards = [m["reward_mean"] for m in metrics("demo-rl")]
    assert len(rewards) == 25 and sum(rewards[-5:]) / 5 >= sum(rewards[:3]) / 3 + 0.15, rewards
    assert (runs / "demo-compare" / "scores.png").is_file()
    # data generation against the embedded server: the distill demo exports rows, rubrics writes its RL rows
    assert len((runs / "datagen-tiny" / "distill" / "fineproofs_sft.jsonl").read_text().splitlines()) >= 1
    assert (runs / "datagen-tiny" / "rubrics" / "fineproofs_rl.jsonl").is_file()
