"""The from-scratch trunk sizes ``--preset`` chooses among, and the learning rate each trains
well at (a pretrained ``--trunk`` is fine-tuned at ``PRETRAINED_LR`` instead).

From-scratch trunks are plain Llama configs, so a trained one loads with ``transformers`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrunkPreset:
    """Shape of a from-scratch Llama trunk. Parameter counts are for the byte-level vocabulary."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    lr: float  # a learning rate known to train this size well from scratch
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    def llama_config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


PRESETS: dict[str, TrunkPreset] = {
    # ~3.3M parameters: tests and the demo.
    "tiny": TrunkPreset(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, lr=2e-3),
    # ~25M parameters.
    "small": TrunkPreset(
        hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408, lr=1e-3
    ),
    # ~100M parameters.
    "base": TrunkPreset(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2560, lr=6e-4
    ),
}

# Learning rate when fine-tuning a pretrained --trunk (heads only or jointly).
PRETRAINED_LR = 1e-4
