"""Tiny random transformers Qwen3 checkpoints, the reference for the model tests (imported by tests/model/test_*.py)."""
import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

VOCAB = 96


def build_hf_qwen3(out_dir, *, tie=True, hidden=32, heads=4, kv_heads=2, head_dim=12, inter=64, layers=2,
                   vocab=VOCAB, theta=10_000.0, seed=0):
    """Save a random Qwen3ForCausalLM (fp32, safetensors) into `out_dir`; returns the torch model in eval mode.

    Every weight is random, the norm weights too (around 1), so a swapped or mis-transposed tensor shows in the
    logits; weights are large enough that logits are O(1) and a 1e-4 tolerance means something.
    """
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=tie, rope_theta=theta, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def torch_logits(model, tokens, mask=None):
    """fp32 logits [b, t, v] of the transformers model (attention mask for right-padded rows)."""
    with torch.no_grad():
        am = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(torch.tensor(np.asarray(tokens)), attention_mask=am).logits.numpy()


def right_padded(rng, lengths, vocab=VOCAB):
    """tokens [b, max(lengths)] with random real tokens and zero padding, and the 0/1 mask (= segment ids)."""
    t = max(lengths)
    tokens = rng.integers(3, vocab, (len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return tokens * mask, mask

