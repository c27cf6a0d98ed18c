"""Reference numbers for the rollout tests: behaviour logprobs recomputed with one full forward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax.model import qwen3

MAX_LEN = 160  # prompt + completion of every rollout test fits; one compiled shape


def forward_logprobs(cfg, params, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token from one full forward pass (T = 1 when greedy)."""
    ids = list(prompt) + list(completion)
    pad = MAX_LEN - len(ids)  # causal attention: the padded tail changes nothing before it
    lp = _forward_lp(cfg, params, jnp.asarray([ids + [0] * pad]), jnp.asarray([ids[1:] + [0] * (pad + 1)]),
                     temperature or 1.0)
    return np.asarray(lp[0, len(prompt) - 1:len(ids) - 1])


@functools.partial(jax.jit, static_argnums=0)
def _forward_lp(cfg, params, ids, targets, temperature):
    hidden = qwen3.hidden_states(cfg, params, ids)
    return qwen3.token_logprobs(cfg, params, hidden, targets, temperature=temperature)
