"""The architecture matrix: tiny random models of many decoder-only types that transformers
builds, each trained with every head family for a few steps and decoded speculatively against
plain decoding.

Used by ``tests/test_architectures.py`` (one case per type and family) and, as a script, to
write the table in docs/models.md::

    python tests/architectures.py --write docs/models.md

Every config is built from transformers' own config class for the type with its size fields
shrunk (:func:`tiny_config`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

V = 300
FAMILIES = ("bpd", "meta", "deepseek")
WINDOW = 4  # sliding windows shorter than the prompts, so decoding passes them

# Every size field a config class may carry, shrunk. A field is set only where the type's
# config declares it (an unknown keyword would become a stray attribute).
SIZES = {
    "vocab_size": V,
    "hidden_size": 32,
    "n_embd": 32,
    "d_model": 32,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "ffn_hidden_size": 64,
    "n_inner": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "sliding_window": WINDOW,
    # multi-head latent attention (DeepSeek-V2/V3, GLM-4-MoE-lite...)
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "qk_head_dim": 8,
    # Gemma-3n / Gemma-4 per-layer inputs and shared KV
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": V,
    "num_kv_shared_layers": 0,
    "global_head_dim": 8,
}

# The types of the matrix: every one the issue names, then the common rest. A type listed in
# REFUSED must be refused up front (one line, the reason); the others must work.
TYPES = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma4_text",
    "phi",
    "phi3",
    "phimoe",
    "olmo",
    "olmo2",
    "olmo3",
    "olmoe",
    "granite",
    "granitemoe",
    "cohere",
    "cohere2",
    "gpt2",
    "gpt_neox",
    "gptj",
    "gpt_bigcode",
    "starcoder2",
    "falcon",
    "stablelm",
    "glm",
    "glm4",
    "glm4_moe",
    "exaone4",
    "ernie4_5",
    "ernie4_5_moe",
    "gpt_oss",
    "smollm3",
    "helium",
    "apertus",
    "arcee",
    "seed_oss",
    "ministral",
    "hunyuan_v1_dense",
    "deepseek_v2",
    "deepseek_v3",
    "dots1",
    "bloom",
    "opt",
    "persimmon",
    "nemotron",
    "qwen3_next",
    "lfm2",
    "falcon_h1",
    "jamba",
    "mamba",
]


# Where a type's default config is not the shape its released models have: hybrids get their
# recurrent or convolutional layers (so they are refused as they must be).
TYPE_OPTIONS: dict[str, dict] = {
    "lfm2": {"layer_types": ["conv", "full_attention"]},
}


@dataclass
class Outcome:
    """One cell of the matrix: ``ok``, or the one-line refusal or failure."""

    ok: bool
    refused: str | None = None
    error: str | None = None


def tiny_config(model_type: str):
    """transformers' config for ``model_type`` with every size field it has shrunk (SIZES) and
    per-layer lists cut to two layers, one of each of the first two kinds where the type mixes
    them (a sliding and a full layer), then TYPE_OPTIONS."""
    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    known = set(defaults.to_dict()) | set(vars(defaults))
    options = {k: v for k, v in SIZES.items() if k in known and _settable(cls, k)}
    if "kv_lora_rank" in known:  # latent attention: head_dim is the rope part, no shared KV
        options.pop("head_dim", None)
        options.pop("num_key_value_heads", None)
    if "rotary_dim" in known:  # GPT-J, CodeGen: rotary over part of each head
        options["rotary_dim"] = 4
    for name in ("layer_types", "mlp_layer_types"):
        kinds = getattr(defaults, name, None)
        if isinstance(kinds, list) and kinds and _settable(cls, name):
            mixed = list(dict.fromkeys(kinds))
            options[name] = (mixed * 2)[:2] if len(mixed) > 1 else kinds[:2]
    options.setdefault("tie_word_embeddings", getattr(defaults, "tie_word_embeddings", False))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if name in known:
            options[name] = 0
    options.update(TYPE_OPTIONS.get(model_type, {}))
    return cls(**options)


def _settable(cls, name: str) -> bool:
    """Whether a config class takes ``name`` as a field (not a read-only property, nor an alias
    of one)."""
    name = getattr(cls, "attribute_map", {}).get(name, name)
    return not isinstance(getattr(cls, name, None), property)


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def check(model_type: str, family: str, steps: int = 3) -> Outcome:
    """Train ``family`` heads for ``steps`` steps on ``model_type`` (trunk frozen), then one
    joint step (trunk and heads, as from-scratch training takes them); the heads' drafts over
    three decoding steps must equal their teacher-forced training logits' argmax; a ragged batch
    of two prompts decoded with the default, a chain and a fixed tree must give plain
    decoding's tokens, and plain decoding transformers' greedy tokens. A refusal
    (MultitokenError) is an outcome, not a failure."""
    from multitoken.config import HeadConfig
    from multitoken.decode.api import generate
    from multitoken.errors import MultitokenError
    from multitoken.model import MTPModel

    try:
        model = MTPModel(build(model_type), HeadConfig(family=family, depth=2))
    except MultitokenError as exc:
        return Outcome(False, refused=str(exc))
    model.trunk.requires_grad_(False)
    train(model, steps)
    model.trunk.requires_grad_(True)
    train(model, 1)
    if model.parts.embed.weight.grad is None:  # (a MoE's unrouted experts may get none)
        return Outcome(False, error="a joint step gave the trunk no gradient")
    model.trunk.requires_grad_(False)
    if (wrong := drafts_differ(model)) is not None:
        return Outcome(False, error=f"drafts differ from training's: {wrong}")
    prompts = [list(range(5, 17)), [7, 8, 9]]
    plain = generate(model, prompts, max_new_tokens=16, speculate=False)
    for options in ({}, {"tree": "chain", "draft_len": 2}, {"tree": "2,1"}):
        out = generate(model, prompts, max_new_tokens=16, **options)
        if out.tokens != plain.tokens:
            return Outcome(False, error=f"{options or 'the default'} differs from plain")
    with torch.no_grad():
        for prompt, ours in zip(prompts, plain.tokens):
            hf = model.trunk.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            if ours[: len(hf)] != hf:  # transformers stops at an EOS; we do not
                return Outcome(False, error="plain decoding differs from transformers' greedy")
    return Outcome(True)


def drafts_differ(model) -> str | None:
    """Drive the heads' chain drafting (K = 2) over three steps of two ragged rows, each
    accepting one draft and a bonus token per step; None when every draft equals the argmax
    of the heads' teacher-forced logits, else where it first differs."""
    from conftest import argmax, committed, teacher_forced

    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(3, V, (n,), generator=g) for n in (7, 3)]  # prompt + pending
    start, state = [0, 0], model.heads.new_draft_state(2)
    with torch.no_grad():
        for step in range(3):
            c = committed(model, tokens, start)
            drafts = model.heads.draft(state, c, 2, argmax)[0].tolist()
            for r, (ids, row) in enumerate(zip(tokens, drafts)):
                if row != teacher_forced(model, ids, row):
                    return f"step {step}, row {r}"
            start = [ids.numel() - 1 for ids in tokens]
            tokens = [
                torch.cat([ids, torch.tensor([row[0], 11])]) for ids, row in zip(tokens, drafts)
            ]
    return None


def train(model, steps: int) -> None:
    """A few AdamW steps on the heads, at a learning rate high enough to move them."""
    model.train()
    params = [p for p in model.heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, V, (2, 12), generator=g)
        loss = model(tokens, lam=0.5).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# The reasons a type is refused, by type (every family unless the value names families).
REFUSED = {
    "qwen3_next": "recurrent state",
    "lfm2": "recurrent state",
    "falcon_h1": "recurrent state",
    "jamba": "recurrent state",
    "mamba": "recurrent state",
    "bloom": "take alibi",
}
REFUSED_FAMILIES = {"gemma4_text": ({"meta", "deepseek"}, "take per_layer_input")}


def expected_refusal(model_type: str, family: str) -> str | None:
    """What the refusal of ``family`` heads on ``model_type`` must say (None: it must work)."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    families, reason = REFUSED_FAMILIES.get(model_type, ((), None))
    return reason if family in families else None


def survey(types: list[str]) -> dict[tuple[str, str], Outcome]:
    """Every cell, with progress on stderr; a crash is a failed cell, not the end."""
    cells = {}
    for t in types:
        for family in FAMILIES:
            start = time.perf_counter()
            try:
                out = check(t, family)
            except Exception as exc:  # noqa: BLE001 — the survey reports every failure
                out = Outcome(False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            state = "ok" if out.ok else (f"refused: {out.refused}" if out.refused else out.error)
            took = time.perf_counter() - start
            print(f"{t:18} {family:9} {took:5.1f}s {state}", file=sys.stderr, flush=True)
            cells[t, family] = out
    return cells


def markdown(cells: dict[tuple[str, str], Outcome]) -> str:
    """The table of docs/models.md: a row per type, a column per family."""
    import transformers

    types = list(dict.fromkeys(t for t, _ in cells))
    lines = [
        f"{len(types)} `model_type`s of transformers {transformers.__version__}, tiny random "
        "configs (`python tests/architectures.py --write docs/models.md` rewrites this table; "
        "`tests/test_architectures.py` checks every cell): ✓ = heads trained (trunk frozen, then "
        "a joint step), drafts equal to the heads' teacher-forced argmax, and the default, a "
        "chain and a tree decoding a ragged batch past the sliding window exactly as plain "
        "greedy decoding, itself equal to transformers' greedy.",
        "",
        "| model type | " + " | ".join(FAMILIES) + " |",
        "|---|" + "---|" * len(FAMILIES),
    ]
    for t in types:
        row = []
        for family in FAMILIES:
            out = cells[t, family]
            if out.ok:
                row.append("✓")
            elif out.refused:
                row.append("refused: " + out.refused.split(" (")[0].replace("|", "\\|"))
            else:
                row.append("**fails**: " + (out.error or ""))
        lines.append(f"| `{t}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- architectures: begin -->", "<!-- architectures: end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", default=TYPES)
    parser.add_argument("--write", metavar="MD", help="replace the table between the markers")
    args = parser.parse_args()
    table = markdown(survey(args.types))
    if not args.write:
        print(table, end="")
        return
    path = Path(args.write)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent)]
    main()
