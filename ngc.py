"""Neural Garbage Collection: scoring, sampling and bookkeeping of cache evictions.

This file owns everything NGC adds on top of a plain GPT (model.py):
- the eviction head, which has no parameters of its own: in each layer the
  queries of the W most recent tokens attend to the cached keys, and the
  softmax weights, averaged over heads and those queries, give one score per
  key (`key_scores`);
- block pooling: the live keys, in position order, are cut into blocks of b
  entries and a block scores the mean of its keys (`block_scores`);
- the keep decision: Gumbel-top-k sampling of ceil((1 - eps) * n_blocks)
  blocks, or plain top-k in evaluation, and the exact Plackett-Luce
  log-probability of the kept sequence (`sample_keep`, `plackett_luce_logprob`);
- one eviction round on a KVCache for the rows whose cadence fired (`evict`),
  under the learned policy or any training-free baseline scorer;
- the replay side: visibility masks from eviction times and the eviction
  log-probabilities recomputed on the autograd graph (`replay_masks`,
  `replay_eviction_logprobs`).

Every policy, learned or heuristic, goes through the same blocks, keep share
and bookkeeping; only the per-key scores differ.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import attention_weights

# A score no block mean can lose to, for entries a baseline always keeps (a block of
# b entries with one such entry averages over 1e6 / b, far above any attention weight).
KEEP = 1e6

# A finite stand-in for minus infinity: exp() of it is exactly 0 in float32,
# and unlike -inf it keeps logsumexp gradients free of NaN.
NEG = -1e9


@dataclass
class EvictionConfig:
    delta: int = 32  # cadence: a round fires each time a row's token count reaches a multiple of delta
    eps: float = 0.5  # eviction rate: each round evicts this share of every layer's blocks
    block_size: int = 32  # entries per block (the last block of a row may be shorter)
    window: int = 5  # recent queries whose attention scores the keys
    score_temperature: float = 1.0  # block logits are block scores / this; 1.0 keeps the raw scores

    def __post_init__(self):
        checks = [
            ("delta", self.delta, self.delta >= 1, "use a cadence of at least 1 token"),
            ("eps", self.eps, 0.0 <= self.eps < 1.0, "use an eviction rate in [0, 1)"),
            ("block_size", self.block_size, self.block_size >= 1, "use blocks of at least 1 entry"),
            ("window", self.window, self.window >= 1, "score with at least 1 recent query"),
            ("score_temperature", self.score_temperature, self.score_temperature > 0, "use a positive temperature"),
        ]
        for name, value, ok, fix in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}: {fix}")


def n_keep_blocks(n_blocks, eps):
    """Blocks a round keeps: ceil((1 - eps) * n_blocks), at least 1 for any non-empty layer; eps may be per row.

    The rate is rounded to 6 decimals first because a float32 rate is off in
    the 8th decimal. For example, 0.7 is stored as 0.69999999, so 10 blocks
    would keep ceil(3.0000001) = 4 in place of 3.
    """
    eps = torch.round(torch.as_tensor(eps, dtype=torch.float64, device=n_blocks.device) * 1e6) / 1e6
    n_keep = torch.ceil((1.0 - eps) * n_blocks.double() - 1e-9).long()
    return torch.where(n_blocks > 0, n_keep.clamp(min=1), n_keep)  # a rate within 5e-7 of 1 rounds to 1


def cache_bound(prompt_len, cfg):
    """Upper bound on a layer's live entries at any time, for a prompt of prompt_len tokens.

    After a round a layer keeps at most b * ceil((1 - eps) * ceil(n / b)) <=
    (1 - eps) * (n + b) + b entries, and delta more arrive before the next
    round, so the size just before a round never exceeds
    max(prompt, delta, (delta + (2 - eps) * b) / eps). With b dividing delta
    the size settles at delta / eps.
    """
    if cfg.eps == 0:
        return math.inf
    steady = (cfg.delta + (2 - cfg.eps) * cfg.block_size) / cfg.eps
    return max(prompt_len, cfg.delta, math.ceil(steady))


# ---------------------------------------------------------------------------
# Scores, blocks and the keep distribution


def key_scores(q, q_pos, k, k_pos, k_valid):
    """Score every key by the attention the recent queries pay it.

    q (N, H, W, D) rotated recent queries at positions q_pos (N, W), -1 for
    none; k (N, Hkv, S, D) rotated keys at positions k_pos (N, S), live where
    k_valid (N, S). Each query sees the live keys at or before its own
    position. Returns (N, S): softmax weights averaged over heads and over the
    queries that exist; dead keys score 0.
    """
    sees = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None]) & (q_pos[:, :, None] >= 0)  # (N, W, S)
    weights = attention_weights(q, k, sees[:, None])  # (N, H, W, S)
    q_ok = sees.any(-1).float()  # (N, W): a query with nothing to see gets no vote
    per_query = weights.mean(1) * q_ok[:, :, None]  # (N, W, S)
    return per_query.sum(1) / q_ok.sum(1, keepdim=True).clamp(min=1) * k_valid  # (N, S)


def block_scores(scores, valid, block_size):
    """Pool per-key scores (N, S) into blocks of block_size live keys in slot order.

    Returns block means (N, NB), the block of each slot (N, S) (-1 for dead
    slots) and the number of blocks per row (N,). Missing blocks score NEG.
    """
    N, S = scores.shape
    rank = valid.long().cumsum(1) - 1  # (N, S) index of each live key among the live keys
    block = torch.where(valid, rank // block_size, -1)  # (N, S)
    n_blocks = (valid.sum(1) + block_size - 1) // block_size  # (N,)
    NB = max(int(n_blocks.max()), 1)

    index = block.clamp(min=0)
    total = scores.new_zeros(N, NB).scatter_add(1, index, scores * valid)  # (N, NB)
    count = scores.new_zeros(N, NB).scatter_add(1, index, valid.to(scores.dtype))  # (N, NB)
    means = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, NEG))
    return means, block, n_blocks


def sample_keep(logits, n_blocks, n_keep, generator=None, greedy=False):
    """Choose which blocks to keep, in Plackett-Luce order.

    logits (N, NB) block logits (NEG for missing blocks); n_blocks, n_keep
    (N,). Sampling adds Gumbel noise and sorts, so the first n_keep entries
    are a Plackett-Luce sample without replacement; greedy skips the noise.
    Returns the kept block indices (N, K) in order, K = max(n_keep), -1 past
    each row's n_keep.
    """
    N, NB = logits.shape
    perturbed = logits.detach().float()
    if not greedy:
        u = torch.rand(N, NB, generator=generator, device=logits.device).clamp(1e-20, 1.0 - 1e-7)
        perturbed = perturbed - torch.log(-torch.log(u))
    exists = torch.arange(NB, device=logits.device)[None, :] < n_blocks[:, None]  # (N, NB)
    perturbed = perturbed.masked_fill(~exists, -math.inf)

    K = max(int(n_keep.max()), 1)
    # a stable sort, because torch.topk orders equal scores arbitrarily (baselines tie often)
    order = torch.sort(perturbed, dim=1, descending=True, stable=True).indices[:, :K]  # (N, K) ties keep the lower index first
    in_keep = torch.arange(K, device=logits.device)[None, :] < n_keep[:, None]
    return torch.where(in_keep, order, -1)


def kept_mask(order, n_columns):
    """Turn block indices order (N, K), -1 padding, into a membership mask (N, n_columns)."""
    spill = torch.where(order >= 0, order, n_columns)  # padding goes to an extra column, dropped below
    mask = torch.zeros(order.shape[0], n_columns + 1, dtype=torch.bool, device=order.device)
    return mask.scatter(1, spill, True)[:, :n_columns]


def plackett_luce_logprob(logits, order, n_blocks):
    """Exact log-probability of drawing the blocks `order` (N, K), in that order, without replacement.

        log p = sum_j [ logit[order_j] - logsumexp(logits of blocks not yet drawn before j) ]

    The blocks not yet drawn before step j are the blocks never drawn plus
    order_j, order_j+1, ...; so one reverse logcumsumexp over the drawn
    logits, joined with the logsumexp of the undrawn ones, gives every
    normaliser in one pass. Entries of order equal to -1 are padding.
    """
    N, NB = logits.shape
    exists = torch.arange(NB, device=logits.device)[None, :] < n_blocks[:, None]  # (N, NB)
    drawn = order >= 0  # (N, K)
    picked = kept_mask(order, NB)  # (N, NB)

    drawn_logits = logits.gather(1, order.clamp(min=0)).masked_fill(~drawn, NEG)  # (N, K)
    undrawn = torch.logsumexp(logits.masked_fill(~exists | picked, NEG), dim=1)  # (N,)
    tail = drawn_logits.flip(1).logcumsumexp(1).flip(1)  # (N, K) logsumexp of drawn[j:]
    normaliser = torch.logaddexp(tail, undrawn[:, None])  # (N, K)
    return ((drawn_logits - normaliser) * drawn).sum(1)  # (N,)


# ---------------------------------------------------------------------------
# Training-free baseline scorers: same blocks and keep share, other key scores


@dataclass
class ScoreInput:
    """Inputs a scorer may use, for the R rows of one layer that are evicting."""

    q: torch.Tensor  # (R, H, W, D) rotated recent queries
    q_pos: torch.Tensor  # (R, W) their positions, -1 for none
    k: torch.Tensor  # (R, Hkv, S, D) rotated keys
    pos: torch.Tensor  # (R, S) key positions
    valid: torch.Tensor  # (R, S) live keys
    prompt_len: torch.Tensor  # (R,) prompt length of each row
    attn_sum: torch.Tensor | None  # (R, S) attention received so far (only if tracked)
    generator: torch.Generator | None


def score_ngc(x):
    # NGC (the learned policy): recent-window attention, averaged over heads and queries.
    return key_scores(x.q, x.q_pos, x.k, x.pos, x.valid)


def score_streamingllm(x, n_sink=4):
    # StreamingLLM (Xiao et al., 2023): keep the first n_sink tokens (attention sinks) and the most recent ones.
    latest = x.pos.masked_fill(~x.valid, 0).max(1, keepdim=True).values  # (R, 1) so a row scores the same alone or in a batch
    recency = x.pos.float() / (latest + 1).float()
    return torch.where(x.pos < n_sink, KEEP, recency)


def score_snapkv(x, kernel=7):
    # SnapKV (Li et al., 2024): attention of an observation window of recent queries, pooled over neighbouring keys.
    scores = key_scores(x.q, x.q_pos, x.k, x.pos, x.valid)  # (R, S), 0 on dead slots
    live = x.valid[:, None].to(scores.dtype)  # (R, 1, S)
    # mean over the live neighbours only, so the dead slots past a short row's end do not dilute its last keys
    window_sum = F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    window_live = F.avg_pool1d(live, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    pooled = (window_sum / window_live.clamp(min=1e-6))[:, 0]
    return pooled * x.valid


def score_keydiff(x):
    # KeyDiff (Park et al., 2025): keep keys that differ most from the mean key (low cosine similarity to it).
    live = x.valid[:, None, :, None].to(x.k.dtype)  # (R, 1, S, 1)
    mean_key = (x.k * live).sum(2, keepdim=True) / live.sum(2, keepdim=True).clamp(min=1)  # (R, Hkv, 1, D)
    cosine = F.cosine_similarity(x.k, mean_key, dim=-1)  # (R, Hkv, S)
    return -cosine.mean(1)


def score_knorm(x):
    # KNorm (Devoto et al., 2024): low key L2 norm predicts high attention, so low norms are kept.
    return -x.k.float().norm(dim=-1).mean(1)


def score_h2o(x):
    # H2O (Zhang et al., 2023): heavy hitters by attention accumulated over all queries so far, plus the recent window.
    recent = x.pos > (x.q_pos.max(1, keepdim=True).values - x.q.shape[2])
    return torch.where(recent, x.attn_sum.new_tensor(KEEP), x.attn_sum)


def score_tova(x):
    # TOVA (Oren et al., 2024): attention of the current query alone, averaged over heads.
    return key_scores(x.q[:, :, -1:], x.q_pos[:, -1:], x.k, x.pos, x.valid)


def score_rkv(x, mix=0.5):
    # R-KV (Cai et al., 2025): importance (window attention) minus redundancy (mean cosine similarity to the other keys).
    importance = key_scores(x.q, x.q_pos, x.k, x.pos, x.valid)
    importance = importance / importance.amax(1, keepdim=True).clamp(min=1e-12)
    unit = F.normalize(x.k.float(), dim=-1)  # (R, Hkv, S, D)
    similarity = (unit @ unit.transpose(-2, -1)).mean(1)  # (R, S, S)
    pair = x.valid[:, :, None] & x.valid[:, None, :] & ~torch.eye(x.valid.shape[1], dtype=torch.bool, device=x.valid.device)
    redundancy = (similarity * pair).sum(2) / pair.sum(2).clamp(min=1)  # (R, S)
    return mix * importance - (1 - mix) * redundancy


def score_random(x):
    # Random eviction with the prompt always kept: a floor that any scorer should beat.
    noise = torch.rand(x.pos.shape, generator=x.generator, device=x.pos.device)
    return torch.where(x.pos < x.prompt_len[:, None], KEEP, noise)


SCORERS = {
    "ngc": score_ngc,
    "streamingllm": score_streamingllm,
    "snapkv": score_snapkv,
    "keydiff": score_keydiff,
    "knorm": score_knorm,
    "h2o": score_h2o,
    "tova": score_tova,
    "rkv": score_rkv,
    "random": score_random,
}


# ---------------------------------------------------------------------------
# One eviction round on a cache


def evict(cache, rows, cfg, policy="ngc", greedy=False, generator=None, prompt_len=None, eps=None):
    """Run one eviction round in every layer for the rows `rows` (R,) of a KVCache.

    prompt_len (R,) is the prompt length of each of those rows (the random
    baseline keeps the prompt); eps (R,) gives each row its own rate, by
    default cfg.eps.

    The learned policy samples its keep set (greedy: top-k); baselines keep
    the top-k blocks of their own scores. Returns one record per layer:
    kept block order (R, K) with -1 padding, number of blocks (R,), the
    positions evicted (R, S) bool mask over the pre-round slots and their
    positions (R, S), and the keep log-probability (R,) under the policy's
    block logits (zeros for baselines).
    """
    scorer = SCORERS[policy]
    records = []
    for l in range(cache.n_layer):
        S = cache.span(l)
        x = ScoreInput(
            q=cache.q_recent[l][rows], q_pos=cache.q_pos[rows],
            k=cache.k[l][rows, :, :S], pos=cache.pos[l][rows, :S], valid=cache.valid[l][rows, :S],
            prompt_len=prompt_len,
            attn_sum=cache.attn_sum[l][rows, :S] if cache.track_attention else None,
            generator=generator,
        )

        # score, pool into blocks, choose
        means, block, n_blocks = block_scores(scorer(x).float(), x.valid, cfg.block_size)
        logits = means / cfg.score_temperature
        n_keep = torch.minimum(n_keep_blocks(n_blocks, cfg.eps if eps is None else eps), n_blocks)
        order = sample_keep(logits, n_blocks, n_keep, generator, greedy=greedy or policy != "ngc")
        logp = plackett_luce_logprob(logits, order, n_blocks) if policy == "ngc" else logits.new_zeros(len(rows))

        # compact: keep the slots whose block was chosen
        keep = x.valid & kept_mask(order, means.shape[1]).gather(1, block.clamp(min=0))  # (R, S)
        records.append(dict(order=order, n_blocks=n_blocks, evicted=x.valid & ~keep, positions=x.pos.clone(), logp=logp))
        cache.compact(l, rows, keep)
    return records


# ---------------------------------------------------------------------------
# Replay: masks from eviction times, eviction log-probs on the graph


def replay_masks(evict_time):
    """Visibility masks from eviction times.

    evict_time (L, B, T): the position of the first query that no longer sees
    each key (T or more if never evicted, padding included). Query i sees key
    j exactly when j <= i < evict_time[l, b, j]. Returns L masks (B, T, T).
    """
    L, B, T = evict_time.shape
    i = torch.arange(T, device=evict_time.device)
    causal = i[None, :] <= i[:, None]  # (T, T) [query, key]
    return [causal[None] & (i[None, :, None] < evict_time[l][:, None, :]) for l in range(L)]


def replay_eviction_logprobs(qs, ks, rounds, evict_time, cfg):
    """Recompute every round's keep log-probability from a replay forward.

    qs[l] (B, H, T, D) and ks[l] (B, Hkv, T, D) come from model.replay;
    rounds holds row (R,), time (R,) (the position of the last token before
    the round) and, per layer, order (L, R, K) and n_blocks (L, R).
    evict_time (L, B, T) as in replay_masks. Returns (L, R) log-probs.
    """
    row, time = rounds["row"], rounds["time"]
    W, T = cfg.window, evict_time.shape[2]
    # k[row] copies every round's keys, so memory grows as rounds x T. Callers replay a few rollouts at a time.
    q_pos = time[:, None] - W + 1 + torch.arange(W, device=time.device)  # (R, W)
    q_idx = q_pos.clamp(min=0)
    k_pos = torch.arange(T, device=time.device).expand(len(row), T)  # (R, T)
    out = []
    for l, (q, k) in enumerate(zip(qs, ks)):
        H, D = q.shape[1], q.shape[3]
        q_win = q[row].gather(2, q_idx[:, None, :, None].expand(-1, H, -1, D))  # (R, H, W, D)
        live = (k_pos <= time[:, None]) & (evict_time[l][row] > time[:, None])  # (R, T) in the cache at the round
        scores = key_scores(q_win, torch.where(q_pos >= 0, q_pos, -1), k[row], k_pos, live)
        means, _, n_blocks = block_scores(scores, live, cfg.block_size)
        out.append(plackett_luce_logprob(means / cfg.score_temperature, rounds["order"][l], n_blocks))
    return torch.stack(out)  # (L, R)
