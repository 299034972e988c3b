"""The frozen-trunk feature cache: cached states are the live trunk's (bit-exact in fp32 storage,
the bf16 rounding of them in bf16), training from the cache trains the heads a live run trains,
a resumed run reads what was cached before, a damaged shard is an error naming it, and the cache
is bounded and never read for another trunk. Also the per-file packing that makes epochs
repeat their rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import micro_llama, perturb_heads
from helpers import tiny_corpus, train_tiny, trunk_folder

from multitoken.config import SOFT_TOP_K, HeadConfig
from multitoken.errors import MultitokenError
from multitoken.io.tokenizer_files import write_hf_tokenizer
from multitoken.model import MTPModel
from multitoken.text.tokenizer import ByteTokenizer
from multitoken.training import featcache
from multitoken.training.featcache import FeatureCache, live_features
from multitoken.training.losses import (
    IGNORE,
    cross_entropy,
    greedy_path_labels,
    shift_labels,
    trunk_top_k,
)
from multitoken.training.packing import PackedStream
from multitoken.training.trainer import TrainResult
from multitoken.trunk import quiet_transformers


def frozen(family: str, seed: int = 0) -> MTPModel:
    model = perturb_heads(MTPModel(micro_llama(seed), HeadConfig(family=family, depth=2)), seed)
    model.trunk.requires_grad_(False)
    return model


def rows(seed: int = 1, batch: int = 4, length: int = 13) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def live_states(model: MTPModel, tokens: torch.Tensor) -> torch.Tensor:
    branch = model.heads.branch_layer if model.family == "meta" else None
    with torch.no_grad():
        out = model.trunk_forward(tokens[:, :-1], branch)
    return out.branch_hidden if branch is not None else out.hidden


def greedy_rows(model: MTPModel, batch: int = 4, length: int = 13) -> torch.Tensor:
    """Rows whose tokens after a 3-token prompt are the trunk's own greedy continuation."""
    prompts = rows(batch=batch, length=3)
    with torch.no_grad():
        out = model.trunk.generate(
            prompts, max_new_tokens=length - 3, do_sample=False, pad_token_id=0
        )
    return out[:, :length]


@pytest.mark.parametrize("labels", ["text", "trunk", "soft"])
@pytest.mark.parametrize("family", ["bpd", "meta", "deepseek"])
def test_cached_states_are_the_live_trunks_and_give_the_same_losses(tmp_path, family, labels):
    model = frozen(family)
    tokens = rows() if labels == "text" else torch.cat([rows(), greedy_rows(model)])
    cache = FeatureCache(tmp_path, model, 1 << 30, storage="fp32")
    first = cache.features(model, tokens)  # computed and stored
    cache.close()
    again = FeatureCache(tmp_path, model, 1 << 30, storage="fp32")  # a new process, say
    read = again.features(model, tokens)
    n = len(tokens)
    assert (again.stats.hits, again.stats.computed, cache.stats.computed) == (n, 0, n)
    want = live_states(model, tokens)
    assert torch.equal(first.states, want) and torch.equal(read.states, want)  # bit-exact
    with torch.no_grad():
        live = model(tokens, lam=0.5, labels=labels)
        cached = model(tokens, lam=0.5, features=read, labels=labels)
        logits = model.trunk(tokens[:, :-1]).logits
    greedy = logits.argmax(-1)
    assert torch.equal(read.greedy, greedy) and torch.equal(first.greedy, greedy)
    ids, probs = trunk_top_k(logits, SOFT_TOP_K)  # the soft targets: the live forward's own
    assert torch.equal(read.topk_ids, ids) and torch.equal(read.topk_probs, probs)
    assert torch.equal(first.topk_ids, ids) and torch.equal(first.topk_probs, probs)
    torch.testing.assert_close(cached.head_losses, live.head_losses, rtol=0, atol=0)
    torch.testing.assert_close(cached.head_acc, live.head_acc, rtol=0, atol=0)
    torch.testing.assert_close(cached.main_loss, live.main_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(cached.main_acc, live.main_acc, rtol=1e-6, atol=0)
    torch.testing.assert_close(cached.loss, live.loss, rtol=1e-6, atol=0)


def test_bf16_storage_holds_the_live_states_rounded(tmp_path):
    model, tokens = frozen("deepseek"), rows()
    cache = FeatureCache(tmp_path, model, 1 << 30)  # bf16 by default
    cache.features(model, tokens)
    cache.close()
    read = FeatureCache(tmp_path, model, 1 << 30).features(model, tokens)
    want = live_states(model, tokens)
    assert torch.equal(read.states, want.bfloat16().float())
    assert not torch.equal(read.states, want)  # rounded indeed
    with torch.no_grad():
        live, cached = model(tokens, lam=0.5), model(tokens, lam=0.5, features=read)
    torch.testing.assert_close(cached.head_losses, live.head_losses, rtol=1e-2, atol=0)


def test_damaged_shards_are_errors_naming_the_file(tmp_path):
    model, tokens = frozen("bpd"), rows()
    cache = FeatureCache(tmp_path, model, 1 << 30)
    cache.features(model, tokens)
    cache.close()
    (shard,) = cache.folder.glob("shard-*.safetensors")
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:header])["states"]["data_offsets"]
    data[header + (begin + end) // 2] ^= 0x10  # one flipped bit in the states: its checksum fails
    shard.write_bytes(bytes(data))
    reopened = FeatureCache(tmp_path, model, 1 << 30)
    with pytest.raises(MultitokenError, match=f"{shard}.*checksum"):
        reopened.features(model, tokens)
    shard.write_bytes(bytes(data[:-100]))  # truncated: refused when the cache opens
    with pytest.raises(MultitokenError, match=str(shard)):
        FeatureCache(tmp_path, model, 1 << 30)


def flip_bit(shard, name: str) -> None:
    """Flip one bit in the middle of tensor ``name`` of a safetensors file, in place."""
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:header])[name]["data_offsets"]
    data[header + (begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("storage", ["bf16", "fp32"])
def test_the_top_k_round_trips_exactly(tmp_path, storage):
    model, tokens = frozen("bpd"), rows()
    cache = FeatureCache(tmp_path, model, 1 << 30, storage=storage, top_k=5)
    first = cache.features(model, tokens)
    cache.close()
    (shard,) = cache.folder.glob("shard-*.safetensors")
    read = FeatureCache(tmp_path, model, 1 << 30, storage=storage, top_k=5).features(model, tokens)
    live = live_features(model, tokens, 5)
    assert read.topk_ids.shape == (4, 12, 5) and read.topk_probs.shape == (4, 12, 5)
    for got in (first, read):
        assert torch.equal(got.topk_ids, live.topk_ids)
        assert torch.equal(got.topk_probs, live.topk_probs)
        assert torch.equal(got.greedy, live.topk_ids[..., 0])
    from safetensors.torch import load_file

    stored = load_file(str(shard))
    assert stored["topk_ids"].dtype == torch.int32 and stored["topk_probs"].dtype == torch.float16
    assert "greedy" not in stored  # the first of the top-k


def test_soft_targets_are_cached_and_read_under_bf16_autocast(tmp_path):
    """The trainer runs the cache under autocast, which refuses to stack fp16 tensors on the
    CPU: the probabilities stay fp32 in memory and become fp16 only in the shard."""
    model, tokens = frozen("deepseek"), rows()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = FeatureCache(tmp_path, model, 1 << 30, compute="bf16")
        first = cache.features(model, tokens)
        cache.flush()
        read = cache.features(model, tokens)
        live = model(tokens, lam=1.0, labels="soft")
        cached = model(tokens, lam=1.0, labels="soft", features=read)
    assert cache.stats.hits == 4
    assert torch.equal(read.topk_ids, first.topk_ids)
    assert torch.equal(read.topk_probs, first.topk_probs)
    assert torch.isfinite(cached.loss)
    torch.testing.assert_close(cached.head_losses, live.head_losses, rtol=2e-2, atol=0)


@pytest.mark.parametrize("name", ["topk_ids", "topk_probs"])
def test_a_damaged_top_k_fails_its_checksum(tmp_path, name):
    model, tokens = frozen("bpd"), rows()
    cache = FeatureCache(tmp_path, model, 1 << 30)
    cache.features(model, tokens)
    cache.close()
    (shard,) = cache.folder.glob("shard-*.safetensors")
    flip_bit(shard, name)
    with pytest.raises(MultitokenError, match=f"{shard}.*checksum"):
        FeatureCache(tmp_path, model, 1 << 30).features(model, tokens)


def test_an_old_format_or_other_top_k_cache_is_never_read(tmp_path, monkeypatch):
    model, tokens = frozen("bpd"), rows()
    with monkeypatch.context() as patch:  # a cache written by format 2 (greedy tokens only)
        patch.setattr(featcache, "FORMAT", 2)
        old = FeatureCache(tmp_path, model, 1 << 30)
        old.features(model, tokens)
        old.close()
    assert json.loads((old.folder / "fingerprint.json").read_text())["format"] == 2
    new = FeatureCache(tmp_path, model, 1 << 30)
    assert new.folder != old.folder and new.stats.held == 0  # a folder of its own
    other_k = FeatureCache(tmp_path, model, 1 << 30, top_k=4)
    assert other_k.folder not in (old.folder, new.folder) and other_k.stats.held == 0
    new.features(model, tokens)
    new.close()
    # a shard that says it is of another format, in the right folder, is refused
    (shard,) = new.folder.glob("shard-*.safetensors")
    data = shard.read_bytes()
    stamp = f'"format":"{featcache.FORMAT}"'.encode()
    assert data.count(stamp) == 1
    shard.write_bytes(data.replace(stamp, b'"format":"2"'))
    with pytest.raises(MultitokenError, match=f"{shard}.*header"):
        FeatureCache(tmp_path, model, 1 << 30)


def test_the_cap_bounds_what_is_stored_and_the_rest_is_recomputed(tmp_path):
    model, tokens = frozen("bpd"), rows(batch=6)
    row_bytes = 16 + 13 * 4 + 12 * 32 * 4 + 12 * 16 * 6 + 12 + 8  # key, tokens, states, top-k...
    cache = FeatureCache(tmp_path, model, 2 * row_bytes + 10, storage="fp32")
    cache.features(model, tokens)
    assert cache.stats.stored == 2
    read = cache.features(model, tokens)  # two rows read, four recomputed
    assert (cache.stats.hits, cache.stats.computed) == (2, 10)
    assert torch.equal(read.states, live_states(model, tokens))
    cache.close()
    assert sum(p.stat().st_size for p in cache.folder.glob("shard-*")) < 4 * row_bytes


def test_a_cache_made_for_other_trunk_weights_is_never_read(tmp_path):
    model, tokens = frozen("bpd"), rows()
    cache = FeatureCache(tmp_path, model, 1 << 30)
    cache.features(model, tokens)
    cache.close()
    with torch.no_grad():
        model.trunk.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3  # one weight, deep inside
    other = FeatureCache(tmp_path, model, 1 << 30)
    assert other.folder != cache.folder and other.stats.held == 0
    other.features(model, tokens)
    assert other.stats.computed == 4
    meta = other.folder / "fingerprint.json"  # a folder whose fingerprint disagrees is refused
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "storage": "fp32"}))
    with pytest.raises(MultitokenError, match="fingerprint.json"):
        FeatureCache(tmp_path, model, 1 << 30)


# --- the trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A plain model folder (micro Llama over bytes) and a small corpus of five files."""
    root = tmp_path_factory.mktemp("featcache")
    trunk_folder(root / "trunk")
    tiny_corpus(root / "corpus", files=5, words=90)
    return root


def train_heads(setup, out, **overrides) -> TrainResult:
    """Deepseek D = 2 heads on the frozen micro trunk, its states cached in fp32 (bit-exact)."""
    values = dict(
        trunk=str(setup / "trunk"),
        freeze_trunk=True,
        family="deepseek",
        depth=2,
        seq_len=32,
        batch_size=4,
        max_steps=16,
        eval_every=8,
        log_every=1,
        save_every=4,
        val_fraction=0.3,
        lr=3e-3,
        feature_cache_dtype="fp32",
    )
    values.update(overrides)
    return train_tiny(out, setup / "corpus", **values)


def train_curve(out) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


@pytest.mark.parametrize("labels", ["text", "soft"])
def test_a_cached_run_trains_the_heads_a_live_run_trains(setup, tmp_path, labels):
    cached = train_heads(setup, tmp_path / "cached", labels=labels)
    live = train_heads(setup, tmp_path / "live", feature_cache_gb=0, labels=labels)
    stats = cached.feature_cache
    assert live.feature_cache is None
    assert stats["hits"] > stats["computed"] > 0  # the rows come round again and are read back
    a, b = cached.model.heads.state_dict(), live.model.heads.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    for ma, mb in zip(train_curve(tmp_path / "cached"), train_curve(tmp_path / "live")):
        for key in ma.keys() - {"split"}:
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-5), (key, ma, mb)


def test_soft_labels_lower_the_heads_loss(setup, tmp_path):
    """Heads-only training on the trunk's own distributions (--labels soft) lowers every head's
    soft cross-entropy to them. The random micro trunk's logits are scaled up tenfold so its
    distributions are peaked like a trained model's (unscaled they are nearly uniform and a
    few steps teach little)."""
    trunk = micro_llama(0, vocab=ByteTokenizer.vocab_size)
    with torch.no_grad():
        trunk.lm_head.weight.mul_(10.0)
    with quiet_transformers():
        trunk.save_pretrained(tmp_path / "trunk")
    write_hf_tokenizer(ByteTokenizer(), tmp_path / "trunk")
    out = tmp_path / "soft"
    options = dict(labels="soft", soft_top_k=8, lr=1e-2, eval_every=16, save_every=16)
    train_heads(setup, out, trunk=str(tmp_path / "trunk"), **options)
    train = [m for m in train_curve(out) if m["split"] == "train"]
    assert len(train) == 16
    for k in range(2):
        curve = [m["head_losses"][k] for m in train]
        assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 1.0, (k, curve)
        acc = [m["head_acc"][k] for m in train]
        assert sum(acc[-4:]) > sum(acc[:4]), (k, acc)  # against the trunk's argmax at i + k


def test_a_resumed_run_reads_the_rows_cached_before_it(setup, tmp_path):
    def killed(step: int) -> None:
        if step == 10:  # after the step-8 checkpoint; steps 9-10 are lost with the process
            raise KeyboardInterrupt

    def short(out, **extra) -> TrainResult:
        return train_heads(setup, out, max_steps=12, eval_every=6, **extra)

    with pytest.raises(KeyboardInterrupt):
        short(tmp_path / "b", on_step=killed)
    resumed = short(tmp_path / "b", resume=True)
    stats = resumed.feature_cache
    # every row of an epoch was seen and written by the step-8 checkpoint: nothing recomputed
    assert stats["computed"] == 0 and stats["hits"] == 4 * 4 + 4, stats  # 4 steps + 1 eval
    whole = short(tmp_path / "a")
    a, b = train_curve(tmp_path / "a"), train_curve(tmp_path / "b")
    assert [(m["step"], m["split"]) for m in a] == [(m["step"], m["split"]) for m in b]
    for ma, mb in zip(a, b):
        for key in ma.keys() - {"split"}:
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), (key, ma, mb)
    assert whole.feature_cache["computed"] > 0


def test_per_file_rows_repeat_every_epoch_and_resume_exactly(setup):
    files = sorted((setup / "corpus").iterdir())
    stream = PackedStream(files, ByteTokenizer(), 32, 1, seed=3, per_file=True)
    seen: dict[int, list] = {}
    states = []
    for _ in range(120):
        states.append(stream.state_dict())
        row = tuple(next(stream)[0].tolist())
        seen.setdefault(stream._epoch, []).append(row)  # the epoch that cut it
    epochs = sorted(seen)[:-1]  # the last one may be cut short
    assert len(epochs) >= 3
    assert all(sorted(seen[e]) == sorted(seen[epochs[0]]) for e in epochs)
    assert seen[epochs[0]] != seen[epochs[1]]  # another file order
    flat = [row for e in sorted(seen) for row in seen[e]]
    for i in (0, 17, 55, 101):
        again = PackedStream(files, ByteTokenizer(), 32, 1, seed=3, per_file=True)
        again.load_state_dict(json.loads(json.dumps(states[i])))
        assert [tuple(next(again)[0].tolist()) for _ in range(19)] == flat[i : i + 19]
    with pytest.raises(MultitokenError, match="lower --seq-len") as err:  # all shorter than a row
        next(iter(PackedStream(files, ByteTokenizer(), 900, 1, per_file=True)))
    assert err.value.flag == "--seq-len"


def test_live_features_report_the_trunks_own_loss(tokens):
    model = frozen("bpd")
    feats = live_features(model, tokens)
    with torch.no_grad():
        out = model(tokens, lam=1.0)
    count = feats.main_count.sum()
    assert count == tokens.numel() - tokens.size(0)
    torch.testing.assert_close(feats.main_nll.sum() / count, out.main_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(feats.main_hits.sum() / count, out.main_acc, rtol=0, atol=0)


def test_a_row_repeated_in_one_batch_is_held_once_and_flushes(tmp_path):
    """Short documents make identical rows; both must read back, the shard holding one copy."""
    model = frozen("bpd")
    tokens = rows(batch=2)
    tokens = torch.cat([tokens, tokens[:1]])  # row 0 twice
    cache = FeatureCache(tmp_path, model, 1 << 30, storage="fp32")
    first = cache.features(model, tokens)
    cache.flush()
    assert (cache.stats.stored, cache.stats.held) == (2, 2)
    read = FeatureCache(tmp_path, model, 1 << 30, storage="fp32").features(model, tokens)
    assert torch.equal(read.states, first.states) and torch.equal(read.states[0], read.states[2])


def test_trunk_labels_train_the_heads_on_the_greedy_path_only():
    model = frozen("bpd")
    for tokens, on_path in ((greedy_rows(model), True), (rows(), False)):
        with torch.no_grad():
            trunk = model(tokens, lam=1.0, labels="trunk")
            out = model.trunk_forward(tokens[:, :-1])
            logits = model.heads(out.hidden)
        greedy = out.logits.argmax(-1)
        for k in (1, 2):
            labels = greedy_path_labels(tokens, greedy, k)
            want, _ = cross_entropy(logits[k - 1], labels)
            torch.testing.assert_close(trunk.head_losses[k - 1], want)
            if on_path:  # past the 3-token prompt the text is the greedy path: labels are its own
                assert torch.equal(labels[:, 2:], shift_labels(tokens, k)[:, 2:])
            else:  # random text seldom follows the trunk's top-1
                assert (labels != IGNORE).float().mean() < 0.2


def test_trunk_labels_need_a_frozen_trunk():
    from multitoken.config import TrainConfig

    with pytest.raises(MultitokenError, match="--freeze-trunk") as err:
        TrainConfig(labels="trunk").validate()
    assert err.value.flag == "--labels"
    with pytest.raises(MultitokenError, match="unknown labels"):
        TrainConfig(labels="teacher", freeze_trunk=True).validate()
    TrainConfig(labels="trunk", freeze_trunk=True).validate()
