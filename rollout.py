"""Batched sampling with eviction rounds, the replay that scores it, and evaluation.

`generate` samples responses for a batch of prompts of different lengths:
prefill, then one token per step through the KV cache, and an eviction round
in every layer each time a row's token count (prompt plus generated) reaches
a multiple of the cadence delta (a prompt already past delta gets its first
round right after prefill). It returns `Trajectories`, which hold what the
update needs: the tokens, the flags, and per layer and round the kept block
order and the eviction times. `replay` recomputes, in one teacher-forced
forward with per-layer masks, the token and eviction log-probabilities the
rollout sampled with, on the autograd graph.
"""

from dataclasses import dataclass

import torch

from ngc import EvictionConfig, SCORERS, evict, replay_eviction_logprobs, replay_masks

POLICIES = ("none", "ngc", "ngc-greedy") + tuple(p for p in SCORERS if p != "ngc")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256  # response tokens per row, the stop token included
    temperature: float = 1.0  # 0 means argmax
    top_k: int = 0  # sample among the k most likely tokens; 0 means all

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"invalid max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0:
            raise ValueError(f"invalid temperature={self.temperature}: use 0 (argmax) or a positive value")
        if self.top_k < 0:
            raise ValueError(f"invalid top_k={self.top_k}: use 0 (no limit) or a positive count")


@dataclass
class Trajectories:
    """A batch of sampled responses and the eviction record that replay needs.

    B rows, T = longest prompt + max_new_tokens, L layers, R rounds in all.
    """

    tokens: torch.Tensor  # (B, T) prompt then response, right-padded with 0
    prompt_len: torch.Tensor  # (B,)
    response_len: torch.Tensor  # (B,) generated tokens, the stop token included
    finished: torch.Tensor  # (B,) bool, the row emitted the stop token
    truncated: torch.Tensor  # (B,) bool, the row hit max_new_tokens without stopping
    logp: torch.Tensor  # (B, Tr) sampled token log-probs, 0 past response_len (for checking)
    evict_time: torch.Tensor  # (L, B, T) int32 first query position that no longer sees each key
    round_row: torch.Tensor  # (R,) row of each round
    round_time: torch.Tensor  # (R,) position of the last token before the round
    round_order: torch.Tensor  # (L, R, K) kept blocks in sampled order, -1 padding
    round_blocks: torch.Tensor  # (L, R) blocks before the round
    round_logp: torch.Tensor  # (L, R) keep log-probs at sampling time (for checking)
    peak_entries: torch.Tensor  # (B, L) most live entries a layer held
    bytes_per_entry: int  # one layer's key and value for one token

    @property
    def n_rounds(self):
        """Rounds per row, (B,)."""
        return torch.bincount(self.round_row, minlength=self.tokens.shape[0])

    def response(self, b):
        """Token ids of row b's response."""
        start = int(self.prompt_len[b])
        return self.tokens[b, start:start + int(self.response_len[b])].tolist()


def process_logits(logits, temperature, top_k):
    """Logits (B, V) of the distribution tokens are sampled from: divided by temperature, top-k kept."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def token_logprobs(logits, tokens, temperature, top_k):
    """Log-probabilities (...,) of tokens (...,) under the sampling distribution of logits (..., V)."""
    logp = process_logits(logits, temperature, top_k).log_softmax(-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def _round(cache, rows, time, policy, ecfg, generator, prompt_len, record):
    """Evict in every layer for rows (R,) whose round fires after position time (R,)."""
    greedy = policy != "ngc"
    scorer = "ngc" if policy in ("ngc", "ngc-greedy") else policy
    layers = evict(cache, rows, ecfg, scorer, greedy=greedy, generator=generator, prompt_len=prompt_len)
    for l, rec in enumerate(layers):
        r_idx, s_idx = rec["evicted"].nonzero(as_tuple=True)
        record["evict_time"][l, rows[r_idx], rec["positions"][r_idx, s_idx]] = (time[r_idx] + 1).int()
    record["rounds"].append((rows, time, [rec["order"] for rec in layers], [rec["n_blocks"] for rec in layers],
                             [rec["logp"] for rec in layers]))


@torch.no_grad()
def generate(model, prompts, stop_id, policy="ngc", ecfg=None, scfg=None, generator=None):
    """Sample a response for every prompt (a list of token-id lists) under an eviction policy.

    policy: "none" (full cache), "ngc" (sampled keep sets), "ngc-greedy"
    (top-k keep sets), or a baseline scorer name from ngc.SCORERS.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    ecfg = ecfg or EvictionConfig()
    scfg = scfg or SamplingConfig()
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    B, L = len(prompts), model.config.n_layer
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    P, N = int(prompt_len.max()), scfg.max_new_tokens
    T = P + N
    evicting = policy != "none" and ecfg.eps > 0

    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, device=device)
    logp = torch.zeros(B, N, device=device)
    record = dict(evict_time=torch.full((L, B, T), T, dtype=torch.int32, device=device), rounds=[])

    # prefill, and a first round for prompts that already reached delta
    cache = model.new_cache(B, ecfg.window, track_attention=policy == "h2o")
    logits = model.prefill(tokens[:, :P], prompt_len, cache)
    peak = cache.lengths()  # (B, L)
    count = prompt_len.clone()  # tokens in the sequence so far, evicted or not
    if evicting:
        rows = (count >= ecfg.delta).nonzero()[:, 0]
        if len(rows):
            _round(cache, rows, count[rows] - 1, policy, ecfg, generator, prompt_len, record)

    # decode: sample, stop finished rows, write the token, evict where the cadence fires
    active = torch.ones(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    response_len = torch.zeros(B, dtype=torch.long, device=device)
    rows_all = torch.arange(B, device=device)
    for step in range(N):
        probs_logits = process_logits(logits, scfg.temperature, scfg.top_k)  # (B, V)
        if scfg.temperature == 0:
            tok = probs_logits.argmax(-1)
        else:
            tok = torch.multinomial(probs_logits.softmax(-1), 1, generator=generator)[:, 0]
        step_logp = probs_logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
        logp[:, step] = torch.where(active, step_logp, 0.0)
        tokens[rows_all, prompt_len + step] = torch.where(active, tok, tokens[rows_all, prompt_len + step])
        response_len += active.long()
        stopped = active & (tok == stop_id)
        finished |= stopped
        active &= ~stopped
        if step == N - 1 or not active.any():
            break

        logits = model.decode(tok, cache, active)
        peak = torch.maximum(peak, cache.lengths())
        count += active.long()
        if evicting:
            rows = (active & (count % ecfg.delta == 0)).nonzero()[:, 0]
            if len(rows):
                _round(cache, rows, count[rows] - 1, policy, ecfg, generator, prompt_len, record)

    return _collect(tokens, prompt_len, response_len, finished, logp, record, peak, cache.bytes_per_entry(), L)


def _collect(tokens, prompt_len, response_len, finished, logp, record, peak, bytes_per_entry, L):
    """Join the per-round records into flat tensors."""
    device = tokens.device
    rounds = record["rounds"]
    if rounds:
        K = max(order.shape[1] for _, _, orders, _, _ in rounds for order in orders)
        pad = lambda t: torch.nn.functional.pad(t, (0, K - t.shape[1]), value=-1)
        row = torch.cat([r[0] for r in rounds])
        time = torch.cat([r[1] for r in rounds])
        order = torch.stack([torch.cat([pad(r[2][l]) for r in rounds]) for l in range(L)])
        blocks = torch.stack([torch.cat([r[3][l] for r in rounds]) for l in range(L)])
        round_logp = torch.stack([torch.cat([r[4][l] for r in rounds]) for l in range(L)])
    else:
        row = time = torch.zeros(0, dtype=torch.long, device=device)
        order = torch.zeros(L, 0, 1, dtype=torch.long, device=device)
        blocks = torch.zeros(L, 0, dtype=torch.long, device=device)
        round_logp = torch.zeros(L, 0, device=device)
    return Trajectories(
        tokens=tokens, prompt_len=prompt_len, response_len=response_len, finished=finished,
        truncated=~finished, logp=logp, evict_time=record["evict_time"],
        round_row=row, round_time=time, round_order=order, round_blocks=blocks, round_logp=round_logp,
        peak_entries=peak, bytes_per_entry=bytes_per_entry,
    )


def replay(model, traj, ecfg, scfg, masked=True):
    """Recompute the rollout's log-probabilities in one teacher-forced forward, on the autograd graph.

    Returns token log-probs (B, Tr) (0 past each response) and eviction
    log-probs (L, R). masked=False replays with a plain causal mask (the
    targeted KV dropout ablation); the eviction term then is not defined and
    comes back empty.
    """
    tokens, evict_time = traj.tokens, traj.evict_time
    B, T = tokens.shape
    if not masked:
        evict_time = torch.full_like(evict_time, T)
    logits, qs, ks = model.replay(tokens, replay_masks(evict_time))  # (B, T, V)

    # token term: the response token at prompt_len + j is predicted at prompt_len + j - 1
    Tr = traj.logp.shape[1]
    j = torch.arange(Tr, device=tokens.device)
    at = (traj.prompt_len[:, None] - 1 + j).clamp(max=T - 2)  # (B, Tr)
    picked = logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1]))  # (B, Tr, V)
    targets = tokens.gather(1, at + 1)  # (B, Tr)
    token_lp = token_logprobs(picked, targets, scfg.temperature, scfg.top_k)
    token_lp = torch.where(j[None, :] < traj.response_len[:, None], token_lp, 0.0)

    if not masked or traj.round_row.numel() == 0:
        return token_lp, logits.new_zeros(len(qs), 0)
    rounds = dict(row=traj.round_row, time=traj.round_time, order=traj.round_order)
    return token_lp, replay_eviction_logprobs(qs, ks, rounds, evict_time, ecfg)
