"""Multiple-choice scoring (SpeechMMLU-style): the option the model scores highest.

An option's score is the log-likelihood of its text tokens given the prompt, from the LM's text
logits in one teacher-forced forward pass: the option's ids follow the prompt as text groups (each
with the empty speech ids), and token k is scored by the text logits of the group before it. The
options of an item are the rows of one batch, right-padded (a causal model never attends to the
padding after a row's tokens), to a width rounded up to WIDTH_QUANTUM so that items of similar
length share one compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.lm.layout import empty_patch
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.tasks.segments import Prompt

WIDTH_QUANTUM = 32


@nnx.jit
def _next_token_logprobs(model: MiMoAudioLM, text, codes):
    """log p(text[:, t + 1] | groups <= t) for every t: [B, W - 1] (float32)."""
    logits = model.text_logits(model(text, codes)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logp, text[:, 1:, None], axis=-1)[..., 0]


def option_logprobs(
    model: MiMoAudioLM, prompt: Prompt, options: list[list[int]], pad_id: int
) -> np.ndarray:
    """The summed log-likelihood [len(options)] of each option's ids after `prompt`."""
    if not options or any(len(o) == 0 for o in options):
        raise ValueError(f"options {options!r}: expected one or more non-empty id lists")
    c = model.config
    p = prompt.groups
    need = p + max(len(o) for o in options)
    width = -(-need // WIDTH_QUANTUM) * WIDTH_QUANTUM
    text = np.full((len(options), width), pad_id, np.int32)
    codes = np.broadcast_to(
        empty_patch(c.speech_empty_ids, c.group_size),
        (len(options), width, c.group_size, c.audio_channels),
    ).copy()
    text[:, :p], codes[:, :p] = prompt.text, prompt.codes
    for row, ids in enumerate(options):
        text[row, p : p + len(ids)] = ids
    logp = np.asarray(_next_token_logprobs(model, jnp.asarray(text), jnp.asarray(codes)))
    # Token k of an option sits at group p + k and is predicted at group p + k - 1.
    return np.array([logp[row, p - 1 : p - 1 + len(ids)].sum() for row, ids in enumerate(options)])


def choose(
    model: MiMoAudioLM, prompt: Prompt, options: list[list[int]], pad_id: int
) -> tuple[int, np.ndarray]:
    """(index of the highest-scoring option, every option's score)."""
    scores = option_logprobs(model, prompt, options, pad_id)
    return int(np.argmax(scores)), scores
