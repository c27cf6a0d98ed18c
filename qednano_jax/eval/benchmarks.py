"""Proof benchmarks in their published formats (docs/recipe.md §5): IMO-ProofBench, ProofBench, IMO-AnswerBench.

Rows come through `datasets` from a hub id, a local file (.jsonl/.json/.csv/.parquet) or a local dataset folder;
`source: sample` reads the rows shipped in `qednano_jax/samples/<format>.jsonl`. One table per format maps our field
names to the dataset's columns; a missing required column is an error naming the column and the source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from qednano_jax.config import UserError
from qednano_jax.eval import prompts

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"


class BenchmarkError(UserError):
    """A benchmark source, column or row is unusable; the message names the file, column or row."""


def _proofbench_group(problem_id: str) -> str:
    """ProofBench has no category column; the paper reports the 2024/2025 contests apart from the rest (the year
    is in the id, e.g. USAMO-2025-P1)."""
    return "2024/2025" if ("2024" in problem_id or "2025" in problem_id) else "Others"


def _imo_proofbench_level(problem_id: str) -> str:
    """IMO-ProofBench's level from its id (PB-Basic-001 / PB-Advanced-001) when the `level` column is absent."""
    return "Basic" if "Basic" in problem_id else "Advanced"


@dataclasses.dataclass(frozen=True)
class Format:
    """How one benchmark's rows look and how they are prompted and graded."""
    name: str
    hub_id: str                              # the id the paper's code loads (docs/recipe.md §5)
    columns: dict[str, str]                  # our field -> dataset column
    required: tuple[str, ...]                # fields that must exist as columns
    generation_prompt: str                   # user message template, `{problem}`
    grading_prompt: str                      # grader template: {problem} {solution} {guidelines} {answer} {proof}
    grading_fields: tuple[str, ...]          # the fields a replacement template (eval.grading_prompt_file) must use
    kind: str                                # "proof" (0..7 points) or "answer" (0/1)
    category_from_id: Callable[[str], str] | None = None  # used when the category column is absent

    @property
    def max_score(self) -> int:
        return 7 if self.kind == "proof" else 1


# Column names: qednano_jax/samples/README.md says where each one was verified.
FORMATS = {
    "imo_proofbench": Format(
        name="imo_proofbench", hub_id="lm-provers/IMOProofBench",
        columns={"id": "question_id", "problem": "problem", "solution": "solution",
                 "guidelines": "grading_guidelines", "category": "level"},
        required=("id", "problem", "solution", "guidelines"),
        generation_prompt=prompts.PROOF_GENERATION, grading_prompt=prompts.IMO_PROOFBENCH_GRADING, kind="proof",
        grading_fields=prompts.PROOF_GRADING_FIELDS,
        category_from_id=_imo_proofbench_level),
    "proofbench": Format(
        name="proofbench", hub_id="lm-provers/ProofBench",
        columns={"id": "problem_id", "problem": "problem", "solution": "solution",
                 "guidelines": "grading_scheme", "category": "category"},
        required=("id", "problem", "guidelines"),
        generation_prompt=prompts.PROOF_GENERATION, grading_prompt=prompts.PROOFBENCH_GRADING, kind="proof",
        grading_fields=prompts.PROOF_GRADING_FIELDS,
        category_from_id=_proofbench_group),
    "imo_answerbench": Format(
        name="imo_answerbench", hub_id="lm-provers/IMOBench-FinalAnswer",
        columns={"id": "question_id", "problem": "problem", "answer": "answer", "category": "category"},
        required=("id", "problem", "answer"),
        generation_prompt=prompts.ANSWER_GENERATION, grading_prompt=prompts.ANSWERBENCH_JUDGING, kind="answer",
        grading_fields=prompts.ANSWER_JUDGING_FIELDS),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark row in our field names; optional fields are "" when the dataset lacks them."""
    id: str
    problem: str
    solution: str = ""
    guidelines: str = ""
    answer: str = ""
    category: str = ""


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise BenchmarkError(f"eval.benchmark: unknown benchmark format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def _load_rows(source: str, split: str):
    """Rows (data/rows.py: every error names the file and line) of a file, folder or hub id; a saved `datasets`
    folder (dataset_info.json + .arrow files) is read with load_from_disk."""
    from qednano_jax.data.rows import Rows, check_mapping, from_dataset, load_rows

    path = Path(source)
    if path.is_file() and path.suffix == ".csv":
        import datasets
        rows = from_dataset(datasets.load_dataset("csv", data_files=str(path), split="train"), source)
    elif path.is_dir() and any(path.glob("*.arrow")) and (path / "dataset_info.json").is_file():
        import datasets
        rows = from_dataset(datasets.load_from_disk(str(path)), source)
    else:
        rows = load_rows(source, split=split, key="eval.source")
    return Rows([check_mapping(rows, i) for i in range(len(rows))], rows.labels)


def load_benchmark(fmt: Format | str, source: str = "sample", split: str = "train", limit: int = 0,
                   columns: dict[str, str] | None = None) -> list[Problem]:
    """Rows of benchmark `fmt` from `source` ("sample", "hub" = the paper's hub id, a path or another hub id).

    `columns` overrides entries of the format's column table (e.g. {"category": "Category"}).
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if source == "sample":
        source = str(SAMPLES_DIR / f"{fmt.name}.jsonl")
    elif source == "hub":
        source = fmt.hub_id
    table = {**fmt.columns, **(columns or {})}
    unknown = sorted(set(columns or {}) - {f.name for f in dataclasses.fields(Problem)})
    if unknown:
        raise BenchmarkError(f"eval.columns: unknown field {unknown[0]!r} (known: id, problem, solution, guidelines, "
                         "answer, category)")
    ds = _load_rows(source, split)
    names = {k for row in ds for k in row}
    for f in fmt.required:
        if table[f] not in names:
            raise BenchmarkError(f"{source}: benchmark {fmt.name} needs column {table[f]!r} (for {f}); the rows have "
                             f"columns {sorted(names)}. Map it with eval.columns.{f}=<column>")
    if limit:
        ds = ds[:limit]
    problems, seen = [], set()
    for i, row in enumerate(ds):
        vals = {f: ("" if row.get(col) is None else str(row[col])) for f, col in table.items() if col in names}
        if table["category"] not in names and fmt.category_from_id:
            vals["category"] = fmt.category_from_id(vals["id"])
        if not vals["problem"].strip():
            raise BenchmarkError(f"{ds.where(i)}: empty {table['problem']!r}")
        if vals["id"] in seen:
            raise BenchmarkError(f"{ds.where(i)}: duplicate {table['id']!r} {vals['id']!r} (ids key the results)")
        seen.add(vals["id"])
        problems.append(Problem(**vals))
    if not problems:
        raise BenchmarkError(f"{source}: no rows")
    return problems


def generation_prompt(fmt: Format, problem: Problem) -> str:
    """The user message for one problem (docs/recipe.md §5)."""
    return fmt.generation_prompt.format(problem=problem.problem)


def grading_prompt(fmt: Format, problem: Problem, proof: str) -> str:
    """The grader's user message for one proof (or AnswerBench response)."""
    return fmt.grading_prompt.format(problem=problem.problem, solution=problem.solution or "(not provided)",
                                     guidelines=problem.guidelines or "(not provided)", answer=problem.answer,
                                     proof=proof)
