"""FineProofs-SFT rows -> Qwen3 thinking chat -> packed, loss-masked training rows (docs/recipe.md §2).

A row's `problem` is the user turn; the assistant turn is `<think>{reasoning_content}</think>{proof}` in the
Qwen3-Thinking-2507 format, whose generation prompt already opens `<think>` (docs/recipe.md §1). So an example is

    prompt_ids(problem)  +  tokens of  "{reasoning}\n</think>\n\n{proof}<|im_end|>"
    loss 0 ..............   loss 1 (the completion: what the model writes after the generation prompt)

Examples are tokenized once (counts of dropped / truncated / malformed rows are reported up front), then a grain
pipeline shuffles them by seed (reshuffled each epoch), repeats forever and packs them first-fit into fixed-length
rows with segment ids and per-segment positions. One pack round fills exactly one batch of rows, so the iterator
state after a batch (grain get_state/set_state, saved in every checkpoint) resumes at the next batch exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import grain
import numpy as np

from qednano_jax.data.rows import DataError, Rows, check_mapping, load_rows
from qednano_jax.data.tokenizer import THINK_CLOSE, prompt_ids

REQUIRED_FIELDS = ("problem", "reasoning_content", "proof")
IM_END = "<|im_end|>"
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "example_id")


@dataclasses.dataclass
class DataStats:
    """What happened to the rows; printed at start and saved in the run directory."""
    rows: int = 0
    used: int = 0
    skipped_malformed: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    tokens: int = 0
    assistant_tokens: int = 0


# ----------------------------------------------------------------------------------------------- rows

def check_row(rows: Rows, i: int) -> dict:
    """Row i as a FineProofs-SFT dict, or DataError naming its file and line (or row) and the field."""
    row = check_mapping(rows, i)
    for f in REQUIRED_FIELDS:
        v = row.get(f)
        if not isinstance(v, str):
            raise DataError(f"{rows.where(i)}: field {f!r} is {'missing' if v is None else type(v).__name__}, "
                            "expected a string")
        if f != "reasoning_content" and not v.strip():
            raise DataError(f"{rows.where(i)}: field {f!r} is empty")
    return row


# ----------------------------------------------------------------------------------------------- one example

def completion_text(reasoning: str, proof: str) -> str:
    """The assistant's text after the generation prompt (which already holds `<think>\\n`)."""
    return f"{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{proof}{IM_END}"


def encode_example(tokenizer, row: dict, prompt_template: str = "{problem}") -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], assistant mask [n]) of one row: 1 on every completion token, 0 on the prompt."""
    prompt = prompt_ids(tokenizer, prompt_template.format(problem=row["problem"]))
    completion = tokenizer(completion_text(row["reasoning_content"], row["proof"]),
                           add_special_tokens=False)["input_ids"]
    ids = np.asarray(prompt + completion, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
    return ids, mask


def build_examples(rows: Sequence[dict], tokenizer, *, seq_len: int, overlong: str = "truncate",
                   on_malformed: str = "error", prompt_template: str = "{problem}",
                   first_index: int = 0, index_step: int = 1) -> tuple[list[dict], DataStats]:
    """Tokenized training examples (next-token `tokens`/`targets`/`loss_mask`, each at most seq_len long).

    An example with more than seq_len + 1 ids is dropped or truncated (policy `overlong`); one whose kept part has
    no assistant token is dropped either way. Errors name each row's file and line (`Rows` from data/rows.py; plain
    lists: the 1-based row of the full dataset); `example_id` is the position in the full dataset
    (`first_index + i * index_step`, for per-host slices), plus 1.
    """
    if not isinstance(rows, Rows):
        rows = Rows(rows, [f"row {first_index + i * index_step + 1}" for i in range(len(rows))])
    stats = DataStats(rows=len(rows))
    out = []
    for i in range(len(rows)):
        index = first_index + i * index_step
        try:
            row = check_row(rows, i)
        except DataError:
            if on_malformed == "skip":
                stats.skipped_malformed += 1
                continue
            raise
        ids, mask = encode_example(tokenizer, row, prompt_template)
        if len(ids) > seq_len + 1:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not mask[1:].any():
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        n = len(ids) - 1
        out.append({"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:],
                    "example_id": np.full(n, index + 1, np.int32)})  # +1: 0 is the padding id
        stats.used += 1
        stats.tokens += n
        stats.assistant_tokens += int(mask[1:].sum())
    return out, stats


# ----------------------------------------------------------------------------------------------- pipeline

def packed_batches(examples: list[dict], *, seq_len: int, batch_rows: int, seed: int,
                   num_epochs: int | None = None) -> grain.IterDataset:
    """Shuffle (per-epoch reshuffle) -> repeat -> first-fit pack into `batch_rows` rows of `seq_len` -> batch.

    Yields numpy dicts with BATCH_KEYS, each [batch_rows, seq_len]; `example_id` is the 1-based dataset index of
    the example at each token (0 = padding), which the tests use to check that every example is seen once per epoch.
    """
    if not examples:
        raise DataError("no usable examples (every row was malformed or over-long)")
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(num_epochs).to_iter_dataset()
    lengths = {k: seq_len for k in ("tokens", "targets", "loss_mask", "example_id")}
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=batch_rows,
                                                    shuffle_bins=False)
    return ds.batch(batch_rows, drop_remainder=True).map(_rename)


def example_batches(examples: list[dict], *, seq_len: int, batch_rows: int, batch_examples: int, seed: int,
                    num_epochs: int | None = None) -> grain.IterDataset:
    """Shuffle (per-epoch reshuffle) -> repeat -> `batch_examples` examples per step, each step's examples packed
    first-fit (in order) into exactly `batch_rows` rows of `seq_len`: a fixed shape whatever their lengths. A step
    whose examples need more rows raises DataError naming it. Same keys as `packed_batches`."""
    if not examples:
        raise DataError("no usable examples (every row was malformed or over-long)")
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(batch_examples, drop_remainder=True, batch_fn=list)
    return ds.map(lambda exs: pack_rows(exs, seq_len, batch_rows)).to_iter_dataset()


def pack_rows(examples: list[dict], seq_len: int, rows: int) -> dict:
    """First-fit packing of `examples` into `rows` rows of `seq_len` (segment ids from 1 per row, positions from 0
    per segment, zeros as padding)."""
    out = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions",
                                                            "example_id")}
    out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    used, segs = [0] * rows, [0] * rows
    for ex in examples:
        n = len(ex["tokens"])
        r = next((i for i in range(rows) if used[i] + n <= seq_len), None)
        if r is None:
            raise DataError(f"train.batch_examples: {len(examples)} examples (example ids "
                            f"{sorted(int(e['example_id'][0]) - 1 for e in examples)}) do not fit "
                            f"train.batch_size = {rows} rows of data.seq_len {seq_len}: raise train.batch_size")
        a, segs[r] = used[r], segs[r] + 1
        for k in ("tokens", "targets", "loss_mask", "example_id"):
            out[k][r, a:a + n] = ex[k]
        out["segment_ids"][r, a:a + n] = segs[r]
        out["positions"][r, a:a + n] = np.arange(n)
        used[r] += n
    return out


def _rename(b: dict) -> dict:
    return {"tokens": b["tokens"], "targets": b["targets"], "loss_mask": b["loss_mask"],
            "segment_ids": b["tokens_segment_ids"], "positions": b["tokens_positions"],
            "example_id": b["example_id"]}


def sft_batches(cfg_data, *, batch_rows: int, tokenizer=None, process_index: int = 0,
                process_count: int = 1, batch_examples: int = 0, log=print) -> tuple[grain.IterDataset, DataStats]:
    """This host's packed-batch dataset for a DataConfig: rows i with i % process_count == process_index;
    `batch_examples` > 0: that many of this host's examples per step (`example_batches`)."""
    from qednano_jax.data.tokenizer import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg_data.tokenizer)
    rows = load_rows(cfg_data.path, name=cfg_data.name, split=cfg_data.split, key="data.path")
    if cfg_data.max_examples:
        rows = rows[: cfg_data.max_examples]
    mine = rows[process_index::process_count]
    examples, stats = build_examples(mine, tokenizer, seq_len=cfg_data.seq_len, overlong=cfg_data.overlong,
                                     on_malformed=cfg_data.on_malformed, prompt_template=cfg_data.prompt_template,
                                     first_index=process_index, index_step=process_count)
    log(f"data: {stats.rows} rows -> {stats.used} examples ({stats.tokens} tokens, {stats.assistant_tokens} "
        f"assistant); over-long (seq_len {cfg_data.seq_len}): {stats.truncated} truncated, "
        f"{stats.dropped_overlong} dropped; malformed skipped: {stats.skipped_malformed}")
    if not examples:
        raise DataError(f"data.path: {cfg_data.path} gave no usable example ({stats.rows} rows: "
                        f"{stats.skipped_malformed} malformed skipped, {stats.dropped_overlong} over-long dropped at "
                        f"data.seq_len {cfg_data.seq_len})")
    if batch_examples:
        return example_batches(examples, seq_len=cfg_data.seq_len, batch_rows=batch_rows,
                               batch_examples=batch_examples, seed=cfg_data.shuffle_seed), stats
    return packed_batches(examples, seq_len=cfg_data.seq_len, batch_rows=batch_rows,
                          seed=cfg_data.shuffle_seed), stats


def consumed_ids(batches: Iterable[dict]) -> list[int]:
    """Dataset indices (0-based) of the examples in `batches`, one entry per packed segment."""
    out = []
    for b in batches:
        ids, seg, pos = b["example_id"], b["segment_ids"], b["positions"]
        starts = (seg > 0) & (pos == 0)
        out.extend(int(x) - 1 for x in ids[starts])
    return out
