"""The tests: the GPT and its KV cache, NGC eviction, rollout and replay, the Countdown task, the training job.

The model tests run a tiny GPT: vocabulary 40, width 32, 4 query heads over
2 key/value heads. Its weight matrices are drawn with ten times the usual
0.02 standard deviation, so attention is far from uniform and the choice of
evicted blocks changes the next tokens' log-probs. Every random draw takes a
seeded torch.Generator. Equivalence checks run in float32 with an absolute
tolerance of 1e-4.
"""

import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction

import pytest
import torch

import ngc
import rollout
import tasks
import train
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from ngc import EvictionConfig
from rollout import SamplingConfig

VOCAB = 40
STOP = VOCAB - 1  # stop token of the rollouts
NO_STOP = -1  # a stop id that no token matches, so every row runs to max_new_tokens
TOL = 1e-4  # absolute tolerance of the float32 equivalence checks
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # NOTE: the tensors here are tiny, so intra-op threads cost more than they
    # save. On a busy 2-core machine one rollout ran 40x slower with 2 threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------
# Helpers


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def tiny_gpt(seed=0, n_layer=2, n_kv_head=2):
    """Build a tiny GPT with weight matrices of std 0.2 (10x the usual init) and random q/k/v biases."""
    config = GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head, n_embd=32, max_seq_len=160)
    model = GPT(config)
    generator = seeded(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def random_prompts(lengths, generator):
    """Prompts of the given lengths, drawn from every token but the stop token."""
    return [torch.randint(0, STOP, (n,), generator=generator).tolist() for n in lengths]


def right_pad(rows):
    """Token-id lists as a right-padded (B, T) tensor and their lengths (B,)."""
    lengths = torch.tensor([len(r) for r in rows])
    idx = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r)] = torch.tensor(r)
    return idx, lengths


def run_cache(model, prompts, steps, window=3, track_attention=False):
    """Prefill prompts (B lists of token ids), then decode steps (N, B) one row of tokens at a time."""
    idx, lengths = right_pad(prompts)
    cache = model.new_cache(len(prompts), window, track_attention=track_attention)
    with torch.no_grad():
        model.prefill(idx, lengths, cache)
        for tokens in steps:
            model.decode(tokens, cache)
    return cache


def filled_cache(model, prompt_lengths, n_decode, seed, window=3):
    """Prefill random prompts and decode n_decode random tokens in every row.

    Returns the cache and each row's token ids so far (prompt then decoded).
    """
    generator = seeded(seed)
    prompts = random_prompts(prompt_lengths, generator)
    steps = torch.randint(0, STOP, (n_decode, len(prompts)), generator=generator)
    cache = run_cache(model, prompts, steps, window)
    rows = [p + steps[:, b].tolist() for b, p in enumerate(prompts)]
    return cache, rows


def snapshot(cache):
    """Copies of every per-layer cache tensor and of next_pos."""
    copies = {name: [t.clone() for t in getattr(cache, name)] for name in ("k", "v", "pos", "valid", "fill")}
    return dict(copies, next_pos=cache.next_pos.clone())


def rollout_and_replay(model, prompts, ecfg, scfg, policy="ngc", seed=0, stop_id=STOP):
    """Sample trajectories, then replay them without autograd."""
    traj = rollout.generate(model, prompts, stop_id, policy=policy, ecfg=ecfg, scfg=scfg, generator=seeded(seed))
    with torch.no_grad():
        token_lp, evict_lp = rollout.replay(model, traj, ecfg, scfg)
    return traj, token_lp, evict_lp


def live_before_round(traj, layer, r):
    """Positions (sorted) in a layer's cache when round r fires, read from the eviction times alone."""
    b, t = int(traj.round_row[r]), int(traj.round_time[r])
    evict_time = traj.evict_time[layer, b]
    positions = torch.arange(len(evict_time))
    return positions[(positions <= t) & (evict_time > t)]


def visible_counts(traj, layer, b):
    """Entries the query at each written position saw in one layer, read from the eviction times alone."""
    written = int(traj.prompt_len[b] + traj.response_len[b]) - 1  # the last response token is never fed back
    evict_time = traj.evict_time[layer, b]
    j = torch.arange(written)
    sees = (j[None, :] <= j[:, None]) & (evict_time[None, :written] > j[:, None])  # (query, key)
    return sees.sum(1)


def expected_keep(n_blocks, eps):
    """ceil((1 - eps) * n_blocks) in exact rational arithmetic."""
    return math.ceil((1 - Fraction(str(eps))) * n_blocks)


def check_round_bookkeeping(traj, ecfg, row_eps=None):
    """Check every round in every layer against the eviction times: blocks, keep count, evicted entries.

    row_eps (a list, one rate per row) replaces ecfg.eps where given.
    """
    L, R = traj.round_blocks.shape
    b = ecfg.block_size
    for layer in range(L):
        for r in range(R):
            where = f"layer {layer}, round {r}"
            row, t = int(traj.round_row[r]), int(traj.round_time[r])
            eps = ecfg.eps if row_eps is None else row_eps[row]
            live = live_before_round(traj, layer, r)
            n_blocks = math.ceil(len(live) / b)
            assert int(traj.round_blocks[layer, r]) == n_blocks, where

            order = traj.round_order[layer, r]
            kept_blocks = order[order >= 0]
            assert len(kept_blocks) == expected_keep(n_blocks, eps), where
            assert len(set(kept_blocks.tolist())) == len(kept_blocks), where

            evicted_now = (traj.evict_time[layer, row] == t + 1).nonzero()[:, 0]
            block_of_live = torch.arange(len(live)) // b
            unkept = ~torch.isin(block_of_live, kept_blocks)
            assert evicted_now.tolist() == live[unkept].tolist(), where


def round_times(prompt_len, response_len, delta):
    """Positions after which rounds fire, worked out without rollout.py.

    The cache has seen prompt_len + response_len - 1 tokens at the end because
    the last response token is never fed back. A round fires when the count
    of tokens written reaches a multiple of delta, and once right after
    prefill if the prompt alone reaches delta.
    """
    written = prompt_len + response_len - 1
    counts = [prompt_len] if prompt_len >= delta else []
    counts += [c for c in range(prompt_len + 1, written + 1) if c % delta == 0]
    return [c - 1 for c in counts]


# ---------------------------------------------------------------------------
# Plackett-Luce log-probability and Gumbel-top-k sampling

PL_CASES = [
    # (block logits, blocks that exist, blocks drawn)
    ([0.3, -1.2, 2.0, 0.7], 4, 2),
    ([0.3, -1.2, 2.0, 0.7], 4, 4),
    ([1.5, 0.0, -0.5, ngc.NEG, ngc.NEG], 3, 2),
    ([0.1, 0.2, 0.3, 0.4, 0.5], 5, 1),
    ([0.9, 0.9, -3.0, 0.0, 4.0], 5, 3),
]


def enumerated_prob(logits, n_blocks, order):
    """Probability of drawing `order` without replacement, one softmax over the remaining blocks at a time."""
    remaining = list(range(n_blocks))
    p = 1.0
    for i in order:
        p *= math.exp(logits[i]) / sum(math.exp(logits[j]) for j in remaining)
        remaining.remove(i)
    return p


def pl_logprobs(logits, n_blocks, orders):
    """plackett_luce_logprob of each order in `orders` (a list of tuples), as one batch."""
    N = len(orders)
    order = torch.tensor(orders, dtype=torch.long)
    return ngc.plackett_luce_logprob(torch.tensor(logits).expand(N, -1), order, torch.full((N,), n_blocks))


@pytest.mark.parametrize("logits, n_blocks, k", PL_CASES)
def test_plackett_luce_matches_enumeration(logits, n_blocks, k):
    orders = list(itertools.permutations(range(n_blocks), k))
    got = pl_logprobs(logits, n_blocks, orders)
    want = torch.tensor([math.log(enumerated_prob(logits, n_blocks, o)) for o in orders])
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("logits, n_blocks, k", PL_CASES)
def test_plackett_luce_sums_to_one(logits, n_blocks, k):
    orders = list(itertools.permutations(range(n_blocks), k))
    total = pl_logprobs(logits, n_blocks, orders).double().exp().sum()
    assert abs(float(total) - 1.0) <= 1e-5


def test_plackett_luce_ignores_padding():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.5, 0.0, -0.5, ngc.NEG]])
    n_blocks = torch.tensor([4, 3])
    padded = ngc.plackett_luce_logprob(logits, torch.tensor([[2, 0, -1], [1, -1, -1]]), n_blocks)
    short = torch.tensor([math.log(enumerated_prob(logits[0].tolist(), 4, (2, 0))),
                          math.log(enumerated_prob(logits[1].tolist(), 3, (1,)))])
    assert (padded - short).abs().max() <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_gumbel_top_k_frequencies(seed):
    # 20k samples; each of the 12 ordered pairs must be within 4 standard
    # errors, sqrt(p (1 - p) / N), of its Plackett-Luce probability. For a
    # correct sampler a fresh seed fails with probability under 1e-3.
    N = 20_000
    logits = [0.3, -1.2, 2.0, 0.7, ngc.NEG]
    n_blocks, n_keep = 4, 2
    order = ngc.sample_keep(torch.tensor(logits).expand(N, -1), torch.full((N,), n_blocks),
                            torch.full((N,), n_keep), generator=seeded(seed))
    counts = Counter(tuple(o) for o in order.tolist())
    orders = list(itertools.permutations(range(n_blocks), n_keep))
    assert set(counts) <= set(orders), "a sample repeated a block or drew a missing one"

    probs = pl_logprobs(logits, n_blocks, orders).exp().tolist()
    for o, p in zip(orders, probs):
        freq = counts[o] / N
        tolerance = 4 * math.sqrt(p * (1 - p) / N)
        assert abs(freq - p) <= tolerance, f"order {o}: frequency {freq:.4f}, probability {p:.4f}"


def test_sample_keep_greedy_takes_top_k():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.7], [0.3, -1.2, 2.0, 0.7]])
    order = ngc.sample_keep(logits, torch.tensor([4, 2]), torch.tensor([3, 1]), greedy=True)
    assert order.tolist() == [[2, 3, 0], [0, -1, -1]]


def test_sample_keep_ties_take_lower_index():
    """Guards a bug where torch.topk kept an arbitrary one of equal-scored blocks, not the lower index first."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0], [0.0] * 5, [2.0, 2.0, 2.0, 2.0, ngc.NEG]])
    order = ngc.sample_keep(logits, torch.tensor([5, 5, 4]), torch.tensor([2, 3, 4]), greedy=True)
    assert order.tolist() == [[1, 2, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]]


def test_kept_mask_keeps_block_zero():
    """Guards a bug where the -1 padding, clamped to index 0 and scattered, overwrote a real keep of block 0."""
    order = torch.tensor([[0, -1, -1], [2, 0, -1], [1, -1, -1]])
    want = torch.tensor([[True, False, False], [True, False, True], [False, True, False]])
    assert torch.equal(ngc.kept_mask(order, 3), want)


@pytest.mark.parametrize("n_blocks, eps, n_keep", [
    (1, 0.5, 1), (2, 0.5, 1), (3, 0.5, 2), (10, 0.5, 5), (10, 0.7, 3), (10, 0.1, 9),
    (7, 0.25, 6), (1, 0.99, 1), (5, 0.0, 5), (0, 0.5, 0), (1, 0.9999999, 1), (1000, 0.9999999, 1),
])
def test_n_keep_blocks_rounds_up(n_blocks, eps, n_keep):
    assert int(ngc.n_keep_blocks(torch.tensor(n_blocks), eps)) == n_keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_n_keep_blocks_tensor_rate(dtype):
    """Guards a bug where a float32 rate 0.7, stored as 0.69999999, kept 4 of 10 blocks in place of 3."""
    eps = torch.tensor([0.7, 0.7, 0.5, 0.1], dtype=dtype)
    n_keep = ngc.n_keep_blocks(torch.tensor([10, 20, 3, 10]), eps)
    assert n_keep.tolist() == [3, 6, 2, 9]


# ---------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_decode_matches_forward(n_kv_head):
    model = tiny_gpt(seed=1, n_kv_head=n_kv_head)
    seq = torch.randint(0, VOCAB, (1, 20), generator=seeded(1))
    P = 6
    with torch.no_grad():
        full = model(seq)[0, P - 1:]  # (T - P + 1, V)
        cache = model.new_cache(1, window=3)
        cached = [model.prefill(seq[:, :P], torch.tensor([P]), cache)[0]]
        for t in range(P, seq.shape[1]):
            cached.append(model.decode(seq[:, t], cache)[0])
    assert (torch.stack(cached) - full).abs().max() <= TOL


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_attention_weights_match_sdpa(n_kv_head):
    """The weights the scorers read, applied to the values, give torch's grouped-query attention."""
    from model import attention_weights
    generator = seeded(3)
    q = torch.randn(2, 4, 5, 8, generator=generator)
    k = torch.randn(2, n_kv_head, 7, 8, generator=generator)
    v = torch.randn(2, n_kv_head, 7, 8, generator=generator)
    mask = torch.rand(2, 1, 5, 7, generator=generator) < 0.7
    mask[..., 0] = True  # every query can attend to at least one key
    weights = attention_weights(q, k, mask)  # (2, 4, 5, 7)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (weights @ v.repeat_interleave(4 // n_kv_head, dim=1) - expected).abs().max() <= TOL


def test_batched_decode_matches_unbatched():
    model = tiny_gpt(seed=2)
    generator = seeded(2)
    lengths, n_steps = [6, 2, 11], 8
    seqs = [torch.randint(0, STOP, (n + n_steps,), generator=generator) for n in lengths]
    idx, prompt_len = right_pad([s[:n].tolist() for s, n in zip(seqs, lengths)])

    # row 1 leaves the cache after 3 steps, as a finished row does; the others go on
    cache = model.new_cache(3, window=3)
    with torch.no_grad():
        last = model.prefill(idx, prompt_len, cache)
        got = [[last[b]] for b in range(3)]
        rows = [0, 1, 2]
        for step in range(n_steps):
            if step == 3:
                cache.keep_rows(torch.tensor([0, 2]))
                rows = [0, 2]
            tokens = torch.stack([seqs[b][lengths[b] + step] for b in rows])
            logits = model.decode(tokens, cache)
            for i, b in enumerate(rows):
                got[b].append(logits[i])
        for b in range(3):
            want = model(seqs[b][None, :len(got[b]) + lengths[b] - 1])[0, lengths[b] - 1:]
            assert (torch.stack(got[b]) - want).abs().max() <= TOL, f"row {b}"

    assert [len(g) for g in got] == [n_steps + 1, 4, n_steps + 1]
    assert cache.next_pos.tolist() == [lengths[0] + n_steps, lengths[2] + n_steps]
    assert cache.lengths().tolist() == [[lengths[b] + n_steps] * model.config.n_layer for b in (0, 2)]


@pytest.mark.parametrize("policy", ["none", "ngc-greedy", "h2o", "snapkv", "streamingllm"])
def test_generate_batch_matches_single_rows(policy):
    model = tiny_gpt(seed=3)
    prompts = random_prompts([3, 10, 1, 7], seeded(3))
    ecfg = EvictionConfig(delta=5, eps=0.5, block_size=3, window=3)
    scfg = SamplingConfig(max_new_tokens=24, temperature=0)
    batch = rollout.generate(model, prompts, STOP, policy=policy, ecfg=ecfg, scfg=scfg)
    for b, prompt in enumerate(prompts):
        single = rollout.generate(model, [prompt], STOP, policy=policy, ecfg=ecfg, scfg=scfg)
        assert batch.response(b) == single.response(0), f"row {b}"
        assert (batch.logp[b] - single.logp[0]).abs().max() <= TOL, f"row {b}"
        assert int(batch.n_rounds[b]) == int(single.n_rounds[0]), f"row {b}"
        assert int(batch.peak_entries[b].max()) == int(single.peak_entries[0].max()), f"row {b}"


@pytest.mark.parametrize("policy, eps", [("none", 0.5), ("ngc", 0.0), ("ngc-greedy", 0.0)])
def test_greedy_generate_matches_forward(policy, eps):
    model = tiny_gpt(seed=4)
    prompt = random_prompts([7], seeded(4))[0]
    ecfg = EvictionConfig(delta=4, eps=eps, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=20, temperature=0)
    traj = rollout.generate(model, [prompt], NO_STOP, policy=policy, ecfg=ecfg, scfg=scfg, generator=seeded(4))

    seq, logps = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(scfg.max_new_tokens):
            logits = model(seq)[0, -1]
            token = logits.argmax()
            logps.append(logits.log_softmax(-1)[token])
            seq = torch.cat([seq, token.view(1, 1)], dim=1)
    assert traj.tokens[0].tolist() == seq[0].tolist()
    assert (traj.logp[0] - torch.stack(logps)).abs().max() <= TOL
    assert traj.round_row.numel() == 0


# ---------------------------------------------------------------------------
# Eviction on the cache: kept entries, positions, no-eviction identity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evict_keeps_entries_unchanged(seed):
    model = tiny_gpt(seed=seed)
    cache, _ = filled_cache(model, [7, 12, 4], n_decode=5, seed=seed)
    before = snapshot(cache)
    rows = torch.tensor([0, 2])
    ecfg = EvictionConfig(delta=4, eps=0.5, block_size=2, window=3)
    ngc.evict(cache, rows, ecfg, "ngc", generator=seeded(seed))

    for layer in range(cache.n_layer):
        for b in rows.tolist():
            where = f"layer {layer}, row {b}"
            valid_before = before["valid"][layer][b]
            slot_of = {int(p): s for s, p in enumerate(before["pos"][layer][b]) if valid_before[s]}
            live = cache.valid[layer][b]
            n_live = int(live.sum())
            kept_pos = cache.pos[layer][b][live]
            source = torch.tensor([slot_of[int(p)] for p in kept_pos])
            assert int(cache.fill[layer][b]) == n_live, where
            assert live[:n_live].all(), where
            assert n_live < int(valid_before.sum()), where
            assert (kept_pos[1:] > kept_pos[:-1]).all(), where
            assert torch.equal(cache.k[layer][b][:, live], before["k"][layer][b][:, source]), where
            assert torch.equal(cache.v[layer][b][:, live], before["v"][layer][b][:, source]), where

        # row 1 is not in the round
        assert torch.equal(cache.k[layer][1], before["k"][layer][1]), f"layer {layer}"
        assert torch.equal(cache.pos[layer][1], before["pos"][layer][1]), f"layer {layer}"
        assert torch.equal(cache.valid[layer][1], before["valid"][layer][1]), f"layer {layer}"
    assert torch.equal(cache.next_pos, before["next_pos"])


def score_input(cache, layer, rows, prompt_len):
    """The ScoreInput that ngc.evict builds for rows (R,) of one layer."""
    S = cache.span(layer)
    return ngc.ScoreInput(
        q=cache.q_recent[layer][rows], q_pos=cache.q_pos[rows],
        k=cache.k[layer][rows, :, :S], pos=cache.pos[layer][rows, :S], valid=cache.valid[layer][rows, :S],
        prompt_len=prompt_len[rows], attn_sum=cache.attn_sum[layer][rows, :S] if cache.track_attention else None,
        generator=None,
    )


@pytest.mark.parametrize("policy", [p for p in ngc.SCORERS if p != "random"])
def test_scores_batch_match_single_rows(policy):
    """Guards a bug where SnapKV pooled over other rows' padding slots and StreamingLLM scaled by the batch's latest position."""
    model = tiny_gpt(seed=17)
    generator = seeded(17)
    prompts = random_prompts([4, 12, 7], generator)
    steps = torch.randint(0, STOP, (5, 3), generator=generator)
    track = policy == "h2o"
    batch = run_cache(model, prompts, steps, track_attention=track)
    prompt_len = torch.tensor([len(p) for p in prompts])
    scorer = ngc.SCORERS[policy]
    for b, prompt in enumerate(prompts):
        single = run_cache(model, [prompt], steps[:, b:b + 1], track_attention=track)
        for layer in range(model.config.n_layer):
            in_batch = scorer(score_input(batch, layer, torch.arange(3), prompt_len))[b]
            alone = scorer(score_input(single, layer, torch.arange(1), prompt_len[b:b + 1]))[0]
            n = int(single.fill[layer][0])
            assert (in_batch[:n] - alone[:n]).abs().max() <= 1e-5, f"row {b}, layer {layer}"


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_streamingllm_keeps_sinks(block_size):
    """Regression: sink scores used to be diluted by the block mean, so blocks of 16 or more evicted the sinks."""
    model = tiny_gpt(seed=5)
    cache, _ = filled_cache(model, [70, 90], n_decode=10, seed=5)
    ecfg = EvictionConfig(delta=8, eps=0.5, block_size=block_size, window=3)
    rows = torch.arange(2)
    ngc.evict(cache, rows, ecfg, "streamingllm", prompt_len=torch.tensor([70, 90]))
    for layer in range(model.config.n_layer):
        for b in range(2):
            kept = cache.pos[layer][b][cache.valid[layer][b]]
            assert all(p in kept.tolist() for p in range(4)), (layer, b)


def test_random_baseline_keeps_prompt():
    model = tiny_gpt(seed=6)
    cache, _ = filled_cache(model, [20, 12], n_decode=60, seed=6)
    ecfg = EvictionConfig(delta=8, eps=0.5, block_size=8, window=3)
    ngc.evict(cache, torch.arange(2), ecfg, "random", generator=seeded(0), prompt_len=torch.tensor([20, 12]))
    for layer in range(model.config.n_layer):
        for b, prompt in enumerate([20, 12]):
            kept = cache.pos[layer][b][cache.valid[layer][b]].tolist()
            assert all(p in kept for p in range(prompt)), (layer, b)


def test_next_position_counts_evicted():
    model = tiny_gpt(seed=5)
    cache, rows = filled_cache(model, [7, 12, 4], n_decode=5, seed=5)
    counts = torch.tensor([len(r) for r in rows])
    ecfg = EvictionConfig(delta=4, eps=0.75, block_size=2, window=3)
    ngc.evict(cache, torch.arange(3), ecfg, "ngc", generator=seeded(5))
    assert torch.equal(cache.next_pos, counts)
    assert (cache.lengths() < counts[:, None]).all()

    with torch.no_grad():
        model.decode(torch.tensor([1, 2, 3]), cache)
    for layer in range(cache.n_layer):
        newest = cache.fill[layer] - 1  # (B,) slot of the token just written
        assert torch.equal(cache.pos[layer][torch.arange(3), newest], counts), f"layer {layer}"
    assert torch.equal(cache.next_pos, counts + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_after_eviction_matches_replay(seed):
    model = tiny_gpt(seed=seed, n_layer=3)
    cache, rows = filled_cache(model, [7, 12, 4], n_decode=5, seed=seed)
    counts = [len(r) for r in rows]
    ecfg = EvictionConfig(delta=4, eps=0.5, block_size=2, window=3)
    records = ngc.evict(cache, torch.arange(3), ecfg, "ngc", generator=seeded(seed))
    next_tokens = torch.tensor([5, 6, 7])
    with torch.no_grad():
        decoded = model.decode(next_tokens, cache)

    # rebuild the visibility from the round's record and replay the whole sequences
    idx, _ = right_pad([r + [t] for r, t in zip(rows, next_tokens.tolist())])
    L, (B, T) = cache.n_layer, idx.shape
    evict_time = torch.full((L, B, T), T, dtype=torch.int32)
    for layer, record in enumerate(records):
        r_idx, s_idx = record["evicted"].nonzero(as_tuple=True)
        evict_time[layer, r_idx, record["positions"][r_idx, s_idx]] = torch.tensor(counts)[r_idx].int()
    with torch.no_grad():
        logits, _, _ = model.replay(idx, ngc.replay_masks(evict_time))
    replayed = logits[torch.arange(B), torch.tensor(counts)]
    assert (evict_time < T).any()
    assert (decoded - replayed).abs().max() <= TOL


def test_evict_eps_zero_keeps_everything():
    model = tiny_gpt(seed=6)
    evicted_cache, _ = filled_cache(model, [7, 12, 4], n_decode=5, seed=6)
    full_cache, _ = filled_cache(model, [7, 12, 4], n_decode=5, seed=6)
    ecfg = EvictionConfig(delta=4, eps=0.0, block_size=2, window=3)
    records = ngc.evict(evicted_cache, torch.arange(3), ecfg, "ngc", generator=seeded(6))
    for layer, record in enumerate(records):
        assert not record["evicted"].any(), f"layer {layer}"
        assert torch.equal(evicted_cache.k[layer], full_cache.k[layer]), f"layer {layer}"
        assert torch.equal(evicted_cache.pos[layer], full_cache.pos[layer]), f"layer {layer}"
        assert torch.equal(evicted_cache.valid[layer], full_cache.valid[layer]), f"layer {layer}"

    with torch.no_grad():
        for token in [3, 9, 27]:
            tokens = torch.full((3,), token)
            assert torch.equal(model.decode(tokens, evicted_cache), model.decode(tokens, full_cache)), f"token {token}"


def test_generate_eps_zero_equals_full_cache():
    model = tiny_gpt(seed=7)
    prompts = random_prompts([3, 8, 12], seeded(7))
    ecfg = EvictionConfig(delta=4, eps=0.0, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=20)
    full = rollout.generate(model, prompts, STOP, policy="none", ecfg=ecfg, scfg=scfg, generator=seeded(7))
    no_eviction = rollout.generate(model, prompts, STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(7))
    assert torch.equal(no_eviction.tokens, full.tokens)
    assert torch.equal(no_eviction.logp, full.logp)
    assert no_eviction.round_row.numel() == 0
    assert (no_eviction.evict_time >= no_eviction.tokens.shape[1]).all()


# ---------------------------------------------------------------------------
# Rounds: cadence, keep share, bound on the cache size


@pytest.mark.parametrize("delta", [3, 4, 8])
def test_round_fires_at_cadence(delta):
    model = tiny_gpt(seed=8)
    prompt_lengths = [1, 4, 8, 13]
    prompts = random_prompts(prompt_lengths, seeded(8))
    ecfg = EvictionConfig(delta=delta, eps=0.5, block_size=2, window=3)
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg,
                            scfg=SamplingConfig(max_new_tokens=20), generator=seeded(8))
    for b, n in enumerate(prompt_lengths):
        times = traj.round_time[traj.round_row == b].tolist()
        assert times == round_times(n, int(traj.response_len[b]), delta), f"row {b}"
        if n >= delta:
            assert times[0] == n - 1, f"row {b}: no round right after prefill"


@pytest.mark.parametrize("ecfg", [
    EvictionConfig(delta=8, eps=0.5, block_size=4, window=3),
    EvictionConfig(delta=6, eps=0.5, block_size=4, window=3),
    EvictionConfig(delta=4, eps=0.75, block_size=3, window=2),
    EvictionConfig(delta=10, eps=0.25, block_size=5, window=5),
    EvictionConfig(delta=5, eps=0.5, block_size=1, window=3),
], ids=lambda c: f"d{c.delta}-e{c.eps}-b{c.block_size}")
def test_cache_never_exceeds_bound(ecfg):
    model = tiny_gpt(seed=9)
    prompt_lengths = [2, 9, 17]
    prompts = random_prompts(prompt_lengths, seeded(9))
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg,
                            scfg=SamplingConfig(max_new_tokens=100), generator=seeded(9))
    for b, n in enumerate(prompt_lengths):
        bound = ngc.cache_bound(n, ecfg)
        written = n + int(traj.response_len[b]) - 1
        for layer in range(model.config.n_layer):
            where = f"row {b}, layer {layer}"
            peak = int(visible_counts(traj, layer, b).max())
            assert peak == int(traj.peak_entries[b, layer]), where
            assert peak <= bound, where
            assert peak < written, where


@pytest.mark.parametrize("ecfg", [
    EvictionConfig(delta=5, eps=0.6, block_size=3, window=3),
    EvictionConfig(delta=10, eps=0.7, block_size=1, window=3),
], ids=lambda c: f"d{c.delta}-e{c.eps}-b{c.block_size}")
def test_round_keeps_ceil_share(ecfg):
    """Guards a bug where a float32 rate of 0.7 kept ceil(10 * 0.30000001) = 4 of 10 blocks in place of 3."""
    model = tiny_gpt(seed=10, n_layer=3)
    prompts = random_prompts([2, 9, 17], seeded(10))
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg,
                            scfg=SamplingConfig(max_new_tokens=40), generator=seeded(10))
    n_kept = (traj.round_order >= 0).sum(2)  # (L, R)
    assert traj.round_row.numel() > 0
    assert torch.equal(n_kept, ngc.n_keep_blocks(traj.round_blocks, ecfg.eps))
    assert (n_kept < traj.round_blocks).any()
    check_round_bookkeeping(traj, ecfg)


def test_row_eps_sets_each_row_share():
    model = tiny_gpt(seed=18, n_layer=3)
    row_eps = [0.0, 0.5, 0.7]
    prompts = random_prompts([4, 9, 6], seeded(18))
    ecfg = EvictionConfig(delta=10, eps=0.5, block_size=1, window=3)
    scfg = SamplingConfig(max_new_tokens=30)
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(18),
                            row_eps=torch.tensor(row_eps))
    with torch.no_grad():
        token_lp, evict_lp = rollout.replay(model, traj, ecfg, scfg)
    assert traj.n_rounds.tolist()[0] == 0
    assert (traj.n_rounds[1:] > 0).all()
    check_round_bookkeeping(traj, ecfg, row_eps)
    assert (token_lp - traj.logp).abs().max() <= TOL
    assert (evict_lp - traj.round_logp).abs().max() <= TOL


def test_layers_choose_own_entries():
    model = tiny_gpt(seed=11, n_layer=3)
    prompts = random_prompts([5, 9], seeded(11))
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg,
                            scfg=SamplingConfig(max_new_tokens=30), generator=seeded(11))
    assert not torch.equal(traj.evict_time[0], traj.evict_time[1])


@pytest.mark.parametrize("policy", [p for p in rollout.POLICIES if p != "none"])
def test_policy_keeps_same_share(policy):
    model = tiny_gpt(seed=12)
    prompt_lengths = [3, 9, 14]
    prompts = random_prompts(prompt_lengths, seeded(12))
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=30)
    traj, token_lp, evict_lp = rollout_and_replay(model, prompts, ecfg, scfg, policy, seed=12)

    assert traj.round_row.numel() > 0
    check_round_bookkeeping(traj, ecfg)
    for b, n in enumerate(prompt_lengths):
        assert int(traj.peak_entries[b].max()) <= ngc.cache_bound(n, ecfg), f"row {b}"
    assert (token_lp - traj.logp).abs().max() <= TOL
    if policy.startswith("ngc"):
        assert (evict_lp - traj.round_logp).abs().max() <= TOL
    else:
        assert not traj.round_logp.any()


# ---------------------------------------------------------------------------
# Replay equivalence and the eviction term's gradient

REPLAY_CONFIGS = [
    EvictionConfig(delta=8, eps=0.5, block_size=4, window=3),
    EvictionConfig(delta=5, eps=0.25, block_size=3, window=5),
    EvictionConfig(delta=4, eps=0.75, block_size=1, window=2),
    EvictionConfig(delta=12, eps=0.6, block_size=5, window=4),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ecfg", REPLAY_CONFIGS, ids=lambda c: f"d{c.delta}-e{c.eps}-b{c.block_size}-w{c.window}")
def test_replay_matches_rollout(ecfg, seed):
    model = tiny_gpt(seed=seed, n_layer=3)
    prompts = random_prompts([3, 9, 14, 1], seeded(100 + seed))
    traj, token_lp, evict_lp = rollout_and_replay(model, prompts, ecfg, SamplingConfig(max_new_tokens=40), seed=seed)
    assert traj.round_row.numel() > 0
    assert (traj.evict_time < traj.tokens.shape[1]).any()
    assert (token_lp - traj.logp).abs().max() <= TOL
    assert (evict_lp - traj.round_logp).abs().max() <= TOL


def test_replay_without_masks_differs():
    model = tiny_gpt(seed=0, n_layer=3)
    prompts = random_prompts([3, 9, 14, 1], seeded(100))
    ecfg, scfg = REPLAY_CONFIGS[0], SamplingConfig(max_new_tokens=40)
    traj = rollout.generate(model, prompts, STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(0))
    with torch.no_grad():
        causal_lp, _ = rollout.replay(model, traj, ecfg, scfg, masked=False)
    assert (causal_lp - traj.logp).abs().max() > 0.1


def test_replay_matches_with_top_k_temperature():
    model = tiny_gpt(seed=13, n_layer=3)
    prompts = random_prompts([3, 9, 14], seeded(13))
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=30, temperature=0.7, top_k=5)
    traj, token_lp, evict_lp = rollout_and_replay(model, prompts, ecfg, scfg, seed=13)
    assert traj.round_row.numel() > 0
    assert (token_lp - traj.logp).abs().max() <= TOL
    assert (evict_lp - traj.round_logp).abs().max() <= TOL


def test_replay_matches_with_long_prompt():
    model = tiny_gpt(seed=14, n_layer=3)
    prompt_lengths = [20, 13]
    prompts = random_prompts(prompt_lengths, seeded(14))
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    traj, token_lp, evict_lp = rollout_and_replay(model, prompts, ecfg, SamplingConfig(max_new_tokens=30), seed=14)
    for b, n in enumerate(prompt_lengths):
        assert traj.round_time[traj.round_row == b][0] == n - 1, f"row {b}"
        assert int(traj.peak_entries[b].max()) <= ngc.cache_bound(n, ecfg), f"row {b}"
    assert (token_lp - traj.logp).abs().max() <= TOL
    assert (evict_lp - traj.round_logp).abs().max() <= TOL


def test_eviction_gradient_reaches_projections():
    model = tiny_gpt(seed=15, n_layer=3)
    prompts = random_prompts([4, 10], seeded(15))
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=24)
    traj = rollout.generate(model, prompts, NO_STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(15))
    _, evict_lp = rollout.replay(model, traj, ecfg, scfg)
    evict_lp.sum().backward()
    for layer, block in enumerate(model.layers):
        for name in ("q_proj", "k_proj"):
            grad = getattr(block.self_attn, name).weight.grad
            assert grad is not None, f"layer {layer} {name}"
            assert torch.isfinite(grad).all(), f"layer {layer} {name}"
            assert grad.abs().max() > 0, f"layer {layer} {name}"


# ---------------------------------------------------------------------------
# Invalid settings


@pytest.mark.parametrize("make, kwargs, message", [
    (EvictionConfig, dict(delta=0), "delta=0"),
    (EvictionConfig, dict(delta=-3), "delta=-3"),
    (EvictionConfig, dict(eps=-0.1), "eps=-0.1"),
    (EvictionConfig, dict(eps=1.0), "eps=1.0"),
    (EvictionConfig, dict(eps=1.5), "eps=1.5"),
    (EvictionConfig, dict(block_size=0), "block_size=0"),
    (EvictionConfig, dict(window=0), "window=0"),
    (EvictionConfig, dict(score_temperature=0.0), "score_temperature=0.0"),
    (GPTConfig, dict(n_embd=30, n_head=4), "n_embd=30"),
    (GPTConfig, dict(n_head=4, n_kv_head=3), "n_kv_head=3"),
    (GPTConfig, dict(n_embd=12, n_head=4, n_kv_head=4), "head size 3"),
    (SamplingConfig, dict(max_new_tokens=0), "max_new_tokens=0"),
    (SamplingConfig, dict(temperature=-1.0), "temperature=-1.0"),
    (SamplingConfig, dict(top_k=-1), "top_k=-1"),
])
def test_invalid_setting_raises(make, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(evict_coef=-1.0), "evict_coef=-1.0"),
    (dict(evict_coef=float("nan")), "evict_coef=nan"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(group_size=1), "group_size=1"),
    (dict(curriculum_steps=-5), "curriculum_steps=-5"),
    (dict(rl_steps=40), "curriculum_steps=50: with rl_steps=40"),
    (dict(replay_batch=0), "replay_batch=0"),
])
def test_train_config_invalid(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.validate(train.Config(**kwargs))


def test_generate_rejects_unknown_policy():
    with pytest.raises(ValueError, match="'lru'"):
        rollout.generate(tiny_gpt(), [[1, 2]], STOP, policy="lru")


def test_generate_rejects_empty_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        rollout.generate(tiny_gpt(), [[1, 2], []], STOP, policy="none")


# =============================================================================
# The Countdown task: tokenizer, problems, traces, prompt, parser, reward


# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_vocab_size():
    assert tasks.get_tokenizer().n_vocab == tasks.VOCAB_SIZE


def test_tokenizer_special_ids():
    assert tasks.encode("<|bos|>") == [tasks.BOS_ID]
    assert tasks.encode("<|end|>") == [tasks.STOP_ID]
    assert tasks.encode("<answer>") == [tasks.ANSWER_OPEN_ID]
    assert tasks.encode("</answer>") == [tasks.ANSWER_CLOSE_ID]
    assert min(tasks.SPECIAL_TOKENS.values()) == 256
    assert max(tasks.SPECIAL_TOKENS.values()) == tasks.VOCAB_SIZE - 1


def test_tokenizer_bytes_are_ranks():
    text = "[12 7] -> 19\né"
    assert tasks.encode(text) == list(text.encode("utf-8"))


def test_tokenizer_cached():
    assert tasks.get_tokenizer() is tasks.get_tokenizer()


def test_tokenizer_roundtrip_traces():
    for problem in tasks.make_problems(200, seed=3):
        text = tasks.format_prompt(problem, eps=0.5) + tasks.search_trace(problem)
        assert tasks.decode(tasks.encode(text)) == text, problem


def test_tokenizer_roundtrip_four_numbers():
    for problem in tasks.make_problems(10, seed=3, n_numbers=4):
        text = tasks.format_prompt(problem) + tasks.search_trace(problem)
        assert tasks.decode(tasks.encode(text)) == text, problem


def test_tokenizer_roundtrip_odd_text():
    text = "  \t\n<|bos|>x<|end|><answer>١٢</answer>\u00a0 emoji \U0001f600 <|eps=0.95|>\r\n"
    assert tasks.decode(tasks.encode(text)) == text


def test_eps_tag_grid():
    tags = [tasks.eps_tag(eps) for eps in tasks.EPS_GRID]
    assert tags[0] == "<|eps=0.00|>"
    assert tags[10] == "<|eps=0.50|>"
    assert tags[-1] == "<|eps=0.95|>"
    assert len(set(tags)) == 20
    for tag in tags:
        assert len(tasks.encode(tag)) == 1, tag


def test_eps_tag_float_noise():
    assert tasks.eps_tag(0.1 + 0.2) == "<|eps=0.30|>"


@pytest.mark.parametrize("eps", [0.51, 1.0, -0.05, 0.975, float("nan"), float("inf")])
def test_eps_tag_rejects_off_grid(eps):
    with pytest.raises(ValueError, match="grid"):
        tasks.eps_tag(eps)


def test_eps_tag_error_names_value():
    with pytest.raises(ValueError, match="0.51"):
        tasks.eps_tag(0.51)


# -----------------------------------------------------------------------------
# Problems and split


def test_make_problems_deterministic():
    assert tasks.make_problems(50, seed=7) == tasks.make_problems(50, seed=7)


def test_make_problems_seed_changes_list():
    assert tasks.make_problems(50, seed=7) != tasks.make_problems(50, seed=8)


def test_make_problems_prefix():
    assert tasks.make_problems(60, seed=7)[:20] == tasks.make_problems(20, seed=7)


def test_make_problems_ranges():
    for n_numbers in (2, 3, 4):
        for problem in tasks.make_problems(30, seed=1, n_numbers=n_numbers, max_number=20, max_target=100):
            assert len(problem.numbers) == n_numbers, problem
            assert all(1 <= x <= 20 for x in problem.numbers), problem
            assert 1 <= problem.target <= 100, problem


def test_make_problems_distinct():
    problems = tasks.make_problems(300, seed=2)
    keys = {(tuple(sorted(p.numbers)), p.target) for p in problems}
    assert len(keys) == len(problems)


def test_make_problems_solvable():
    for split in ("train", "test"):
        for problem in tasks.make_problems(200, seed=4, split=split):
            answer = tasks.solve(problem.numbers, problem.target)
            assert answer is not None, problem
            assert tasks.countdown_reward(f"<answer>{answer}</answer>", list(problem.numbers), problem.target) == 1.0


def test_make_problems_four_solvable():
    for problem in tasks.make_problems(20, seed=4, n_numbers=4):
        answer = tasks.solve(problem.numbers, problem.target)
        assert answer is not None, problem
        assert tasks.countdown_reward(f"<answer>{answer}</answer>", list(problem.numbers), problem.target) == 1.0


def test_split_disjoint():
    train = {(tuple(sorted(p.numbers)), p.target) for seed in range(3) for p in tasks.make_problems(500, seed=seed)}
    test = {
        (tuple(sorted(p.numbers)), p.target) for seed in range(3) for p in tasks.make_problems(200, seed=seed, split="test")
    }
    assert train.isdisjoint(test)


def test_split_matches_hash():
    for split in ("train", "test"):
        for problem in tasks.make_problems(100, seed=5, split=split):
            assert tasks.problem_split(problem) == split, problem


def test_split_ignores_number_order():
    problem = tasks.Problem((3, 12, 7), 15)
    for order in [(12, 7, 3), (7, 3, 12), (3, 7, 12)]:
        assert tasks.problem_split(tasks.Problem(order, 15)) == tasks.problem_split(problem)


def test_split_test_share():
    problems = [tasks.Problem((a, b, c), t) for a in range(1, 11) for b in range(a, 11) for c in range(b, 11) for t in (1, 50, 99)]
    share = sum(tasks.problem_split(p) == "test" for p in problems) / len(problems)
    assert 0.05 < share < 0.15


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n=-1, seed=0), "n"),
        (dict(n=1.5, seed=0), "n"),
        (dict(n=1, seed="0"), "seed"),
        (dict(n=1, seed=0, split="valid"), "split"),
        (dict(n=1, seed=0, n_numbers=1), "n_numbers"),
        (dict(n=1, seed=0, n_numbers=5), "n_numbers"),
        (dict(n=1, seed=0, max_number=0), "max_number"),
        (dict(n=1, seed=0, max_number=1000), "max_number"),
        (dict(n=1, seed=0, max_target=0), "max_target"),
    ],
)
def test_make_problems_invalid(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tasks.make_problems(**kwargs)


def test_make_problems_too_few():
    # Two numbers from 1..1 reach only the targets 1 and 2.
    with pytest.raises(ValueError, match="found only"):
        tasks.make_problems(50, seed=0, n_numbers=2, max_number=1)


def test_make_problems_zero():
    assert tasks.make_problems(0, seed=0) == []


# -----------------------------------------------------------------------------
# Solver and search traces

_LINE = re.compile(r"( *)([0-9]+)([-+*/])([0-9]+)=([0-9]+)(?: \[([0-9 ]+)\])?")


def test_search_trace_example():
    trace = tasks.search_trace(tasks.Problem((12, 7, 3), 15))
    expected = (
        "12+7=19 [3 19]\n"
        " 19+3=22\n"
        " 19-3=16\n"
        " 19*3=57\n"
        "12-7=5 [3 5]\n"
        " 5+3=8\n"
        " 5-3=2\n"
        " 5*3=15\n"
        "<answer>(12-7)*3</answer><|end|>"
    )
    assert trace == expected


def test_search_trace_ends_in_answer():
    for problem in tasks.make_problems(200, seed=6):
        trace = tasks.search_trace(problem)
        assert trace.endswith("</answer><|end|>"), problem
        assert tasks.parse_answer(trace) == tasks.solve(problem.numbers, problem.target), problem
        assert tasks.countdown_reward(trace, list(problem.numbers), problem.target) == 1.0, problem


def test_search_trace_has_dead_ends():
    problems = tasks.make_problems(200, seed=6)
    with_dead_ends = 0
    for problem in problems:
        moves = tasks.search_trace(problem).count("\n")
        with_dead_ends += moves > len(problem.numbers) - 1
    assert with_dead_ends / len(problems) > 0.5


def test_search_trace_backtracks():
    trace = tasks.search_trace(tasks.Problem((12, 7, 3), 15))
    depths = [len(line) - len(line.lstrip(" ")) for line in trace.split("\n")[:-1]]
    assert depths.index(0, 1) > 1


def test_search_trace_lines_valid():
    """Each line applies a valid move to the current state and lists what is left."""
    for problem in tasks.make_problems(100, seed=8, n_numbers=3) + tasks.make_problems(5, seed=8, n_numbers=4):
        states = [list(problem.numbers)]
        for line in tasks.search_trace(problem).split("\n")[:-1]:
            match = _LINE.fullmatch(line)
            assert match is not None, line
            indent, a, op, b, result, rest = match.groups()
            a, b, result = int(a), int(b), int(result)
            del states[len(indent) + 1 :]
            state = states[-1]
            assert a >= b, line
            assert result > 0, line
            assert Fraction(result) == {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op], line
            remaining = list(state)
            remaining.remove(a)
            remaining.remove(b)
            if len(remaining) == 0:
                assert rest is None, line
            else:
                assert rest is not None, line
                assert [int(x) for x in rest.split()] == remaining + [result], line
                states.append(remaining + [result])


def test_search_trace_failure():
    trace = tasks.search_trace(tasks.Problem((1, 1), 5))
    assert trace == "1+1=2\n1*1=1\n1/1=1\nno solution<|end|>"


def test_search_trace_failure_no_reward():
    assert tasks.countdown_reward(tasks.search_trace(tasks.Problem((12, 7, 3), 13)), [12, 7, 3], 13) == 0.0


def test_search_trace_one_number():
    assert tasks.search_trace(tasks.Problem((5,), 5)) == "<answer>5</answer><|end|>"


def test_solve_unsolvable():
    assert tasks.solve([12, 7, 3], 13) is None


@pytest.mark.parametrize("numbers", [[], [5, 0], [5, -2], [5, 2.0]])
def test_solve_invalid_numbers(numbers):
    with pytest.raises(ValueError, match="positive int"):
        tasks.solve(numbers, 5)


def test_solve_repeated_numbers():
    answer = tasks.solve([5, 5, 5], 30)
    assert tasks.countdown_reward(f"<answer>{answer}</answer>", [5, 5, 5], 30) == 1.0


def test_trace_length_stats():
    problems = tasks.make_problems(50, seed=9)
    lengths = sorted(len(tasks.encode(tasks.search_trace(p))) for p in problems)
    stats = tasks.trace_length_stats(problems)
    assert stats["n"] == 50
    assert stats["median"] == lengths[24]
    assert stats["p90"] == lengths[44]
    assert stats["max"] == lengths[-1]


def test_trace_length_stats_empty():
    with pytest.raises(ValueError, match="empty"):
        tasks.trace_length_stats([])


def test_main_prints_stats(capsys):
    tasks.main(["--stats", "--n", "20"])
    output = capsys.readouterr().out
    assert output.startswith("<|bos|>[")
    assert "trace tokens over 20 problems" in output


# -----------------------------------------------------------------------------
# Prompt


def test_format_prompt():
    assert tasks.format_prompt(tasks.Problem((12, 7, 3), 15)) == "<|bos|>[12 7 3] -> 15\n"


def test_format_prompt_eps():
    assert tasks.format_prompt(tasks.Problem((12, 7, 3), 15), eps=0.25) == "<|bos|><|eps=0.25|>[12 7 3] -> 15\n"


def test_format_prompt_rejects_eps():
    with pytest.raises(ValueError, match="0.33"):
        tasks.format_prompt(tasks.Problem((12, 7, 3), 15), eps=0.33)


def test_prompt_tokens():
    tokens = tasks.prompt_tokens(tasks.Problem((12, 7, 3), 15), eps=0.5)
    assert tokens[0] == tasks.BOS_ID
    assert tokens[1] == tasks.SPECIAL_TOKENS["<|eps=0.50|>"]
    assert tasks.decode(tokens[2:]) == "[12 7 3] -> 15\n"


# -----------------------------------------------------------------------------
# Answer parser


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>1+2</answer>", "1+2"),
        ("x <answer>1+2</answer> y <answer>3*4</answer> z", "3*4"),
        ("<answer>1+2</answer> then <answer>3*4", "1+2"),
        ("<answer>\n 1 +\n2 </answer>", "\n 1 +\n2 "),
        ("<answer>1+2</answer> stray </answer>", "1+2"),
        ("<answer>1<answer>2</answer>", "2"),
        ("<answer></answer>", ""),
        ("no tags", None),
        ("<answer>1+2", None),
        ("1+2</answer>", None),
        ("", None),
    ],
)
def test_parse_answer(response, expected):
    assert tasks.parse_answer(response) == expected


def test_parse_answer_of_trace():
    problem = tasks.Problem((12, 7, 3), 15)
    assert tasks.parse_answer(tasks.search_trace(problem)) == "(12-7)*3"


# -----------------------------------------------------------------------------
# Reward

_NUMBERS = [25, 3, 49]
_TARGET = 8

_REWARD_CASES = [
    ("correct", "<answer>(49-25)/3</answer>", [25, 3, 49], 8, 1.0),
    ("correct_whitespace", "<answer> ( 49 - 25 )\n/ 3 </answer>", [25, 3, 49], 8, 1.0),
    ("number_twice", "<answer>(49-25)/3+3-3</answer>", [25, 3, 49], 8, 0.0),
    ("number_missing", "<answer>49-25-16</answer>", [25, 3, 49], 8, 0.0),
    ("number_not_in_input", "<answer>(49-25)/4+2</answer>", [25, 3, 49], 8, 0.0),
    ("exact_fraction", "<answer>(6/4)*2</answer>", [6, 4, 2], 3, 1.0),
    ("only_after_rounding", "<answer>7/3</answer>", [7, 3], 2, 0.0),
    ("division_by_zero", "<answer>1/0</answer>", [1, 0], 1, 0.0),
    ("division_by_zero_expression", "<answer>5/(3-3)</answer>", [5, 3, 3], 5, 0.0),
    ("power", "<answer>9**9**9</answer>", [9, 9, 9], 9, 0.0),
    ("import", "<answer>__import__('os')</answer>", [1], 1, 0.0),
    ("dunder_chain", "<answer>().__class__.__bases__[0].__subclasses__()</answer>", [0], 0, 0.0),
    ("long_answer", "<answer>" + "1+" * 5000 + "</answer>", [1] * 5000, 5000, 0.0),
    ("nested_1000", "<answer>" + "(" * 1000 + "8" + ")" * 1000 + "</answer>", [8], 8, 0.0),
    ("unicode_digits", "<answer>(٤٩-٢٥)/٣</answer>", [25, 3, 49], 8, 0.0),
    ("fullwidth_digits", "<answer>(４９-２５)/３</answer>", [25, 3, 49], 8, 0.0),
    ("empty_answer", "<answer></answer>", [25, 3, 49], 8, 0.0),
    ("no_answer", "(49-25)/3", [25, 3, 49], 8, 0.0),
    ("two_answers_last_correct", "<answer>49+25+3</answer> <answer>(49-25)/3</answer>", [25, 3, 49], 8, 1.0),
    ("two_answers_last_wrong", "<answer>(49-25)/3</answer> <answer>49+25+3</answer>", [25, 3, 49], 8, 0.0),
    ("float_literal", "<answer>(49-25)/3.0</answer>", [25, 3, 49], 8, 0.0),
    ("unary_minus", "<answer>-25+49-3*0</answer>", [25, 49, 3, 0], 24, 0.0),
    ("leading_zero", "<answer>(49-25)/03</answer>", [25, 3, 49], 8, 0.0),
    ("equals_sign", "<answer>(49-25)/3=8</answer>", [25, 3, 49], 8, 0.0),
    ("unbalanced", "<answer>((49-25)/3</answer>", [25, 3, 49], 8, 0.0),
    ("wrong_value", "<answer>49-25+3</answer>", [25, 3, 49], 8, 0.0),
]


@pytest.mark.parametrize("name, response, numbers, target, expected", _REWARD_CASES, ids=[c[0] for c in _REWARD_CASES])
def test_reward_table(name, response, numbers, target, expected):
    assert tasks.countdown_reward(response, numbers, target) == expected


@pytest.mark.parametrize("name, response, numbers, target, expected", _REWARD_CASES, ids=[c[0] for c in _REWARD_CASES])
def test_reward_fast(name, response, numbers, target, expected):
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        tasks.countdown_reward(response, numbers, target)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.010, f"{name}: best of 3 took {min(timings) * 1000:.2f} ms"


def test_reward_unary_minus_rejected():
    """Unary minus is not part of the grammar, even where the value would be right."""
    assert tasks.countdown_reward("<answer>-3+25-(49-49)</answer>", [3, 25, 49, 49], 22) == 0.0
    assert tasks.countdown_reward("<answer>25-3-(49-49)</answer>", [3, 25, 49, 49], 22) == 1.0


def test_reward_unary_plus_rejected():
    assert tasks.countdown_reward("<answer>+25-3</answer>", [3, 25], 22) == 0.0


def test_reward_nesting_limit():
    inside = "(" * tasks.MAX_NESTING + "8" + ")" * tasks.MAX_NESTING
    too_deep = "(" + inside + ")"
    assert tasks.countdown_reward(f"<answer>{inside}</answer>", [8], 8) == 1.0
    assert tasks.countdown_reward(f"<answer>{too_deep}</answer>", [8], 8) == 0.0


def test_reward_length_limit():
    padded = "8" + " " * (tasks.MAX_ANSWER_CHARS - 1)
    assert tasks.countdown_reward(f"<answer>{padded}</answer>", [8], 8) == 1.0
    assert tasks.countdown_reward(f"<answer>{padded} </answer>", [8], 8) == 0.0


def test_reward_intermediate_bound():
    """Every intermediate must stay below MAX_ABS_VALUE, even when the final value is small."""
    big = 10**6
    assert tasks.countdown_reward(f"<answer>{big}/{big}*{big}</answer>", [big] * 3, big) == 1.0
    assert tasks.countdown_reward(f"<answer>{big}*{big}/{big}</answer>", [big] * 3, big) == 0.0


def test_reward_literal_bound():
    huge = 10**12
    assert tasks.countdown_reward(f"<answer>{huge}</answer>", [huge], huge) == 0.0


def test_reward_accepts_rational_intermediates():
    """The reward is broader than the search: non-integer intermediates count."""
    assert tasks.countdown_reward("<answer>(1/3+1)*3</answer>", [1, 3, 1, 3], 4) == 1.0


def test_reward_zero_literal_division():
    assert tasks.countdown_reward("<answer>0/5</answer>", [0, 5], 0) == 1.0


def test_reward_tuple_numbers():
    assert tasks.countdown_reward("<answer>(49-25)/3</answer>", (25, 3, 49), 8) == 1.0


def test_evaluate_expression_value_and_literals():
    value, literals = tasks.evaluate_expression("(6/4)*2")
    assert value == Fraction(3)
    assert literals == [6, 4, 2]


def test_evaluate_expression_power_error():
    with pytest.raises(tasks.InvalidExpression, match="found '\\*'"):
        tasks.evaluate_expression("2**3")


def test_evaluate_expression_name_error():
    with pytest.raises(tasks.InvalidExpression, match="'x' is not allowed"):
        tasks.evaluate_expression("2*x")


def test_reward_fuzz_alphabet():
    rng = random.Random(0)
    alphabet = "0123456789+-*/() \n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        reward = tasks.countdown_reward(f"<answer>{text}</answer>", [1, 2, 3], 6)
        assert reward in (0.0, 1.0), text


def test_reward_fuzz_with_tags():
    rng = random.Random(1)
    pieces = ["<answer>", "</answer>", "1", "2", "3", "+", "*", "/", "-", "(", ")", " ", "0", "x", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        reward = tasks.countdown_reward(text, [1, 2, 3], 6)
        assert reward in (0.0, 1.0), text


def _random_expression(rng, numbers):
    """Build a random fully parenthesised expression over numbers and return it with its exact value.

    The value is None when some division inside divides by zero.
    """
    if len(numbers) == 1:
        return str(numbers[0]), Fraction(numbers[0])
    split = rng.randint(1, len(numbers) - 1)
    left_text, left = _random_expression(rng, numbers[:split])
    right_text, right = _random_expression(rng, numbers[split:])
    op = rng.choice("+-*/")
    text = f"({left_text}{op}{right_text})"

    if left is None or right is None:
        return text, None
    if op == "+":
        return text, left + right
    if op == "-":
        return text, left - right
    if op == "*":
        return text, left * right
    return text, left / right if right != 0 else None


def test_reward_fuzz_valid_expressions():
    """Random well-formed expressions score 1 against their own integer value and 0 against value + 1."""
    rng = random.Random(2)
    checked = 0
    for _ in range(2000):
        numbers = [rng.randint(1, 50) for _ in range(rng.randint(1, 4))]
        text, value = _random_expression(rng, numbers)
        if value is None or value.denominator != 1:
            continue
        response = f"<answer>{text}</answer>"
        assert tasks.countdown_reward(response, sorted(numbers), int(value)) == 1.0, text
        assert tasks.countdown_reward(response, numbers, int(value) + 1) == 0.0, text
        checked += 1
    assert checked > 500


# -----------------------------------------------------------------------------
# AMC/AIME answer checking

_MATH_JSONL = """\
{"problem": "What is 2+3?", "answer": "5", "source": "synthetic"}

{"problem": "Find the remainder when 2^10 is divided by 1000.", "answer": 24}
{"problem": "Simplify 2/4.", "answer": "\\\\frac{1}{2}"}
"""


def test_load_math_problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(_MATH_JSONL, encoding="utf-8")
    problems = tasks.load_math_problems(path)
    assert len(problems) == 3
    assert problems[0] == {"problem": "What is 2+3?", "answer": "5", "source": "synthetic"}
    assert problems[1]["answer"] == "24"
    assert problems[2]["answer"] == "\\frac{1}{2}"


def test_load_math_problems_bad_json(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(_MATH_JSONL + '{"problem": "broken", \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"problems\.jsonl:5: invalid JSON"):
        tasks.load_math_problems(path)


def test_load_math_problems_missing_answer(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"problem": "What is 1+1?"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: field 'answer'"):
        tasks.load_math_problems(path)


def test_load_math_problems_missing_problem(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"answer": "2"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: missing string field 'problem'"):
        tasks.load_math_problems(path)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{x \\in [0, 1\\}}", "x \\in [0, 1\\}"),
        ("\\boxed{7} and \\boxed{unclosed", "7"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("no box { } here", None),
        ("\\boxed{", None),
        ("", None),
    ],
)
def test_extract_boxed(response, expected):
    assert tasks.extract_boxed(response) == expected


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("\\boxed{24}", "24", 1.0),
        ("\\boxed{024}", 24, 1.0),
        ("\\boxed{ 24 }", "24", 1.0),
        ("\\boxed{25}", "24", 0.0),
        ("\\boxed{24.0}", "24", 0.0),
        ("\\boxed{٢٤}", "24", 0.0),
        ("\\boxed{" + "9" * 5000 + "}", "999", 0.0),
        ("\\boxed{$\\dfrac{1}{2}$.}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
        ("\\boxed{1000}", "1000", 1.0),
        ("\\boxed{}", "", 0.0),
        ("the answer is 24", "24", 0.0),
    ],
)
def test_math_reward(response, answer, expected):
    assert tasks.math_reward(response, answer) == expected


def test_math_reward_fixture(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(_MATH_JSONL, encoding="utf-8")
    responses = ["\\boxed{5}", "so it is \\boxed{024}", "\\boxed{\\dfrac{1}{2}}"]
    for record, response in zip(tasks.load_math_problems(path), responses):
        assert tasks.math_reward(response, record["answer"]) == 1.0, record


# =============================================================================
# Rollouts of the project's own model size: stopping, seeds, evaluation, command line


def test_row_stopping_at_first_step():
    """A row whose first token is the stop token records one log-prob and no rounds after its prompt."""
    model = tiny_gpt(seed=3)
    prompts = random_prompts([9, 5, 7], seeded(3))
    ecfg = EvictionConfig(delta=4, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    first = rollout.generate(model, prompts, NO_STOP, "none", ecfg, scfg)
    stop_id = int(first.tokens[0, 9])  # row 0's greedy first token

    traj, token_lp, _ = rollout_and_replay(model, prompts, ecfg, scfg, policy="ngc-greedy", stop_id=stop_id)

    assert int(traj.response_len[0]) == 1
    assert bool(traj.finished[0])
    assert traj.logp[0, 0] != 0
    assert torch.all(traj.logp[0, 1:] == 0)
    assert torch.allclose(token_lp[0], traj.logp[0], atol=TOL)
    rounds_of_row = traj.round_time[traj.round_row == 0]
    assert torch.all(rounds_of_row <= 8)  # only the round right after the 9-token prompt


def test_same_seed_same_trajectories():
    model = tiny_gpt(seed=4)
    prompts = random_prompts([6, 11, 3, 8], seeded(4))
    ecfg = EvictionConfig(delta=4, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=24)
    a = rollout.generate(model, prompts, STOP, "ngc", ecfg, scfg, seeded(7))
    b = rollout.generate(model, prompts, STOP, "ngc", ecfg, scfg, seeded(7))
    c = rollout.generate(model, prompts, STOP, "ngc", ecfg, scfg, seeded(8))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.evict_time, b.evict_time)
    assert torch.equal(a.round_order, b.round_order)
    assert not torch.equal(a.tokens, c.tokens)


def tiny_checkpoint(path):
    """Save a tiny random GPT over the Countdown vocabulary, as train.py would."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tasks.VOCAB_SIZE, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128)
    model = GPT(config)
    save_checkpoint(path, model, config=dict(delta=8, block_size=4, window=3, max_new_tokens=40, n_numbers=3))
    return model


def test_evaluate_row_fields():
    model = tiny_gpt_for_tasks()
    problems = tasks.make_problems(6, seed=0, split="test")
    ecfg = EvictionConfig(delta=8, eps=0.5, block_size=4, window=3)
    scfg = SamplingConfig(max_new_tokens=30, temperature=0.0)
    full = rollout.evaluate(model, problems, "none", ecfg, scfg, batch_size=4)
    row = rollout.evaluate(model, problems, "snapkv", ecfg, scfg, batch_size=4, full_peaks=full["full_peaks"])

    for key in ("name", "eps", "accuracy", "ci95_low", "ci95_high", "peak_kv_reduction", "mean_response_tokens", "n_problems"):
        assert key in row
    assert row["n_problems"] == 6
    assert full["peak_kv_reduction"] == pytest.approx(1.0)
    assert row["peak_kv_reduction"] > 1.0
    assert row["max_peak_kv"] <= full["max_peak_kv"]
    assert 0.0 <= row["ci95_low"] <= row["accuracy"] <= row["ci95_high"] <= 1.0


def tiny_gpt_for_tasks():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tasks.VOCAB_SIZE, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128)
    return GPT(config).eval()


def test_wilson_interval_values():
    low, high = rollout.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4)
    assert high == pytest.approx(0.5962, abs=1e-4)
    assert rollout.wilson_interval(0, 10)[0] == 0.0


def test_rollout_cli_writes_json_row(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tiny.pt")
    rollout.main(["--ckpt", str(tmp_path / "tiny.pt"), "--policy", "h2o", "--eps", "0.5", "--n", "4",
                  "--json", str(tmp_path / "row.json"), "--show", "1"])
    row = json.loads((tmp_path / "row.json").read_text())
    output = capsys.readouterr().out
    assert row["name"] == "h2o"
    assert row["n_problems"] == 4
    assert row["delta"] == 8  # read from the checkpoint's config
    assert "--- problem 0" in output
    assert "«" in output  # evicted spans are marked


@pytest.mark.parametrize("argv, expected", [
    (["--policy", "lru"], "choose one of: none, ngc, ngc-greedy"),
    (["--eps", "1.5"], "invalid eps=1.5"),
    (["--delta", "0"], "invalid delta=0"),
    (["--temperature", "-1"], "invalid temperature=-1.0"),
])
def test_rollout_cli_rejects_bad_values(tmp_path, capsys, argv, expected):
    tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(SystemExit):
        rollout.main(["--ckpt", str(tmp_path / "tiny.pt"), "--n", "2"] + argv)
    assert expected in capsys.readouterr().err


def test_rollout_cli_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rollout.main(["--ckpt", str(tmp_path / "nope.pt")])
    assert "checkpoint not found" in capsys.readouterr().err


def test_corrupt_checkpoint_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(path)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    loaded, state = load_checkpoint(tmp_path / "tiny.pt")
    assert state["config"]["delta"] == 8
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path).glob("*.tmp"))  # the temporary file was renamed


# =============================================================================
# The training job, run as users run it


def test_packed_warm_batch_matches_unpacked():
    cfg, _ = train.parse_args(["--preset", "smoke"])
    rt = train.Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=0, world=1)
    problems = tasks.make_problems(200, seed=0, split="train")
    examples = [(tasks.prompt_tokens(p, None), tasks.encode(tasks.search_trace(p))) for p in problems]
    examples = [(prompt, trace) for prompt, trace in examples if len(trace) <= cfg.max_new_tokens]
    x, y, mask, visible = train.warm_batch(examples, 3, cfg, rt)
    assert len(x) < cfg.warm_batch  # some rows contain several traces

    model = tiny_gpt_for_tasks()
    logits, _, _ = model(x, visible)
    packed = logits.log_softmax(-1).gather(-1, y[..., None])[..., 0][mask]

    rng = random.Random(f"{cfg.seed}:warm:3")  # the step's draw, as warm_batch makes it
    drawn = [examples[rng.randrange(len(examples))] for _ in range(cfg.warm_batch)]
    alone = []
    for prompt, trace in drawn:
        seq = torch.tensor([prompt + trace])
        logp = model(seq)[0, len(prompt) - 1:-1].log_softmax(-1)
        alone.append(logp.gather(-1, seq[0, len(prompt):, None]))
    alone = torch.cat(alone)[:, 0]
    assert mask.sum() == len(alone)
    assert torch.allclose(packed.sum(), alone.sum(), atol=1e-3)
    assert torch.allclose(packed.sort().values, alone.sort().values, atol=1e-4)


def test_curriculum_staircase():
    """The rate climbs three levels to eps by curriculum_steps, holding then blending, and stays there."""
    cfg = train.Config(eps=0.3, curriculum_stages=3, curriculum_steps=60)  # levels 0.1, 0.2 and 0.3, 30 steps each
    rates = [train.curriculum_eps(step, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(0.1)
    assert rates[11] == pytest.approx(0.1)  # held for the first 40% of the level
    assert rates[21] == pytest.approx(0.1 + 0.1 * (0.7 - 0.4) / 0.6)  # then blended
    assert rates[30] == pytest.approx(0.2)
    assert rates[59] == pytest.approx(0.2 + 0.1 * (59 / 30 - 1 - 0.4) / 0.6)
    assert rates[60:] == [0.3] * 40
    assert all(a <= b for a, b in zip(rates, rates[1:]))
    assert train.curriculum_eps(0, train.Config(eps=0.3, curriculum_stages=1)) == 0.3
    assert train.curriculum_eps(0, train.Config(eps=0.3, curriculum_steps=0)) == 0.3


def test_grpo_loss_formula():
    """The loss equals the Dr. GRPO formula written out one rollout at a time."""
    model = tiny_gpt(seed=20, n_layer=3)
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=30)
    prompts = random_prompts([5, 5, 5, 9, 9, 9], seeded(20))
    traj = rollout.generate(model, prompts, STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(20))
    token_lp, evict_lp = rollout.replay(model, traj, ecfg, scfg)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    assert traj.n_rounds.min() > 0
    assert len(set(traj.n_rounds.tolist())) > 1  # so a sum over rounds would differ from the mean

    expected = 0.0
    for i in range(6):
        group = reward[3 * (i // 3):3 * (i // 3) + 3]
        advantage = reward[i] - group.mean()
        tokens = token_lp[i, :traj.response_len[i]].sum()
        rounds = evict_lp[:, traj.round_row == i]  # (L, rounds of row i)
        eviction = rounds.mean(1).sum()
        expected = expected - advantage * (tokens + 2.5 * eviction) / 6

    advantage = train.group_advantage(reward, group_size=3)
    loss = train.grpo_loss(token_lp, evict_lp, traj, advantage, n_rollouts=6, evict_coef=2.5)
    assert torch.allclose(loss, expected, atol=1e-5)
    token_only = train.grpo_loss(token_lp, evict_lp[:, :0], traj, advantage, 6)  # replay's empty term
    assert torch.allclose(train.grpo_loss(token_lp, evict_lp, traj, advantage, 6, evict_coef=0.0), token_only)
    assert not torch.allclose(loss, token_only)


def test_replay_batches_add_up():
    """Replaying a step in length-sorted batches gives the whole batch's loss and gradients."""
    ecfg = EvictionConfig(delta=6, eps=0.5, block_size=2, window=3)
    scfg = SamplingConfig(max_new_tokens=30)
    prompts = random_prompts([5, 5, 5, 9, 9, 9, 7, 7, 7], seeded(24))

    def loss_and_grads(batches):
        model = tiny_gpt(seed=24, n_layer=3)
        traj = rollout.generate(model, prompts, STOP, policy="ngc", ecfg=ecfg, scfg=scfg, generator=seeded(24))
        advantage = train.group_advantage(torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0, 1]), group_size=3)
        total = 0.0
        for rows in batches(traj):
            part = traj.select(rows)
            token_lp, evict_lp = rollout.replay(model, part, ecfg, scfg)
            share = train.grpo_loss(token_lp, evict_lp, part, advantage[rows], 9, evict_coef=2.5)
            share.backward()
            total = total + share.detach()
        return total, [p.grad.clone() for p in model.parameters()], traj

    whole, whole_grads, traj = loss_and_grads(lambda traj: [torch.arange(9)])
    assert len(set(traj.response_len.tolist())) > 2  # so the batches below trim different lengths
    order = torch.cat(traj.length_batches(4))
    assert sorted(order.tolist()) == list(range(9))
    lengths = (traj.prompt_len + traj.response_len)[order]
    assert bool((lengths[1:] >= lengths[:-1]).all())
    parts, part_grads, _ = loss_and_grads(lambda traj: traj.length_batches(4))
    assert torch.allclose(parts, whole, atol=1e-5)
    for g_parts, g_whole in zip(part_grads, whole_grads):
        assert (g_parts - g_whole).abs().max() <= TOL


def run_train(args, out, extra_env=None, timeout=600):
    """Run train.py in a subprocess; return the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run([sys.executable, "train.py", "--task", "countdown", "--preset", "smoke", "--out", str(out)] + args,
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)


def logged_losses(out, stage):
    """Map step number to loss for one stage of a run's log.jsonl."""
    losses = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["stage"] == stage and "loss" in record:
            losses[int(record["step"].split("/")[0])] = record["loss"]
    return losses


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = run_train([], out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_smoke_run_writes_results(smoke_run):
    out, result = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "countdown"
    assert results["config"]["eps"] == train.Config().eps
    names = {(row["name"], row["model"]) for row in results["methods"]}
    assert ("none", "full") in names
    assert ("ngc", "ngc") in names
    assert all((name, "full") in names and (name, "ngc") in names for name in ngc.SCORERS if name != "ngc")
    for row in results["methods"]:
        for key in ("name", "model", "eps", "accuracy", "ci95_low", "ci95_high", "peak_kv_reduction",
                    "mean_response_tokens", "n_problems"):
            assert key in row
    assert "| method | model | eps |" in (out / "results.md").read_text()
    assert (out / "results.png").exists() or "matplotlib is not installed" in result.stdout


def test_resume_matches_uninterrupted(smoke_run, tmp_path):
    """Resuming after a kill gives the next step the loss an uninterrupted run logged."""
    out, _ = smoke_run
    warm_steps = 40  # the smoke preset's; its last step is logged
    killed = run_train(["--stop-after", str(warm_steps - 1)], tmp_path)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert not (tmp_path / "results.json").exists()

    resumed = run_train(["--resume", "--stop-after", "1"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warm.pt: resuming at step {warm_steps - 1}" in resumed.stdout
    expected = logged_losses(out, "warm")[warm_steps]
    assert expected > 0
    assert logged_losses(tmp_path, "warm")[warm_steps] == pytest.approx(expected, rel=1e-5)

    again = run_train(["--resume", "--stop-after", "1"], tmp_path)
    assert "warm.pt: finished earlier, skipped" in again.stdout


@pytest.mark.parametrize("flags", [["--ablation", "kv-dropout"], ["--ablation", "token-only"], ["--interoception"]])
def test_ablation_flags_train(tmp_path, flags):
    warm_steps = 40  # the smoke preset's
    result = run_train(flags + ["--stop-after", str(warm_steps + 1)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rl_steps = [r for r in records if r["stage"] == "ngc" and "loss" in r]
    assert len(rl_steps) == 1
    assert math.isfinite(rl_steps[0]["loss"])


def test_warm_checkpoint_seeds_new_settings(smoke_run, tmp_path):
    out, _ = smoke_run
    shutil.copy(out / "warm.pt", tmp_path / "warm.pt")
    result = run_train(["--resume", "--eps", "0.3", "--stop-after", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm.pt: finished earlier, skipped" in result.stdout

    changed_model = run_train(["--resume", "--n-layer", "3"], tmp_path)
    assert changed_model.returncode != 0
    assert "n_layer" in changed_model.stderr


def test_rerun_without_resume_rejected(smoke_run):
    out, _ = smoke_run
    result = run_train([], out)
    assert result.returncode != 0
    assert "pass --resume" in result.stderr


def test_resume_from_corrupt_checkpoint(tmp_path):
    (tmp_path / "warm.pt").write_bytes(b"\x00garbage")
    result = run_train(["--resume"], tmp_path)
    assert result.returncode != 0
    assert "corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_task_lists_valid(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--task", "sudoku", "--out", str(tmp_path)],
                            cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "valid tasks: countdown" in result.stderr


def test_too_few_problems_exits_cleanly(tmp_path):
    result = run_train(["--max-number", "3", "--max-target", "5"], tmp_path)
    assert result.returncode != 0
    assert "found only" in result.stderr
    assert "--max-number" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--task", "countdown",
                             "--preset", "smoke", "--out", str(tmp_path)],
                            cwd=HERE, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert (tmp_path / "results.json").exists()
