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

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import tasks
from model import load_checkpoint
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"invalid temperature={self.temperature}: use 0 (argmax) or a positive value")
        if self.top_k < 0:
            raise ValueError(f"invalid top_k={self.top_k}: use 0 (no limit) or a positive count")


@dataclass
class Trajectories:
    """A batch of sampled responses and the eviction record that replay needs.

    B rows, T = longest prompt plus response, L layers, R rounds in all.
    """

    tokens: torch.Tensor  # (B, T) prompt then response, right-padded with 0
    prompt_len: torch.Tensor  # (B,)
    response_len: torch.Tensor  # (B,) generated tokens, the stop token included
    finished: torch.Tensor  # (B,) bool, the row emitted the stop token
    truncated: torch.Tensor  # (B,) bool, the row hit max_new_tokens without stopping
    logp: torch.Tensor  # (B, Tr) sampled token log-probs, 0 past response_len (for checking)
    evict_time: torch.Tensor  # (L, B, T) int32 first query position that no longer sees each key (T or more: never)
    round_row: torch.Tensor  # (R,) row of each round
    round_time: torch.Tensor  # (R,) position of the last token before the round
    round_order: torch.Tensor  # (L, R, K) kept blocks in sampled order, -1 padding
    round_blocks: torch.Tensor  # (L, R) blocks before the round
    round_logp: torch.Tensor  # (L, R) keep log-probs at sampling time (for checking)
    peak_entries: torch.Tensor  # (B, L) most live entries each layer held
    peak_total: torch.Tensor  # (B,) most live entries held at once, summed over layers
    bytes_per_entry: int  # one layer's key and value for one token

    @property
    def n_rounds(self):
        """Rounds per row, (B,)."""
        return torch.bincount(self.round_row, minlength=self.tokens.shape[0])

    def select(self, rows):
        """Return the rollouts at batch indices rows as a batch of their own, trimmed to its longest row.

        rows is a non-empty index tensor (n,). Rounds of other rows are
        dropped and round_row is renumbered, so replay and the loss treat the
        result like any batch. Trimming keeps every eviction time at or past
        the new T meaning "never".
        """
        index = torch.full_like(self.prompt_len, -1)
        index[rows] = torch.arange(len(rows), device=rows.device)
        mine = index[self.round_row] >= 0  # (R,)
        T = int((self.prompt_len[rows] + self.response_len[rows]).max())
        Tr = int(self.response_len[rows].max())
        return Trajectories(
            tokens=self.tokens[rows, :T], prompt_len=self.prompt_len[rows], response_len=self.response_len[rows],
            finished=self.finished[rows], truncated=self.truncated[rows], logp=self.logp[rows, :Tr],
            evict_time=self.evict_time[:, rows, :T], round_row=index[self.round_row[mine]],
            round_time=self.round_time[mine], round_order=self.round_order[:, mine],
            round_blocks=self.round_blocks[:, mine], round_logp=self.round_logp[:, mine],
            peak_entries=self.peak_entries[rows], peak_total=self.peak_total[rows],
            bytes_per_entry=self.bytes_per_entry,
        )

    def length_batches(self, size):
        """Split the row indices into batches of up to size rows, shortest rows first, for select."""
        return (self.prompt_len + self.response_len).argsort(stable=True).split(size)

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


def _round(cache, cache_rows, rows, time, policy, ecfg, row_eps, generator, prompt_len, record):
    """Evict in every layer for the batch rows `rows` (R,), held in `cache_rows` of the cache, after position time (R,)."""
    greedy = policy != "ngc"
    scorer = "ngc" if policy in ("ngc", "ngc-greedy") else policy
    layers = evict(cache, cache_rows, ecfg, scorer, greedy=greedy, generator=generator, prompt_len=prompt_len[rows],
                   eps=row_eps[rows])
    for l, rec in enumerate(layers):
        r_idx, s_idx = rec["evicted"].nonzero(as_tuple=True)
        record["evict_time"][l, rows[r_idx], rec["positions"][r_idx, s_idx]] = (time[r_idx] + 1).int()
    record["rounds"].append((rows, time, [rec["order"] for rec in layers], [rec["n_blocks"] for rec in layers],
                             [rec["logp"] for rec in layers]))


@torch.no_grad()
def generate(model, prompts, stop_id, policy="ngc", ecfg=None, scfg=None, generator=None, row_eps=None):
    """Sample a response for every prompt (a list of token-id lists) under an eviction policy.

    policy: "none" (full cache), "ngc" (sampled keep sets), "ngc-greedy"
    (top-k keep sets), or a baseline scorer name from ngc.SCORERS.
    row_eps (B,) gives each row its own eviction rate in place of ecfg.eps
    (budget-aware interoception); rows at rate 0 run no rounds.
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
    if row_eps is None:
        row_eps = torch.full((B,), ecfg.eps, device=device)
    elif len(row_eps) != B or not bool(((row_eps >= 0) & (row_eps < 1)).all()):
        raise ValueError(f"row_eps must hold one rate in [0, 1) per prompt; got {row_eps.tolist()}")
    evicting = policy != "none"
    may_evict = row_eps > 0  # (B,)

    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, device=device)
    logp = torch.zeros(B, N, device=device)
    record = dict(evict_time=torch.full((L, B, T), T, dtype=torch.int32, device=device), rounds=[])

    # prefill, and a first round for prompts that already reached delta
    cache = model.new_cache(B, ecfg.window, track_attention=policy == "h2o")
    logits = model.prefill(tokens[:, :P], prompt_len, cache)
    peak = cache.lengths()  # (B, L)
    peak_total = peak.sum(1)  # (B,)
    count = prompt_len.clone()  # tokens in the sequence so far, evicted or not
    if evicting:
        rows = (may_evict & (count >= ecfg.delta)).nonzero()[:, 0]
        if len(rows):
            _round(cache, rows, rows, count[rows] - 1, policy, ecfg, row_eps, generator, prompt_len, record)

    # decode: sample, drop finished rows, write the token, evict where the cadence fires
    live = torch.arange(B, device=device)  # batch row of each cache row; finished rows leave the cache
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    response_len = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(N):
        sampling_logits = process_logits(logits, scfg.temperature, scfg.top_k)  # (R, V)
        if scfg.temperature == 0:
            tok = sampling_logits.argmax(-1)
        else:
            tok = torch.multinomial(sampling_logits.softmax(-1), 1, generator=generator)[:, 0]
        logp[live, step] = sampling_logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
        tokens[live, prompt_len[live] + step] = tok
        response_len[live] += 1
        stopped = tok == stop_id
        finished[live[stopped]] = True
        if step == N - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            going = (~stopped).nonzero()[:, 0]
            cache.keep_rows(going)
            live, tok = live[going], tok[going]

        logits = model.decode(tok, cache)
        held = cache.lengths()  # (R, L)
        peak[live] = torch.maximum(peak[live], held)
        peak_total[live] = torch.maximum(peak_total[live], held.sum(1))
        count[live] += 1
        if evicting:
            fire = (may_evict[live] & (count[live] % ecfg.delta == 0)).nonzero()[:, 0]  # cache rows
            if len(fire):
                _round(cache, fire, live[fire], count[live[fire]] - 1, policy, ecfg, row_eps, generator, prompt_len, record)

    return _collect(tokens, prompt_len, response_len, finished, logp, record, peak, peak_total, cache.bytes_per_entry(), L)


def _collect(tokens, prompt_len, response_len, finished, logp, record, peak, peak_total, bytes_per_entry, L):
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
    # Trim to the longest row; eviction times past the end still mean "never".
    T = int((prompt_len + response_len).max())
    tokens, evict_time = tokens[:, :T], record["evict_time"][:, :, :T]
    return Trajectories(
        tokens=tokens, prompt_len=prompt_len, response_len=response_len, finished=finished,
        truncated=~finished, logp=logp, evict_time=evict_time,
        round_row=row, round_time=time, round_order=order, round_blocks=blocks, round_logp=round_logp,
        peak_entries=peak, peak_total=peak_total, bytes_per_entry=bytes_per_entry,
    )


def replay(model, traj, ecfg, scfg, masked=True, eviction=True):
    """Recompute the rollout's log-probabilities in one teacher-forced forward, on the autograd graph.

    Returns token log-probs (B, Tr) (0 past each response) and eviction
    log-probs (L, R). masked=False replays with a plain causal mask (the
    targeted KV dropout ablation); the eviction term then is not defined and
    comes back empty, as it does with eviction=False (no eviction term needed).
    """
    tokens, evict_time = traj.tokens, traj.evict_time
    B, T = tokens.shape
    if not masked:
        evict_time = torch.full_like(evict_time, T)
    logits, qs, ks = model(tokens, replay_masks(evict_time))  # (B, T, V)

    # token term: the response token at prompt_len + j is predicted at prompt_len + j - 1
    Tr = traj.logp.shape[1]
    j = torch.arange(Tr, device=tokens.device)
    at = (traj.prompt_len[:, None] - 1 + j).clamp(max=T - 2)  # (B, Tr)
    picked = logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1]))  # (B, Tr, V)
    targets = tokens.gather(1, at + 1)  # (B, Tr)
    token_lp = token_logprobs(picked, targets, scfg.temperature, scfg.top_k)
    token_lp = torch.where(j[None, :] < traj.response_len[:, None], token_lp, 0.0)

    if not masked or not eviction or traj.round_row.numel() == 0:
        return token_lp, logits.new_zeros(len(qs), 0)
    rounds = dict(row=traj.round_row, time=traj.round_time, order=traj.round_order)
    return token_lp, replay_eviction_logprobs(qs, ks, rounds, evict_time, ecfg)


# ---------------------------------------------------------------------------
# Evaluation


def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def run_problems(model, problems, policy, ecfg, scfg, batch_size=64, seed=0, interoception=False):
    """Generate a response for every Countdown problem; return rewards, peaks, lengths and the trajectories."""
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    rewards, peaks, lengths, batches = [], [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [tasks.prompt_tokens(p, ecfg.eps if interoception else None) for p in chunk]
        traj = generate(model, prompts, tasks.STOP_ID, policy, ecfg, scfg, generator)
        for b, problem in enumerate(chunk):
            text = tasks.decode(traj.response(b))
            rewards.append(tasks.countdown_reward(text, list(problem.numbers), problem.target))
        peaks.append(traj.peak_total)
        lengths.append(traj.response_len)
        batches.append(traj)
    return torch.tensor(rewards), torch.cat(peaks).float(), torch.cat(lengths).float(), batches


def evaluate(model, problems, policy, ecfg, scfg, batch_size=64, seed=0, full_peaks=None, interoception=False):
    """Run one policy on a fixed list of problems and summarise it as one results row.

    full_peaks (n,) are the full-cache peaks on the same problems, for the
    peak-KV reduction (per prompt: full-cache peak over this policy's peak,
    then the mean); when missing, a full-cache run at the same sampling
    settings provides them. Greedy sampling (temperature 0) is the usual
    choice for evaluation.
    """
    if len(problems) == 0:
        raise ValueError("evaluate needs at least one problem")
    start = time.perf_counter()
    rewards, peaks, lengths, batches = run_problems(model, problems, policy, ecfg, scfg, batch_size, seed, interoception)
    seconds = time.perf_counter() - start
    if full_peaks is None:
        full_peaks = peaks if policy == "none" or ecfg.eps == 0 else run_problems(
            model, problems, "none", ecfg, scfg, batch_size, seed, interoception)[1]

    n, correct = len(problems), int(rewards.sum())
    low, high = wilson_interval(correct, n)
    bytes_per_entry = batches[0].bytes_per_entry
    return dict(
        name=policy, eps=ecfg.eps if policy != "none" else 0.0, accuracy=correct / n, ci95_low=low, ci95_high=high,
        peak_kv_reduction=float((full_peaks / peaks).mean()),
        mean_peak_kv=float(peaks.mean()), max_peak_kv=int(peaks.max()),
        mean_peak_kv_bytes=float(peaks.mean()) * bytes_per_entry,
        mean_response_tokens=float(lengths.mean()), tokens_per_s=float(lengths.sum()) / seconds,
        n_problems=n, delta=ecfg.delta, block_size=ecfg.block_size, window=ecfg.window,
        full_peaks=full_peaks,
    )


def format_row(row):
    """Format a results row as one line."""
    return (f"{row['name']:<12} {row.get('model', ''):<10} eps {row['eps']:.2f} | acc {row['accuracy']:.3f} "
            f"[{row['ci95_low']:.3f}, {row['ci95_high']:.3f}] | kv reduction {row['peak_kv_reduction']:.2f}x | "
            f"peak kv {row['mean_peak_kv']:.0f} | len {row['mean_response_tokens']:.0f} | {row['tokens_per_s']:.0f} tok/s")


def show_evictions(traj, b, layer=None):
    """Render row b's prompt and response with evicted tokens marked.

    With layer=None: «...» marks tokens evicted in every layer and ‹...› those
    evicted in some layers only. With a layer index: «...» marks that layer's
    evictions.
    """
    T = traj.tokens.shape[1]
    end = int(traj.prompt_len[b] + traj.response_len[b])
    evicted = traj.evict_time[:, b, :end] < T  # (L, end)
    if layer is not None:
        evicted = evicted[layer:layer + 1]
    count, L = evicted.sum(0), evicted.shape[0]
    pieces, state = [], 0  # state: 0 kept, 1 some layers, 2 all layers
    for t in range(end):
        if count[t] == L:
            new = 2
        elif count[t] > 0:
            new = 1
        else:
            new = 0
        if new != state:
            pieces.append({1: "›", 2: "»"}.get(state, "") + {1: "‹", 2: "«"}.get(new, ""))
            state = new
        pieces.append(tasks.decode([int(traj.tokens[b, t])]))
    pieces.append({1: "›", 2: "»"}.get(state, ""))
    return "".join(pieces)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate one eviction policy on held-out Countdown problems.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--policy", default="ngc-greedy", help=f"one of: {', '.join(POLICIES)}")
    parser.add_argument("--eps", type=float, default=None, help="eviction rate, in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--delta", type=int, default=None, help="cadence in tokens (default: the checkpoint's)")
    parser.add_argument("--block-size", type=int, default=None, help="entries per block (default: the checkpoint's)")
    parser.add_argument("--window", type=int, default=None, help="recent queries that score keys (default: the checkpoint's)")
    parser.add_argument("--n", type=int, default=256, help="held-out problems to evaluate")
    parser.add_argument("--n-numbers", type=int, default=None, help="input numbers per problem (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response length limit (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows generated together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems' test split and of sampling")
    parser.add_argument("--json", default=None, help="write the result row to this JSON file")
    parser.add_argument("--show", type=int, default=0, help="print this many responses with evicted tokens marked")
    parser.add_argument("--show-layer", type=int, default=None, help="mark one layer's evictions instead of all layers'")
    args = parser.parse_args(argv)

    if args.policy not in POLICIES:
        parser.error(f"unknown --policy {args.policy!r}; choose one of: {', '.join(POLICIES)}")
    try:
        model, state = load_checkpoint(args.ckpt)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    # Settings not given on the command line come from the training run, then from the defaults.
    saved = dict(eps=0.5, delta=32, block_size=32, window=5, max_new_tokens=256, n_numbers=3, max_number=50,
                 max_target=200, score_temperature=1.0)
    saved.update(state.get("config", {}))
    for key in ("eps", "delta", "block_size", "window", "max_new_tokens", "n_numbers"):
        if getattr(args, key) is None:
            setattr(args, key, saved[key])
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: it must be at least 1")
    if args.show < 0:
        parser.error(f"invalid --show {args.show}: give a count of 0 or more")
    if args.json and not Path(args.json).parent.is_dir():
        parser.error(f"the folder of --json {args.json} does not exist; create it first")
    try:
        ecfg = EvictionConfig(delta=args.delta, eps=args.eps, block_size=args.block_size, window=args.window,
                              score_temperature=saved["score_temperature"])
        scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        problems = tasks.make_problems(args.n, seed=args.seed, split="test", n_numbers=args.n_numbers,
                                       max_number=saved["max_number"], max_target=saved["max_target"])
        if saved.get("interoception"):
            tasks.eps_tag(args.eps)
    except ValueError as error:
        parser.error(str(error))
    longest = max(len(tasks.prompt_tokens(p)) for p in problems) + 1
    if longest + args.max_new_tokens > model.config.max_seq_len:
        parser.error(f"--max-new-tokens {args.max_new_tokens} plus a {longest}-token prompt passes the model's "
                     f"max_seq_len={model.config.max_seq_len}; generate at most {model.config.max_seq_len - longest} tokens")
    if args.show_layer is not None and not 0 <= args.show_layer < model.config.n_layer:
        parser.error(f"--show-layer {args.show_layer} is out of range: the model has {model.config.n_layer} layers")
    model.eval()

    row = evaluate(model, problems, args.policy, ecfg, scfg, args.batch_size, args.seed,
                   interoception=saved.get("interoception", False))
    row["model"] = Path(args.ckpt).stem
    print(format_row(row))
    if args.json:
        row.pop("full_peaks")
        Path(args.json).write_text(json.dumps(row, indent=2))
    if args.show:
        shown = run_problems(model, problems[:args.show], args.policy, ecfg, scfg, args.batch_size, args.seed,
                             saved.get("interoception", False))[3]
        for batch_index, traj in enumerate(shown):
            for b in range(traj.tokens.shape[0]):
                problem_index = batch_index * args.batch_size + b
                print(f"\n--- problem {problem_index} ({traj.n_rounds[b].item()} rounds, "
                      f"peak {int(traj.peak_total[b])} entries) ---")
                print(show_evictions(traj, b, args.show_layer))


if __name__ == "__main__":
    main()
