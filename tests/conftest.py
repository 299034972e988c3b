from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 64


def micro_llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB):
    """A Llama trunk small enough for exact, fast unit tests (fp32, eager attention)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def perturb_heads(model, seed: int = 0, scale: float = 0.05):
    """Move every head weight off its initial value (a fresh BPD head is the identity on the
    trunk, fresh norms are all ones), as training would; returns the model, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 13), generator=g)
