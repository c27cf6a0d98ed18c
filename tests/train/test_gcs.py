"""train.run_dir on gs://, against a real local GCS server (gcp-storage-emulator, in memory, on 127.0.0.1): orbax
checkpoints (through tensorstore's GCS driver), the logs and the HF export (through etils.epath -> gcsfs) land in the
bucket; a re-run resumes from the bucket's checkpoint with the saved state; the export loads back from gs:// with
load_hf and equals the trained params. (Resuming mid-run bit-exactly is test_sft_cli's job; here a second compile of
the train step would double the test's time.)"""
import json
import os
import socket

# Read when gcsfs is imported: gcsfs's default (extended) filesystem asks the gRPC storage-control API for each
# bucket's layout; the emulator speaks only the JSON API, so that call would hang on its port. The core filesystem
# is what the JSON API needs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import fsspec  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qednano_jax.config import load_config  # noqa: E402
from qednano_jax.data.tokenizer import train_tiny_tokenizer  # noqa: E402
from qednano_jax.model.hf import load_hf  # noqa: E402
from qednano_jax.train import sft  # noqa: E402
from sft_rows import WORDS, make_rows, write_jsonl  # noqa: E402

pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "qednano-test"


@pytest.fixture
def gcs(monkeypatch):
    """A fresh in-memory GCS emulator with bucket BUCKET; returns a gcsfs filesystem on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)       # gcsfs (etils.epath's gs:// backend)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)    # tensorstore, which orbax writes arrays with
    monkeypatch.setenv("GCE_METADATA_ROOT", "127.0.0.1:1")  # no credentials to look for: fail fast, go anonymous
    # one request at a time: the emulator answered concurrent conditional writes with a generation tensorstore
    # rejects ("Malformed StorageGeneration", 1 run in 3)
    monkeypatch.setenv("TENSORSTORE_GCS_REQUEST_CONCURRENCY", "1")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        yield fsspec.filesystem("gs")
    finally:
        fsspec.AbstractFileSystem.clear_instance_cache()
        server.stop()


def test_run_dir_on_gcs(gcs, tmp_path):
    rows = make_rows(8, min_words=5, max_words=15)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = train_tiny_tokenizer([" ".join(WORDS)] * 10 + [r["problem"] for r in rows], tmp_path / "tok", 320)
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    run_dir = f"gs://{BUCKET}/runs/sft"
    args = [f"data.path={data}", f"data.tokenizer={tok}", "data.seq_len=128", f"model.vocab_size={vocab}",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4", "model.num_kv_heads=2",
            "model.head_dim=8", "model.logprob_chunk=32", "train.batch_size=2", "train.micro_batches=1",
            "train.steps=2", "optim.lr=3e-3", "checkpoint.every=1", "checkpoint.keep=2", "train.progress=false",
            "mesh.shape={data: 2, fsdp: -1, tensor: 1}", f"train.run_dir={run_dir}"]

    ref = sft.run(load_config(None, args), log=lambda _: None)
    assert ref["start_step"] == 0 and ref["run_dir"] == run_dir and sorted(ref["losses"]) == [1, 2]
    root = f"{BUCKET}/runs/sft"
    for step in (1, 2):
        names = {p.rsplit("/", 1)[-1] for p in gcs.ls(f"{root}/checkpoints/{step}")}
        assert {"state", "data", "extra"} <= names, names
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.rsplit("/", 1)[-1] for p in gcs.ls(f"{root}/hf")}
    assert gcs.ls(f"{root}/tb") and gcs.exists(f"{root}/config.yaml") and gcs.exists(f"{root}/data_stats.json")

    # the same command again resumes from the bucket's step-2 checkpoint (nothing left to train): the restored
    # state is the saved one, and the logs it reopened keep their lines
    again = sft.run(load_config(None, args + ["train.export_hf=false", "train.allow_resume_changes=true"]),
                    log=lambda _: None)
    assert again["start_step"] == 2 and again["losses"] == {}
    for a, b in zip(jax.tree.leaves(again["state"].to_dict()), jax.tree.leaves(ref["state"].to_dict())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    metrics = [json.loads(line) for line in gcs.cat(f"{root}/metrics.jsonl").decode().splitlines()]
    assert {m["step"]: m["loss"] for m in metrics} == ref["losses"]
    consumed = gcs.cat(f"{root}/consumed.process_0.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in consumed] == [1, 2]

    # the export read back from the bucket (load_hf copies it down) equals the trained params
    cfg, params = load_hf(f"{run_dir}/hf")
    assert cfg.vocab_size == vocab and cfg.num_layers == ref["state"].params["layers"]["q_proj"].shape[0]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
