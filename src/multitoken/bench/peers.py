"""The baselines ``multitoken bench`` measures ours against: what a user would otherwise run
with ``transformers`` alone on the same trunk (greedy ``generate``, prompt lookup, assisted
generation with a separate small draft model). Each decodes one prompt greedily to exactly
``max_new_tokens`` tokens, so its output can be compared with ours token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from multitoken.errors import MultitokenError
from multitoken.model import MTPModel

HF_GREEDY, PROMPT_LOOKUP, ASSISTED = "hf_greedy", "prompt_lookup", "assisted"

# A method decodes one prompt: (new tokens, trunk passes, our Stats or None for transformers').
Decode = Callable[[list[int]], tuple[list[int], int, object]]


def load_draft_model(path: str | Path, vocab_size: int) -> PreTrainedModel:
    """A transformers causal-LM folder, or a multitoken checkpoint/run folder (its trunk)."""
    from multitoken.io.checkpoint import checkpoint_trunk, is_run_or_checkpoint
    from multitoken.trunk import load_trunk

    try:
        draft = checkpoint_trunk(path) if is_run_or_checkpoint(path) else load_trunk(path)
    except MultitokenError as exc:
        raise MultitokenError(exc.message, "--draft-model") from None
    theirs = draft.get_output_embeddings().weight.shape[0]
    if theirs != vocab_size:
        raise MultitokenError(
            f"the draft model has {theirs} tokens, the trunk {vocab_size}: assisted generation "
            "needs the same tokenizer",
            "--draft-model",
        )
    return draft.eval()


def transformers_method(model: MTPModel, new: int, passes: list[int], **extra) -> Decode:
    """``model.trunk.generate`` greedy for one prompt; ``passes[0]`` counts trunk calls.
    ``eos_token_id=None`` keeps it going: ``min_new_tokens`` would instead mask EOS and so
    change the output."""
    from multitoken.trunk import quiet_transformers

    device = model.parts.embed.weight.device
    options = dict(max_new_tokens=new, eos_token_id=None, **extra)

    def decode(prompt: list[int]):
        ids = torch.tensor([prompt], device=device)
        passes[0] = 0
        mask = torch.ones_like(ids)
        with quiet_transformers(warnings=False):  # assisted generation warns on every call
            out = model.trunk.generate(ids, attention_mask=mask, do_sample=False, **options)
        return out[0, ids.shape[1] :].tolist(), passes[0], None

    return decode


def baselines(
    model: MTPModel,
    new: int,
    passes: list[int],
    prompt_lookup: int,
    draft_model: PreTrainedModel | None,
) -> list[tuple[str, int | None, Decode]]:
    """(method, K, decoder) for transformers' greedy decoding, then prompt lookup
    (``prompt_lookup`` 0: none) and assisted generation (``draft_model`` None: none)."""
    methods = [(HF_GREEDY, None, transformers_method(model, new, passes))]
    if prompt_lookup:
        lookup = transformers_method(model, new, passes, prompt_lookup_num_tokens=prompt_lookup)
        methods.append((PROMPT_LOOKUP, prompt_lookup, lookup))
    if draft_model is not None:
        assistant = draft_model.to(model.parts.embed.weight.device)
        assisted = transformers_method(model, new, passes, assistant_model=assistant)
        methods.append((ASSISTED, None, assisted))
    return methods
