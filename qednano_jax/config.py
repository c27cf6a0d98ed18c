"""Typed, documented, validated configs (docs/design.md principle 7).

A config is a tree of frozen dataclasses. Every field is declared with `field(default, help, ...)`: a type (the
annotation), a one-line description and optional bounds/choices. YAML files are loaded as

    base file(s) (the `base:` key, paths relative to the file)  ->  the file itself  ->  key=value overrides

and then converted with `from_dict`, which rejects unknown keys and bad values with an error naming the field
(e.g. `model.num_layers: expected int >= 1, got 0`). A section value that is a string ending in `.yaml`
(e.g. `model: model/qwen3-4b-thinking-2507.yaml`) is loaded from that file, relative to the including file or to
the repository's `configs/` folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class UserError(ValueError):
    """A mistake the user can fix (a config key or value, a data file, a checkpoint or run dir): every CLI prints
    its message as one line and exits 2 (qednano_jax/cli.py). The message names the key, file or line."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose with its last checkpoint intact (a non-finite step, a grader failing most of a
    batch, rollout servers that never became healthy): every CLI prints it as one line and exits 1."""


class ConfigError(UserError):
    """A config value is missing, unknown or out of bounds; the message names the field."""


def field(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          template: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a description and optional bounds (checked by `from_dict` and `validate`);
    `template`: the field is a str.format template that must use exactly these names (literal braces doubled)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "template": template}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen3 decoder hyper-parameters (docs/recipe.md §1). The defaults are the tiny CPU demo model, which uses the real
    Qwen3 vocabulary (151,936 rows) so that the real tokenizer drives it."""
    vocab_size: int = field(151936, "rows of the embedding / LM head", ge=1)
    hidden_size: int = field(64, "model width (embed axis)", ge=1)
    intermediate_size: int = field(128, "SwiGLU MLP width (mlp axis)", ge=1)
    num_layers: int = field(2, "decoder layers (scanned: compiled once)", ge=1)
    num_heads: int = field(4, "query heads", ge=1)
    num_kv_heads: int = field(2, "key/value heads (GQA); must divide num_heads", ge=1)
    head_dim: int = field(16, "per-head width; may differ from hidden_size / num_heads", ge=2)
    rope_theta: float = field(1_000_000.0, "RoPE base frequency (5e6 for the 2507 models)", gt=0)
    rms_norm_eps: float = field(1e-6, "RMSNorm epsilon", gt=0)
    tie_word_embeddings: bool = field(True, "LM head shares the embedding matrix")
    max_position_embeddings: int = field(4096, "longest position the model is meant for", ge=1)
    bos_token_id: int = field(151643, "BOS id written to the HF config")
    eos_token_id: int = field(151645, "EOS id (<|im_end|>) written to the HF config")
    initializer_range: float = field(0.02, "std of the normal init of random weights", gt=0)
    dtype: str = field("float32", "compute dtype of matmuls and activations",
                       choices=("float32", "bfloat16", "float16"))
    param_dtype: str = field("float32", "dtype the parameters are stored in",
                             choices=("float32", "bfloat16", "float16"))
    remat_policy: str = field("none", "activation checkpointing of each scanned layer (see model.qwen3.REMAT_POLICIES)",
                              choices=("none", "full", "dots", "dots_no_batch", "qkv_proj", "minimal"))
    logprob_chunk: int = field(1024, "sequence chunk for logprobs/loss: [B, chunk, vocab] logits exist at once", ge=1)
    attention_chunk: int = field(0, "attention block along both lengths (0 = the implementation's default: 512 "
                                 "for flash/splash, one block for blocked/rows); a row it does not divide gets a "
                                 "ragged last block; splash needs a multiple of 128", ge=0)
    attention_impl: str = field("auto", "full-forward attention (model/attention.py): 'flash' (portable JAX, "
                                "custom VJP, memory linear in the row length), 'splash' (the Pallas TPU kernel), "
                                "'blocked' (query blocks; backward memory grows with length^2: short rows only), "
                                "'rows' (blocked one row and KV head at a time: single-device CPU only), 'cudnn' "
                                "(cuDNN's fused kernel, NVIDIA GPUs only; packed rows by a length^2 boolean mask), "
                                "'auto' (splash on TPU, flash elsewhere and under sequence parallelism)",
                                choices=("auto", "flash", "splash", "cudnn", "blocked", "rows"))

    def __post_init__(self):
        validate(self)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.attention_impl == "splash" and self.attention_chunk % 128:
            raise ConfigError(f"model.attention_chunk: splash attention needs a multiple of 128 (or 0 = 512), got "
                              f"{self.attention_chunk}")


# ----------------------------------------------------------------------------------------------- sections: sft
# (mesh, data, optim, train, checkpoint and the top-level Config: owned by the SFT stage)

SAMPLE_SFT_DATA = str(Path(__file__).resolve().parent / "samples" / "fineproofs_sft.jsonl")


def _default_rules() -> dict:
    from qednano_jax.sharding import RULE_SETS
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in RULE_SETS["fsdp"].items()}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and logical-axis rules (docs/design.md principle 1). configs/mesh/{dp,fsdp,tp,fsdp_tp,fsdp_sp,
    fsdp_tp_sp}.yaml hold the strategies; include one with `mesh: mesh/fsdp.yaml`. A rule for `act_length` turns
    on sequence parallelism (model/attention.py): data.seq_len must then be a multiple of 2 x its mesh size."""
    shape: dict[str, int] = field(help="mesh axis sizes {data, fsdp, tensor[, sequence]}; one may be -1 (= remaining "
                                  "devices)",
                                  default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    rules: dict[str, Any] = field(help="logical axis -> mesh axis / list of axes / null (replicated)",
                                  default_factory=_default_rules)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """FineProofs-SFT rows -> Qwen3 thinking chat -> packed rows (docs/recipe.md §2). The defaults read the bundled
    sample file."""
    path: str = field(SAMPLE_SFT_DATA, "local .jsonl/.json/.parquet file or folder, or a hub dataset id "
                      "(e.g. lm-provers/FineProofs-SFT)")
    name: str | None = field(None, "hub dataset config (FineProofs-SFT: `default` = 4,281 unique problems, `all`)")
    split: str = field("train", "dataset split")
    tokenizer: str = field("qwen3", "`qwen3` (bundled real tokenizer) or a local HF tokenizer dir")
    prompt_template: str = field("{problem}", "user turn; {problem} is replaced by the row's problem (docs/recipe.md §2: "
                                 "the teacher saw the raw problem)", template=("problem",))
    seq_len: int = field(1024, "tokens per packed row (docs/recipe.md §2 recipe: 45,056)", ge=8)
    overlong: str = field("truncate", "an example longer than seq_len: `drop` it or `truncate` it (counted either "
                          "way)", choices=("drop", "truncate"))
    on_malformed: str = field("error", "a row with a missing/empty/non-string field: `error` (naming row and field) "
                              "or `skip` (counted)", choices=("error", "skip"))
    max_examples: int = field(0, "use only the first N rows (0 = all)", ge=0)
    shuffle_seed: int = field(0, "seed of the per-epoch shuffle (each epoch reshuffled)", ge=0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with grad-norm clipping and a warmup + cosine (SFT) or constant (RL: 1e-6, docs/recipe.md §3) schedule."""
    lr: float = field(5e-3, "peak learning rate", gt=0)
    schedule: str = field("cosine", "learning-rate shape after warmup", choices=("cosine", "constant"))
    warmup_ratio: float = field(0.1, "fraction of train.steps spent in linear warmup from 0", ge=0, le=1)
    final_lr_ratio: float = field(0.0, "cosine: lr at the last step as a fraction of the peak", ge=0, le=1)
    b1: float = field(0.9, "AdamW beta1", ge=0, le=1)
    b2: float = field(0.999, "AdamW beta2", ge=0, le=1)
    eps: float = field(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = field(0.0, "decoupled weight decay (on the norm weights only with decay_norms)", ge=0)
    decay_norms: bool = field(False, "apply weight_decay to the RMSNorm weights too (the released RL stack does: its "
                              "no-decay filter matches no Qwen3 name, docs/recipe.md §3 'Loss / optimizer')")
    clip_norm: float = field(1.0, "clip the global gradient norm to this (0 = no clipping)", ge=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batch, accumulation, initialisation, run directory."""
    steps: int = field(40, "optimizer steps", ge=1)
    batch_size: int = field(1, "packed rows per optimizer step (global, all hosts); with batch_examples, the fixed "
                            "row count those examples are packed into (one compiled step)", ge=1)
    batch_examples: int = field(0, "examples per optimizer step (global), packed first-fit into batch_size rows (an "
                                "error names the step when they need more); 0 = as many examples as fill batch_size "
                                "rows (the paper's SFT batch: 32 examples, docs/recipe.md §2)", ge=0)
    micro_batches: int = field(1, "gradient accumulation: the batch is split into this many micro-batches "
                               "(lax.scan); must divide batch_size", ge=1)
    init: str = field("random", "`random` (seeded init) or a local HF checkpoint dir to fine-tune")
    seed: int = field(0, "seed of the random init and of the train-state RNG", ge=0)
    run_dir: str = field("runs/sft-tiny", "checkpoints, config.yaml, metrics.jsonl, TensorBoard events, exports")
    log_every: int = field(1, "write metrics every N steps", ge=1)
    export_hf: bool = field(True, "export the final params as an HF checkpoint to run_dir/hf")
    peak_flops: float = field(0.0, "per-device peak FLOP/s for the MFU estimate (0 = report none)", ge=0)
    progress: bool = field(True, "show a tqdm progress bar")
    allow_resume_changes: bool = field(False, "resume a run dir whose saved config differs in keys that are safe to "
                                       "change (train.steps, logging, checkpoint cadence, service URLs: "
                                       "train/driver.py RESUME_SAFE); any other change is always refused")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """orbax checkpoints in run_dir/checkpoints (docs/design.md principle 4)."""
    every: int = field(20, "save every N steps (and at the last step)", ge=1)
    keep: int = field(3, "newest checkpoints kept", ge=1)
    async_save: bool = field(True, "write checkpoints in the background while training continues")
    export_hf_each: bool = field(False, "also export each checkpoint as an HF checkpoint (run_dir/hf-step-N)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. `stage` picks the loop (`python -m qednano_jax.train CONFIG`); the defaults are the tiny CPU
    SFT demo on the bundled sample data."""
    stage: str = field("sft", "which loop runs this config", choices=("sft", "rl", "rc"))
    model: ModelConfig = field(help="the Qwen3 decoder (ignored for the architecture when train.init is an HF dir)",
                               default_factory=ModelConfig)
    mesh: MeshConfig = field(help="device mesh and sharding rules", default_factory=MeshConfig)
    data: DataConfig = field(help="SFT data", default_factory=DataConfig)
    optim: OptimConfig = field(help="optimizer", default_factory=OptimConfig)
    train: TrainConfig = field(help="training loop", default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(help="checkpointing", default_factory=CheckpointConfig)
    rollout: "RolloutConfig" = field(help="rl: where rollouts come from (native engine or SGLang servers)",
                                     default_factory=lambda: RolloutConfig())
    grader: "GraderConfig" = field(help="rl: the rubric grader", default_factory=lambda: GraderConfig())
    rl: "RLConfig" = field(help="rl: prompts per step, group size, sampling, lag, loss",
                           default_factory=lambda: RLConfig())
    rc: "RCConfig" = field(help="rc: reasoning-cache cycles, states sampled, summarizer",
                           default_factory=lambda: RCConfig())
    plan: "PlanConfig" = field(help="sharding planner (`python -m qednano_jax.plan CONFIG`): device counts, TPU, "
                               "strategies", default_factory=lambda: PlanConfig())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "Config":
    """YAML file (or the embedded defaults when None) + `key=value` overrides -> validated Config."""
    cfg = load_as(Config, path, overrides)
    check_stage_keys(cfg)
    return cfg


# Keys (or whole sections) a stage never reads. A value other than the default there would be silently ignored, so
# it is refused, naming the key; a default value is harmless (a saved run_dir/config.yaml lists every key).
SFT_ONLY = ("train.batch_size", "train.batch_examples", "train.micro_batches", "train.peak_flops", "data.overlong", "checkpoint.export_hf_each")
NOT_READ = {"sft": ("rollout", "grader", "rl", "rc"), "rl": SFT_ONLY + ("rc",), "rc": SFT_ONLY}


def check_stage_keys(cfg: "Config") -> None:
    """ConfigError naming the first key of `NOT_READ[cfg.stage]` set to a non-default value."""
    base = Config()
    for key in NOT_READ.get(cfg.stage, ()):
        section, _, name = key.partition(".")
        mine, ref = to_dict(getattr(cfg, section)), to_dict(getattr(base, section))
        if name:
            mine, ref = {name: mine[name]}, {name: ref[name]}
        for leaf in _differing(mine, ref, section):
            raise ConfigError(f"{leaf}: stage {cfg.stage} does not read this key (set to {_leaf(cfg, leaf)!r}); "
                              f"remove it from the config (its stages: {_stages_of(key)})")


def _differing(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in a for k in _differing(a[key], b.get(key), f"{where}.{key}")]
    return [] if a == b else [where]


def _leaf(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return to_dict(cfg)


def _stages_of(key: str) -> str:
    return ", ".join(s for s in ("sft", "rl", "rc") if key not in NOT_READ[s])


# ----------------------------------------------------------------------------------------------- sections: rollout

@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Where rollouts come from (docs/design.md principle 3; qednano_jax/rollout/). `native` samples in this process;
    `sglang` talks HTTP to SGLang servers or to `python -m qednano_jax.serve` (same API)."""
    backend: str = field("native", "embedded JAX engine, or an HTTP client of SGLang-compatible servers",
                         choices=("native", "sglang"))
    urls: tuple[str, ...] = field(default_factory=lambda: ("http://127.0.0.1:30000",),
                                  help="sglang: server base URLs (data-parallel generators, least-in-flight balanced)")
    concurrency: int = field(64, "sglang: /generate requests in flight at once (all servers together)", ge=1)
    request_timeout: float = field(3600.0, "sglang: seconds before one /generate request is abandoned and retried",
                                   gt=0)
    retries: int = field(3, "sglang: extra attempts of a request after a transport error, timeout or HTTP 5xx", ge=0)
    backoff: tuple[float, ...] = field(default_factory=lambda: (1.0, 2.0, 4.0),
                                       help="sglang: seconds to wait before retry i (the last value repeats)")
    health_timeout: float = field(600.0, "sglang: seconds to wait for some server's /health_generate before a "
                                  "call fails with an error naming the URLs", gt=0)
    refit_dir: str = field("runs/refit", "sglang: directory for exported weights (must be readable by the servers); "
                           "each refit writes refit_dir/weights-<version> atomically")
    keep_last: int = field(2, "sglang: exported weight directories kept (older ones are deleted; from 2 on, the "
                           "oldest one's files are overwritten in place by the next export)", ge=1)
    export_dtype: str = field("params", "sglang: dtype of the refit export: the servers' dtype (`bfloat16` for the "
                              "4B configs: half the bytes of fp32 params), or `params` (the params' own dtype)",
                              choices=("params", "bfloat16", "float16", "float32"))
    max_batch: int = field(64, "native: rows decoded together (larger requests run in chunks)", ge=1)
    seed: int = field(0, "native: seed of the per-call seeds drawn when SamplingParams.seed is None", ge=0)


# ----------------------------------------------------------------------------------------------- sections: reward, rl

@dataclasses.dataclass(frozen=True)
class GraderConfig:
    """The rubric grader (docs/recipe.md §3 "Reward"); defaults are the paper's GPT-OSS-20B grader. The API key is read from
    the environment variable named by `api_key_env` and is never logged or saved."""
    backend: str = field("openai", "where grades come from: an OpenAI-compatible endpoint, a judge checkpoint run "
                         "in-process on the native engine, or `answer`: no model, a rule-based final-answer check "
                         "(math-verify) against each row's `answer` field (final-answer problems, score 7 or 0)",
                         choices=("openai", "native", "answer"))
    base_url: str = field("http://127.0.0.1:8000/v1", "OpenAI-compatible endpoint base URL (ending in /v1)")
    model: str = field("openai/gpt-oss-20b", "model name sent to the endpoint")
    api: str = field("responses", "OpenAI API flavour: Responses (/responses) or chat completions (/chat/completions)",
                     choices=("responses", "chat"))
    reasoning_effort: str = field("medium", "reasoning effort sent to reasoning graders ('' = not sent)",
                                  choices=("", "minimal", "low", "medium", "high"))
    temperature: float = field(1.0, "grader sampling temperature (0 = greedy on the native backend)", ge=0)
    max_tokens: int = field(81920, "grader output budget (max_output_tokens on Responses, max_tokens on chat)", ge=1)
    timeout: float = field(900.0, "seconds before one grader request is abandoned", gt=0)
    retries: int = field(3, "extra attempts after a failed request (transport error, timeout, HTTP 429/5xx)", ge=0)
    backoff: tuple[float, ...] = field(default_factory=lambda: (15.0, 30.0, 60.0),
                                       help="seconds to wait before retry i (the last value repeats)")
    concurrency: int = field(64, "grader requests in flight at once (native backend: judge batch size)", ge=1)
    max_failure_frac: float = field(0.25, "stop the run when more than this fraction of one grading batch's calls "
                                    "fail (unreachable, HTTP errors, malformed replies after every retry); below it, "
                                    "failed calls score 0 and are counted", ge=0, le=1)
    api_key_env: str = field("OPENAI_API_KEY", "NAME of the environment variable holding the API key (unset: no "
                             "Authorization header)")
    prompt_file: str = field("", "grading prompt template with {problem} {marking_scheme} {solution} ('' = the "
                             "bundled qednano_jax/prompts/grader.txt)")
    strip_self_evaluation: bool = field(False, "cut the proof at its first '# Evaluation' / 'Self Evaluation' / "
                                        "'Final Evaluation' heading, as the released evaluation does (done for "
                                        "evaluation, docs/recipe.md §5; off in RL)")
    judge_path: str = field("", "native backend: HF checkpoint directory of the judge model")
    judge_tokenizer: str = field("", "native backend: the judge's tokenizer ('' = the one in judge_path, 'qwen3' = "
                                 "the bundled real Qwen3 tokenizer, or a directory)")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The RL objective (docs/recipe.md §3 "Loss / optimizer"; see qednano_jax/rl/losses.py). Defaults are the paper's."""
    policy_loss: str = field("ppo", "per-token policy loss", choices=("ppo", "reinforce"))
    clip_eps_low: float = field(4.0, "PPO clip: ratio floor 1 - eps_low for A < 0 (paper: 4)", ge=0)
    clip_eps_high: float = field(4.0, "PPO clip: ratio ceiling 1 + eps_high for A > 0 (paper: 4)", ge=0)
    entropy_coef: float = field(1e-4, "entropy bonus coefficient (entropy of the temperature-scaled policy)", ge=0)
    aggregation: str = field("token-sum-constant", "how token losses become the step loss",
                             choices=("token-mean", "sequence-mean-token-mean", "sequence-mean-token-sum",
                                      "token-sum-constant"))
    aggregation_constant: float = field(0.0, "divisor of token-sum-constant; 0 = the samples per step (prompts x "
                                        "group size: 1024 in the paper)", ge=0)
    divide_advantage_by_std: bool = field(False, "divide r - group mean by the group std (paper: false)")
    advantage_eps: float = field(1e-6, "added to the group std before dividing", gt=0)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Stage 2: GRPO-style RL with rubric rewards (docs/recipe.md §3; qednano_jax/rl/loop.py). Defaults are the paper's
    numbers. The prompts come from the top-level `data` section (path (`sample` = the bundled FineProofs-RL rows),
    tokenizer, prompt_template = the RL prompt, seq_len = the packed training row length, shuffle_seed = the prompt
    sampler's seed, max_examples, on_malformed); prompts too long for seq_len - max_tokens are dropped and counted.
    `train` gives steps, init, seed, run_dir, log_every, export_hf, progress (batch_size and micro_batches are
    SFT's: RL packs a varying number of rows, see micro_batch_rows)."""
    prompts_per_step: int = field(64, "prompts sampled per optimizer step (paper: 64)", ge=1)
    group_size: int = field(16, "completions per prompt; advantages are taken within a group (paper: 16)", ge=1)
    max_tokens: int = field(49152, "completion budget (paper: 49,152); a completion that hits it is truncated and "
                            "kept (its thinking is usually unclosed: empty proof, reward 0)", ge=1)
    temperature: float = field(0.8, "sampling temperature; the trainer divides its logits by it too (paper: 0.8)",
                               gt=0)
    top_p: float = field(1.0, "nucleus sampling (1 = off; paper: 1)", gt=0, le=1)
    top_k: int = field(-1, "top-k sampling (-1 = off; paper: -1)", ge=-1)
    min_reward_mean: float = field(0.0, "keep only rows whose `reward_mean` (the dataset's difficulty estimate) is "
                                   ">= this (0 and max 1 = no filter; docs/recipe.md §3 curriculum)", ge=0, le=1)
    max_reward_mean: float = field(1.0, "keep only rows whose `reward_mean` is <= this", ge=0, le=1)
    max_lag: int = field(0, "off-policy lag: the rollouts of step s+max_lag are generated (and graded) in the "
                         "background while step s trains, with the weights of step s; rollouts whose weight version "
                         "is more than max_lag behind the trainer are discarded and counted (0 = on-policy)", ge=0)
    prompts_per_call: int = field(0, "prompts per rollout generate call (0 = the whole step at once); each finished "
                                  "call is graded while the next one generates", ge=0)
    micro_batch_rows: int = field(8, "packed rows of seq_len tokens per micro-batch (a multiple of the "
                                  "data-parallel size, else replicated); the step accumulates as many as it needs", ge=1)
    loss_tokens_per_row: int = field(0, "completion tokens one packed row may hold: the LM head and the loss run on "
                                     "these positions only, not on prompts and padding (0 = min(data.seq_len, "
                                     "2 x max_tokens)); the packer starts a new row rather than exceed it",
                                     ge=0)
    seed: int = field(0, "sampling seed: batch b is sampled with seeds drawn from (seed, b), so a resumed run "
                      "samples as an uninterrupted one", ge=0)
    loss: LossConfig = field(help="the RL objective", default_factory=lambda: LossConfig())

    def __post_init__(self):
        if self.loss_tokens_per_row and self.loss_tokens_per_row < self.max_tokens:
            raise ConfigError(f"rl.loss_tokens_per_row: {self.loss_tokens_per_row} is below rl.max_tokens "
                              f"{self.max_tokens}, so a full-length completion would fit no row; raise it or set 0")


# ----------------------------------------------------------------------------------------------- sections: rc

@dataclasses.dataclass(frozen=True)
class RCConfig:
    """Stage 3: RL with a reasoning cache (docs/recipe.md §4; qednano_jax/rc/). Each step draws rl.prompts_per_step /
    states_sampled problems; per problem the current policy runs `cycles` RC turns (reason with rl.max_tokens at
    rl.temperature, summarize), the cycles' T + 1 states (the initial summary and each new one) are emitted, and
    `states_sampled` of them become training prompts with rl.group_size fresh rollouts each, graded against the
    original problem text (data.prompt_template). Loss, step, refit and checkpoints are stage 2's (rl section)."""
    cycles: int = field(3, "T: RC turns per problem, each summarized (paper: num_reasoning_steps 3)", ge=1)
    states_sampled: int = field(2, "k: states of the T + 1 trained on per problem (paper: rc_stream_samples_per_"
                                "batch 2); must divide rl.prompts_per_step", ge=1)
    initial_summary: str = field("", "summary of state s_0 (paper training: empty; test-time RC uses "
                                 "'[No previous summary]')")
    step_by_step: bool = field(True, "end the reasoning prompt with the 'step by step' line (training prompt; the "
                               "test-time prompt omits it)")
    summary_max_tokens: int = field(2048, "H_S: summarizer output budget, and the summary width of the RC state "
                                    "(paper: 2048)", ge=1)
    summary_temperature: float = field(0.7, "summarizer temperature (paper: 0.7)", ge=0)
    summary_top_p: float = field(0.8, "summarizer nucleus sampling (paper: 0.8)", gt=0, le=1)
    summary_top_k: int = field(20, "summarizer top-k (paper: 20; -1 = off)", ge=-1)
    summarizer: str = field("policy", "who summarizes: the policy's own rollout backend (refitted with it), a frozen "
                            "HF checkpoint on an in-process native engine, or frozen SGLang-compatible servers "
                            "(paper: Qwen3-4B-Instruct-2507 on its own server)", choices=("policy", "native", "sglang"))
    summarizer_path: str = field("", "native: the summarizer's HF checkpoint dir")
    summarizer_tokenizer: str = field("", "the summarizer's tokenizer dir or `qwen3` ('' = the policy's); it must "
                                      "share the policy's vocabulary (summaries are passed as tokens)")
    summarizer_urls: tuple[str, ...] = field(default_factory=tuple, help="sglang: the summarizer servers' base URLs "
                                             "(never refitted: the summarizer is frozen)")
    loop: str = field("auto", "RC actor loop: `jit` = the whole multi-turn loop as one jitted program (native "
                      "engines only), `host` = one generate call per turn on any backend, `auto` = jit when the "
                      "policy and summarizer are native", choices=("auto", "jit", "host"))
    grade_turns: bool = field(True, "grade each RC turn's own proof too, for logging (docs/recipe.md §4: not trained on)")
    seed: int = field(0, "seed of the RC actor's sampling and of the choice of states (both derive from "
                      "(seed, step), so a resumed run makes the same choices)", ge=0)
    solve_prompt_file: str = field("", "reasoning-turn template with {problem} {summary} ('' = the bundled "
                                   "qednano_jax/prompts/rc_solve.txt); {problem} is the raw problem")
    summary_prompt_file: str = field("", "summarizer template with {problem} {existing_summary} {reasoning} ('' = "
                                     "the bundled qednano_jax/prompts/rc_summary.txt)")


# ----------------------------------------------------------------------------------------------- sections: plan

@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """The sharding planner (qednano_jax/plan.py): compiles this config's real train step ahead of time for each
    device count on fake CPU devices and estimates memory, collectives, step time and MFU on a TPU generation."""
    devices: tuple[int, ...] = field(default_factory=lambda: (8,), help="target device counts (one compile each "
                                     "per strategy)")
    tpu: str = field("v5p", "TPU generation (or alias) from configs/tpu.yaml for HBM size, peak FLOP/s and bandwidths")
    strategies: tuple[str, ...] = field(default_factory=lambda: ("dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp",
                                                                 "fsdp_tp_sp", "config"),
                                        help="rule sets of sharding.RULE_SETS to plan; `config` = this config's own "
                                        "mesh section (skipped when it equals a named one)")
    seq_len: int = field(0, "tokens per row of the planned micro-batch (0 = data.seq_len)", ge=0)
    rows_per_device: int = field(1, "rows of each micro-batch per data-parallel shard (the planned step runs "
                                 "train.micro_batches of them, as training does)", ge=1)
    fallback: bool = field(False, "plan strategies whose rules do not divide a dimension anyway, with that axis "
                           "replicated (sharding.py's fallback); default: report them as not buildable")
    json: str = field("", "also write the results as JSON to this path ('' = no file)")


# ----------------------------------------------------------------------------------------------- sections: eval

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`python -m qednano_jax.eval CONFIG`: proof benchmarks, graded as the paper grades them (docs/recipe.md §5; see
    qednano_jax/eval/). The defaults are the tiny CPU demo on the bundled IMO-ProofBench sample rows."""
    benchmark: str = field("imo_proofbench", "benchmark format (columns, generation and grading prompts)",
                           choices=("imo_proofbench", "proofbench", "imo_answerbench"))
    source: str = field("sample", "`sample` (qednano_jax/samples/<benchmark>.jsonl), `hub` (the paper's hub id), a "
                        "local .jsonl/.json/.csv/.parquet file or dataset folder, or a hub dataset id")
    split: str = field("train", "dataset split (hub ids and dataset folders)")
    columns: dict[str, str] = field(help="overrides of the format's column table, e.g. {category: Category}",
                                    default_factory=dict)
    limit: int = field(0, "evaluate only the first N problems (0 = all)", ge=0)
    runs: int = field(3, "k of avg@k: independent runs over every problem (paper: 3; AnswerBench: 1)", ge=1)
    scaffold: str = field("single", "`single` turn, or `rc`: test-time reasoning cache (docs/recipe.md §4)",
                          choices=("single", "rc"))
    rc_iterations: int = field(3, "rc: reasoning turns; a summary is written after each but the last", ge=1)
    checkpoint: str = field("random", "policy for the native engine: an HF checkpoint dir, or `random` (seeded init "
                            "of `model`, for demos and tests); an SGLang server holds its own weights")
    tokenizer: str = field("", "tokenizer dir or `qwen3`; '' = the checkpoint dir (`qwen3` for `random`)")
    max_new_tokens: int = field(64, "generation budget per turn (paper: 229,376)", ge=1)
    temperature: float = field(0.8, "sampling temperature (paper: 0.8)", ge=0)
    top_p: float = field(1.0, "nucleus sampling (1 = off)", gt=0, le=1)
    top_k: int = field(-1, "top-k sampling (-1 = off)", ge=-1)
    summary_max_new_tokens: int = field(64, "rc: summarizer budget per summary (paper: the policy's own budget)",
                                        ge=1)
    summary_temperature: float = field(0.8, "rc: summarizer temperature", ge=0)
    summarizer_urls: tuple[str, ...] = field(default_factory=tuple, help="rc: SGLang-compatible server URLs of a "
                                             "separate frozen summarizer (RC training used Qwen3-4B-Instruct-2507); "
                                             "empty = the policy's own backend (the paper's test-time RC)")
    summarizer_tokenizer: str = field("", "rc: the summarizer's tokenizer dir or `qwen3` ('' = the policy's)")
    grading_prompt_file: str = field("", "judge template replacing the benchmark's bundled one (qednano_jax/prompts/"
                                     "<benchmark>_grading.txt / answerbench_judging.txt); proofs: {problem} "
                                     "{solution} {guidelines} {proof}; answers: {problem} {answer} {proof}")
    seed: int = field(0, "sampling seed; each (run, batch) draws its own seed from it", ge=0)
    batch_size: int = field(8, "prompts sent to the rollout backend in one generate call", ge=1)
    out_dir: str = field("runs/eval", "results.jsonl (resumable), summary.md, summary.json, scores.png")
    name: str = field("", "label of this run in tables and charts ('' = the out_dir name)")
    progress: bool = field(True, "show a tqdm progress bar")


@dataclasses.dataclass(frozen=True)
class EvalRunConfig:
    """The top level of configs/eval/*.yaml (`python -m qednano_jax.eval CONFIG [key=value ...]`)."""
    model: ModelConfig = field(help="the policy's decoder settings (architecture from eval.checkpoint when it is an "
                               "HF dir; compute dtype and chunks from here)", default_factory=ModelConfig)
    mesh: MeshConfig = field(help="device mesh and sharding rules of the native engine",
                             default_factory=lambda: MeshConfig())
    rollout: "RolloutConfig" = field(help="where generations come from (native engine or SGLang-compatible servers)",
                                     default_factory=lambda: RolloutConfig())
    grader: "GraderConfig" = field(help="the judge endpoint (its transport; the eval prompt and parser replace the "
                                   "RL grading prompt)", default_factory=lambda: GraderConfig())
    eval: EvalConfig = field(help="benchmark, scaffold, sampling, runs, output", default_factory=lambda: EvalConfig())


def load_eval_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> EvalRunConfig:
    """configs/eval/*.yaml (or the embedded tiny defaults when None) + `key=value` overrides -> EvalRunConfig."""
    return load_as(EvalRunConfig, path, overrides)


# ------------------------------------------------------------------------------------------ sections: data generation
# (problems, dedup, distill, rubrics and the top-level DataGenConfig: qednano_jax/data/{dedup,distill,rubrics}.py)

SAMPLE_PROBLEMS = str(Path(__file__).resolve().parent / "samples" / "fineproofs_rl.jsonl")


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
    """The problems data generation starts from (docs/recipe.md §2: AI-MO/aops and AI-MO/olympiads, filtered, deduplicated
    and decontaminated). Rows come through `datasets` (data.sft.load_rows); the defaults read the bundled sample."""
    path: str = field(SAMPLE_PROBLEMS, "local .jsonl/.json/.parquet file or folder, or a hub dataset id")
    name: str | None = field(None, "hub dataset config")
    split: str = field("train", "dataset split")
    text_column: str = field("problem", "column holding the problem statement (the paper's --text-column problem)")
    solution_column: str = field("", "rubrics: column holding an official solution shown to the scheme writer "
                                 "('' = none; FineProofs-RL has none)")
    keep_columns: tuple[str, ...] = field(default_factory=lambda: ("source", "category", "competition"),
                                          help="columns copied into the output rows when the input has them")
    limit: int = field(0, "use only the first N rows (0 = all)", ge=0)


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """`python -m qednano_jax.data.dedup CONFIG`: exact and near-duplicate removal within the problems, and
    decontamination against benchmark problems (docs/recipe.md §2), with a JSON report of every removal."""
    input: str = field("", "rows to deduplicate: a local file/folder or hub id ('' = problems.path; the whole input, "
                       "problems.limit does not apply)")
    output: str = field("runs/datagen/problems.dedup.jsonl", "kept rows (.jsonl or .parquet); the report goes next "
                        "to it as <stem>.report.json")
    ngram: int = field(5, "words per shingle for the near-duplicate and benchmark similarities", ge=1)
    threshold: float = field(0.6, "near duplicate: Jaccard similarity of the shingle sets >= this", gt=0, le=1)
    num_perm: int = field(256, "MinHash permutations (candidate search; every candidate is verified exactly)", ge=1)
    bands: int = field(64, "LSH bands; must divide num_perm (rows per band = num_perm / bands; 256 / 64: a pair "
                       "with Jaccard 0.6 becomes a candidate with probability 0.9999)", ge=1)
    benchmarks: tuple[str, ...] = field(default_factory=lambda: ("imo_proofbench=sample", "proofbench=sample"),
                                        help="benchmarks to decontaminate against, each `format=source` (format: "
                                        "eval.benchmarks.FORMATS; source: sample, hub, a file or a hub id)")
    decontam_threshold: float = field(0.6, "contaminated: shingle overlap |A & B| / min(|A|, |B|) with a benchmark "
                                      "problem >= this (catches a benchmark problem inside a longer text)",
                                      gt=0, le=1)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`python -m qednano_jax.data.distill CONFIG`: teacher proofs as FineProofs-SFT rows (docs/recipe.md §2). The teacher
    endpoint is the `teacher` section (its transport: base_url, model, temperature, max_tokens, timeout, retries,
    backoff, concurrency, api_key_env)."""
    out_dir: str = field("runs/datagen/distill", "distill.jsonl (resumable), fineproofs_sft.{jsonl,parquet}, "
                         "summary.json")
    n: int = field(1, "teacher samples per problem (paper: 1 or 3)", ge=1)
    enable_thinking: bool = field(True, "sent as chat_template_kwargs.enable_thinking (paper: true)")
    system_prompt: str = field("", "system message ('' = none, the paper's default)")
    prompt_template: str = field("{problem}", "user message; {problem} is the problem text (paper: the raw problem)",
                                 template=("problem",))
    extra_body: dict[str, Any] = field(default_factory=dict, help="extra fields merged into every request body "
                                       "(e.g. top_p, separate_reasoning, logit_bias)")
    grade: bool = field(False, "grade each proof with the `grader` section into `grade_field`")
    grade_field: str = field("gemini-3-pro-grade", "output column of the grade (0..7; null when the grader failed)")
    rubric_column: str = field("", "grade: input column with a marking scheme ('' = `default_rubric`)")
    default_rubric: str = field("7 points for a complete and rigorous proof; partial credit in proportion to the "
                                "progress a correct argument makes.", "grade: the marking scheme when the row has none")
    progress: bool = field(True, "show a tqdm progress bar")


@dataclasses.dataclass(frozen=True)
class RubricsConfig:
    """`python -m qednano_jax.data.rubrics CONFIG`: a 7-point marking scheme per problem from the `writer` endpoint,
    and the difficulty estimate (k policy rollouts graded against it by `grader`) as FineProofs-RL rows
    (docs/recipe.md §3). Policy rollouts come from the `rollout` section (native engine on `policy`, or SGLang servers)."""
    out_dir: str = field("runs/datagen/rubrics", "rubrics.jsonl (resumable), fineproofs_rl.{jsonl,parquet}, "
                         "summary.json")
    prompt_file: str = field("", "scheme-writer template with {problem} and {solution} ('' = the bundled "
                             "qednano_jax/prompts/marking_scheme.txt)")
    keep_invalid: bool = field(False, "export schemes that fail the format check (three sections, checkpoints "
                               "adding up to 7); they are reported either way")
    difficulty: bool = field(True, "estimate difficulty: k graded policy rollouts per problem")
    k: int = field(128, "rollouts per problem (paper: 128 of Qwen3-4B-Thinking-2507)", ge=1)
    prompt_template: str = field("Generate a rigorous proof to the following question:\n\n{problem}",
                                 "policy user message (the RL prompt, docs/recipe.md §3)", template=("problem",))
    max_tokens: int = field(49152, "policy completion budget (the RL budget; the paper's estimate budget is not "
                            "stated)", ge=1)
    temperature: float = field(0.8, "policy sampling temperature", ge=0)
    top_p: float = field(1.0, "policy nucleus sampling (1 = off)", gt=0, le=1)
    top_k: int = field(-1, "policy top-k (-1 = off)", ge=-1)
    seed: int = field(0, "sampling seed; each batch of problems samples with a seed drawn from (seed, its first "
                      "problem id): a resumed run with the same batch_problems samples as an uninterrupted one",
                      ge=0)
    batch_problems: int = field(8, "problems whose schemes, rollouts and grades are requested together", ge=1)
    policy: str = field("", "native: the policy's HF checkpoint dir (SGLang servers hold their own weights)")
    tokenizer: str = field("qwen3", "the policy's tokenizer (`qwen3` or a dir); must match the servers' model")
    progress: bool = field(True, "show a tqdm progress bar")


def _teacher_default() -> "GraderConfig":
    return GraderConfig(base_url="http://127.0.0.1:30000/v1", model="deepseek-ai/DeepSeek-Math-V2", api="chat",
                        reasoning_effort="", temperature=1.0, max_tokens=124928, timeout=7200.0)


@dataclasses.dataclass(frozen=True)
class DataGenConfig:
    """The top level of configs/datagen/*.yaml (`python -m qednano_jax.data.{dedup,distill,rubrics} CONFIG
    [key=value ...]`). Each command reads the sections it needs; the endpoint sections reuse GraderConfig (only its
    transport fields matter for `teacher` and `writer`)."""
    problems: ProblemsConfig = field(help="input problems", default_factory=ProblemsConfig)
    dedup: DedupConfig = field(help="dedup + decontamination", default_factory=DedupConfig)
    teacher: "GraderConfig" = field(help="distill: the teacher's OpenAI-compatible endpoint (chat completions)",
                                    default_factory=_teacher_default)
    distill: DistillConfig = field(help="distill: samples, prompt, output", default_factory=DistillConfig)
    writer: "GraderConfig" = field(help="rubrics: the marking-scheme writer's endpoint (chat completions)",
                                   default_factory=lambda: GraderConfig(model="gemini-3-pro-preview", api="chat",
                                                                        reasoning_effort="high"))
    rubrics: RubricsConfig = field(help="rubrics: schemes, difficulty estimate, output", default_factory=RubricsConfig)
    grader: "GraderConfig" = field(help="the grader of distilled proofs and of difficulty rollouts",
                                   default_factory=lambda: GraderConfig())
    model: ModelConfig = field(help="rubrics, native rollouts: decoder settings (architecture from rubrics.policy)",
                               default_factory=ModelConfig)
    mesh: MeshConfig = field(help="rubrics, native rollouts: device mesh", default_factory=lambda: MeshConfig())
    rollout: "RolloutConfig" = field(help="rubrics: where policy rollouts come from",
                                     default_factory=lambda: RolloutConfig())


def load_datagen_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DataGenConfig:
    """configs/datagen/*.yaml (or the embedded defaults when None) + `key=value` overrides -> DataGenConfig."""
    return load_as(DataGenConfig, path, overrides)


# ----------------------------------------------------------------------------------------------- machinery

def validate(obj: Any, where: str = "") -> None:
    """Check every field of a config dataclass against its type-level bounds; raise ConfigError naming it."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{where}{f.name}"
        m = f.metadata
        if m.get("choices") is not None and v not in m["choices"]:
            raise ConfigError(f"{name}: {v!r} is not one of {list(m['choices'])}")
        if m.get("template") is not None:
            check_template(name, v, m["template"])
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                  ("le", lambda a, b: a <= b, "<=")):
                if m.get(key) is not None and not ok(v, m[key]):
                    raise ConfigError(f"{name}: expected a value {word} {m[key]}, got {v!r}")


def check_template(name: str, template: str, fields: tuple[str, ...]) -> None:
    """A str.format template must use each of `fields` and nothing else; literal braces are written `{{` `}}`."""
    from qednano_jax.prompts import fields_of  # the prompt files' parser (that package imports this module)
    try:
        used = fields_of(template)
    except ValueError as e:
        raise ConfigError(f"{name}: {template!r} is not a valid template ({e}; write a literal brace as {{{{ or "
                          "}}}})") from None
    for f in sorted(used - set(fields)):
        raise ConfigError(f"{name}: {template!r} uses {{{f}}}, but only {', '.join('{' + x + '}' for x in fields)} "
                          "can be filled (write a literal brace as {{ or }})")
    for f in fields:
        if f not in used:
            raise ConfigError(f"{name}: {template!r} has no {{{f}}} field")


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=f"{name}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(kt, k, name): _coerce(vt, v, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build config dataclass `cls` from a plain dict; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown config key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}{e}") from None
        raise
    validate(obj, where)
    return obj


def to_dict(obj: Any) -> Any:
    """Config dataclass -> plain dict (tuples become lists), e.g. to save next to a run."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve(ref: str, here: Path) -> Path:
    for cand in (here / ref, CONFIGS_DIR / ref, Path(ref)):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file {ref!r} not found (looked next to {here} and in {CONFIGS_DIR})")


def load_yaml(path: str | Path) -> dict:
    """Load a YAML config with its `base:` chain and `*.yaml` section includes resolved into one dict."""
    path = _resolve(str(path), Path.cwd())
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top")
    bases = raw.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_yaml(_resolve(b, path.parent)))
    for k, v in list(raw.items()):
        if isinstance(v, str) and v.endswith((".yaml", ".yml")):
            raw[k] = load_yaml(_resolve(v, path.parent))
    return _merge(merged, raw)


def load_as(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """YAML file (or the embedded defaults of `cls` when None) + `key=value` overrides -> validated `cls`."""
    data = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:  # not YAML (e.g. a template `{problem} in \\boxed{{}}`): the text itself
            value = text
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and "." not in key:
            value = load_yaml(value)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return data


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field, `name (type, default): help`, for `--help` output and docs."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        choices = f.metadata.get("choices")
        listed = f" [choices: {', '.join(map(str, choices))}]" if choices else ""
        lines.append(f"{prefix}{f.name} ({getattr(tp, '__name__', tp)}, default {default!r}): "
                     f"{f.metadata.get('help', '')}{listed}")
    return lines
