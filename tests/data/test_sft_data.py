"""FineProofs-SFT data: the exact loss mask, malformed / over-long policies, packing (each example once per epoch,
per-epoch reshuffle, resumable iterator state), per-host slices, file formats."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qednano_jax.config import DataConfig
from qednano_jax.data import sft
from qednano_jax.data.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from sft_rows import make_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen3")


def test_exact_loss_mask_on_hand_built_example(tok):
    row = {"problem": "Prove 1+1=2.", "reasoning_content": "\nTrivial by counting.\n", "proof": "Count: 1, 2."}
    ids, mask = sft.encode_example(tok, row)
    prompt = "<|im_start|>user\nProve 1+1=2.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    completion = "Trivial by counting.\n</think>\n\nCount: 1, 2.<|im_end|>"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == p_ids + c_ids
    assert mask.tolist() == [0] * len(p_ids) + [1] * len(c_ids)
    # the masked part is exactly the assistant's text, ending with </think>, the proof and <|im_end|>
    assert tok.decode(ids[mask == 1]) == completion
    assert tok.convert_ids_to_tokens(int(ids[mask == 1][-1])) == "<|im_end|>"
    # next-token view: target t is ids[t+1], counted iff ids[t+1] is an assistant token
    ex, _ = sft.build_examples([row], tok, seq_len=256)
    assert ex[0]["targets"].tolist() == ids[1:].tolist()
    assert ex[0]["loss_mask"].tolist() == mask[1:].tolist()
    assert ex[0]["loss_mask"].sum() == len(c_ids)


def test_mask_agrees_with_the_chat_template(tmp_path):
    from qednano_jax.data.tokenizer import train_tiny_tokenizer
    tiny = load_tokenizer(train_tiny_tokenizer(["prove that n is even, hence odd"] * 20, tmp_path / "tok", 300))
    row = {"problem": "Show n is even.", "reasoning_content": "n = 2k.", "proof": "Hence even."}
    ids, mask = sft.encode_example(tiny, row)
    full = tiny.apply_chat_template([{"role": "user", "content": row["problem"]},
                                     {"role": "assistant", "content": row["proof"],
                                      "reasoning_content": row["reasoning_content"]}], tokenize=False)
    assert full == tiny.decode(ids) + "\n"  # the template's trailing newline after <|im_end|> is not trained


@pytest.mark.parametrize("bad,field", [({"problem": None}, "problem"), ({"proof": ""}, "proof"),
                                       ({"reasoning_content": 3}, "reasoning_content")])
def test_malformed_row_error_names_row_and_field(tok, bad, field):
    rows = make_rows(4)
    rows[2] = {**rows[2], **bad}
    with pytest.raises(sft.DataError, match=rf"row 3: field '{field}'"):
        sft.build_examples(rows, tok, seq_len=512)
    ex, stats = sft.build_examples(rows, tok, seq_len=512, on_malformed="skip")
    assert stats.skipped_malformed == 1 and stats.used == 3 and len(ex) == 3
    assert sorted(int(e["example_id"][0]) - 1 for e in ex) == [0, 1, 3]


def test_overlong_policies_counted(tok):
    rows = make_rows(8, min_words=10, max_words=15)
    for r in rows[6:]:
        r["reasoning_content"] = "so the sum is even " * 60
    ex, st = sft.build_examples(rows, tok, seq_len=150, overlong="drop")
    assert st.dropped_overlong == 2 and st.truncated == 0 and st.used == 6
    ex, st = sft.build_examples(rows, tok, seq_len=150, overlong="truncate")
    assert st.truncated == 2 and st.used == 8
    assert max(len(e["tokens"]) for e in ex) == 150
    # a prompt alone longer than seq_len leaves nothing to learn: dropped even under `truncate`
    ex, st = sft.build_examples(rows[:1], tok, seq_len=10, overlong="truncate")
    assert st.dropped_overlong == 1 and st.used == 0


def _examples(tok, n=20):
    return sft.build_examples(make_rows(n), tok, seq_len=128)[0]


def test_packing_each_example_once_per_epoch_and_reshuffled(tok):
    examples = _examples(tok)
    batches = list(sft.packed_batches(examples, seq_len=128, batch_rows=2, seed=7, num_epochs=3))
    for b in batches:
        assert set(b) == set(sft.BATCH_KEYS) and b["tokens"].shape == (2, 128)
        seg, pos = b["segment_ids"], b["positions"]
        for r in range(2):  # positions restart at 0 in every segment; padding has segment 0 and no loss
            for s in set(seg[r][seg[r] > 0].tolist()):
                assert pos[r][seg[r] == s].tolist() == list(range((seg[r] == s).sum()))
        assert not b["loss_mask"][seg == 0].any()
    ids = sft.consumed_ids(batches)
    assert sorted(ids) == sorted(list(range(20)) * 3)  # all 3 epochs, nothing lost or doubled
    # within the stream, epoch e is a permutation of all examples, different per epoch
    order = _stream_order(examples, seed=7, epochs=3)
    epochs = [order[i * 20:(i + 1) * 20] for i in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def _stream_order(examples, seed, epochs):
    import grain
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(epochs)
    return [int(ds[i]["example_id"][0]) - 1 for i in range(len(ds))]


def test_deterministic_and_resumable_iterator(tok):
    examples = _examples(tok)
    ds = sft.packed_batches(examples, seq_len=128, batch_rows=2, seed=3)
    ref = [b for _, b in zip(range(12), iter(ds))]
    it = iter(sft.packed_batches(examples, seq_len=128, batch_rows=2, seed=3))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON (saved in every checkpoint)
    fresh = iter(sft.packed_batches(examples, seq_len=128, batch_rows=2, seed=3))
    fresh.set_state(state)
    for want in ref[5:]:
        got = next(fresh)
        for k in sft.BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    other = next(iter(sft.packed_batches(examples, seq_len=128, batch_rows=2, seed=4)))
    assert not np.array_equal(other["example_id"], ref[0]["example_id"])


def test_per_host_slices_and_file_formats(tmp_path, tok):
    rows = make_rows(9)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    assert sft.load_rows(str(tmp_path / "r.parquet")) == sft.load_rows(path)
    seen = []
    for host in range(3):
        ds, stats = sft.sft_batches(DataConfig(path=path, seq_len=256), batch_rows=1, tokenizer=tok,
                                    process_index=host, process_count=3, log=lambda _: None)
        assert stats.used == 3
        it = iter(ds)
        seen += sft.consumed_ids([next(it) for _ in range(6)])[:3]
    assert sorted(seen) == list(range(9))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(sft.DataError, match="unsupported data file"):
        sft.load_rows(str(tmp_path / "x.txt"))


def _example(i: int, n: int) -> dict:
    return {"tokens": np.arange(n, dtype=np.int32) + 100 * i, "targets": np.arange(n, dtype=np.int32) + 1,
            "loss_mask": np.ones(n, np.float32), "example_id": np.full(n, i + 1, np.int32)}


def test_a_batch_of_examples_packs_into_a_fixed_row_count():
    """train.batch_examples: 5 examples per step into 3 rows of 8 tokens, first fit in the shuffled order (the layout
    rebuilt by hand from grain's permutation); each example once per epoch; a step that needs a 4th row is refused."""
    import grain
    lengths = [5, 3, 6, 2, 4, 7, 1, 3, 8, 2]
    examples = [_example(i, n) for i, n in enumerate(lengths)]
    batches = list(sft.example_batches(examples, seq_len=8, batch_rows=3, batch_examples=5, seed=0, num_epochs=1))
    assert len(batches) == 2 and all(b["tokens"].shape == (3, 8) for b in batches)
    assert sorted(sft.consumed_ids(batches)) == list(range(10))
    order = list(grain.MapDataset.source(list(range(10))).shuffle(seed=0))
    for step, b in enumerate(batches):
        used, want_id, want_seg, want_pos = [0, 0, 0], *(np.zeros((3, 8), np.int32) for _ in range(3))
        for i in order[5 * step:5 * step + 5]:
            r = next(r for r in range(3) if used[r] + lengths[i] <= 8)
            want_id[r, used[r]:used[r] + lengths[i]] = i + 1
            want_seg[r, used[r]:used[r] + lengths[i]] = want_seg[r].max() + 1
            want_pos[r, used[r]:used[r] + lengths[i]] = np.arange(lengths[i])
            used[r] += lengths[i]
        np.testing.assert_array_equal(b["example_id"], want_id)
        np.testing.assert_array_equal(b["segment_ids"], want_seg)
        np.testing.assert_array_equal(b["positions"], want_pos)
        for i in order[5 * step:5 * step + 5]:
            np.testing.assert_array_equal(b["tokens"][want_id == i + 1], examples[i]["tokens"])
    with pytest.raises(sft.DataError, match=r"train.batch_examples: 5 examples .* do not fit train.batch_size = 1 "):
        list(sft.example_batches(examples, seq_len=8, batch_rows=1, batch_examples=5, seed=0, num_epochs=1))
