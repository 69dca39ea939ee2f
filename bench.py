"""Speed of decoding, replay and whole rollouts, on a randomly initialised GPT.

The model is model.GPTConfig with a 300-token vocabulary (4 layers, width
128, 4 heads, 2 KV heads) unless flags set another shape, and eviction uses
cadence 64, rate 0.5, blocks of 32 and a 5-query window. Three measurements:

1. decode: generated tokens/s of rollout.generate for a batch of rows as the
   sequences pass each --lengths value, with a full cache and with NGC
   eviction, and the share of that time spent in eviction rounds
   (rollout._round). Each value is timed over the last `delta` decode steps
   up to that length, so every window contains exactly one round per row.
2. replay: forward+backward time of rollout.replay on a rollout with
   eviction, against a plain causal forward+backward with cross-entropy on
   the same (B, T) tokens.
3. rollout: generated tokens/s of a whole rollout (prefill included), full
   cache and NGC, next to `generate` of a Hugging Face Qwen2ForCausalLM of
   the same shape with its default cache. That row needs
   `pip install transformers` and is skipped without it.

No row can stop early: our rollouts use stop id -1, which no token has, and
the peer runs with min_new_tokens = max_new_tokens. Times are
time.perf_counter wall-clock, the median of --repeats runs after a short
warm-up, on whatever else the machine is running (the load is printed).

    python bench.py                        # full run
    python bench.py --quick                # tiny sizes, about 20 seconds
    python bench.py --threads 1 --decode-repeats 1 --json out/bench.json

The full-cache decode to 4096 tokens dominates the full run: the last command
took about 12 minutes on one thread of a shared 2-core CPU (torch 2.13), and
each extra decode repeat adds about 8 minutes there (an estimate).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import rollout
from model import GPT, GPTConfig
from ngc import EvictionConfig

NO_STOP = -1  # a stop id that matches no token, so every row generates max_new_tokens


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median_seconds(fn, repeats):
    """Return the median wall-clock seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_prompts(batch, length, vocab_size, generator):
    return torch.randint(0, vocab_size, (batch, length), generator=generator).tolist()


class StepClock:
    """Records the start of every decode call, and the start and length of every eviction round.

    Wraps model.decode (as an instance attribute) and rollout._round for the
    duration of a `with` block. The gap between two decode starts is one full
    generation step: sampling, decode, and the round if one fired.
    """

    def __init__(self, model):
        self.model = model
        self.step_start = []  # perf_counter at the start of each decode call
        self.slots = []  # live slots of layer 0 after each decode call
        self.rounds = []  # (perf_counter at start, seconds) of each round

    def __enter__(self):
        decode, self.original_round = self.model.decode, rollout._round

        def timed_decode(tokens, cache, *args, **kwargs):
            self.step_start.append(time.perf_counter())
            logits = decode(tokens, cache, *args, **kwargs)
            self.slots.append(cache.span(0))
            return logits

        def timed_round(*args, **kwargs):
            start = time.perf_counter()
            self.original_round(*args, **kwargs)
            self.rounds.append((start, time.perf_counter() - start))

        self.model.decode = timed_decode
        rollout._round = timed_round
        return self

    def __exit__(self, *exc_info):
        del self.model.decode  # deleting the instance attribute restores the class method
        rollout._round = self.original_round

    def window(self, first, end):
        """Return the seconds of decode steps first..end-1, the part spent in rounds, and the peak live slots."""
        t0, t1 = self.step_start[first], self.step_start[end]
        in_rounds = sum(s for start, s in self.rounds if t0 <= start < t1)
        return t1 - t0, in_rounds, max(self.slots[first:end])


def bench_decode(model, args, ecfg, generator):
    """Measure tokens/s over the `delta` steps that end at each length, full cache against NGC."""
    B, P, delta = args.batch, args.prompt_len, ecfg.delta
    # decode call i leaves P + i + 1 tokens in the sequence; one more call must follow the longest window
    scfg = rollout.SamplingConfig(max_new_tokens=max(args.lengths) - P + 2)
    prompts = random_prompts(B, P, model.config.vocab_size, generator)
    rows, records, full_speed, notes = [], [], {}, []
    for policy in ("none", "ngc"):
        warmup = rollout.SamplingConfig(max_new_tokens=delta + 2)
        rollout.generate(model, prompts, NO_STOP, policy, ecfg, warmup, generator)
        windows, whole_run = {L: [] for L in args.lengths}, []
        for _ in range(args.decode_repeats):
            with StepClock(model) as clock:
                rollout.generate(model, prompts, NO_STOP, policy, ecfg, scfg, generator)
            for L in args.lengths:
                windows[L].append(clock.window(L - P - delta, L - P))
            total = clock.step_start[-1] - clock.step_start[0]
            whole_run.append(sum(s for _, s in clock.rounds) / total)

        label = "full cache" if policy == "none" else f"NGC eps={ecfg.eps}"
        for L in args.lengths:
            seconds = statistics.median(w[0] for w in windows[L])
            share = statistics.median(w[1] / w[0] for w in windows[L])
            tokens_per_s = B * delta / seconds
            full_speed.setdefault(L, tokens_per_s)
            row = dict(length=L, policy=label, tokens_per_s=tokens_per_s, ms_per_step=1000 * seconds / delta,
                       peak_slots=max(w[2] for w in windows[L]), round_share=share,
                       vs_full_cache=tokens_per_s / full_speed[L])
            records.append(row)
            rows.append([L, label, f"{tokens_per_s:,.0f}", f"{row['ms_per_step']:.1f}", row["peak_slots"],
                         f"{100 * share:.1f}%" if policy != "none" else "-", f"{row['vs_full_cache']:.2f}x"])
        if policy != "none":
            notes.append(f"{label}: eviction rounds take {100 * statistics.median(whole_run):.1f}% of decode time "
                         f"over the whole run to length {max(args.lengths)} (target < 10%)")

    headers = ["length", "policy", "tokens/s", "ms/step", "peak KV entries (layer 0)", "time in rounds", "vs full cache"]
    print(markdown_table(headers, rows))
    print("\n".join(notes))
    return records


def bench_replay(model, args, ecfg, generator):
    """Time forward+backward of the masked replay against a plain causal step on the same tokens."""
    B, T, P = args.replay_batch, args.replay_len, args.prompt_len
    scfg = rollout.SamplingConfig(max_new_tokens=T - P)
    prompts = random_prompts(B, P, model.config.vocab_size, generator)
    traj = rollout.generate(model, prompts, NO_STOP, "ngc", ecfg, scfg, generator)  # outside inference_mode, because backward saves these tensors
    tokens = traj.tokens  # (B, T)

    def plain_step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)  # (B, T, V)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()

    def replay_step(masked):
        model.zero_grad(set_to_none=True)
        token_lp, evict_lp = rollout.replay(model, traj, ecfg, scfg, masked=masked)
        (-(token_lp.sum() + evict_lp.sum()) / B).backward()

    steps = [("plain causal forward, cross-entropy", plain_step),
             ("replay, causal masks, no eviction term (masked=False)", lambda: replay_step(False)),
             ("replay, eviction masks and eviction term", lambda: replay_step(True))]
    rows, records = [], []
    for name, fn in steps:
        fn()  # warm-up
        seconds = median_seconds(fn, args.repeats)
        if not records:
            plain_seconds = seconds  # the first step is the plain one
        ratio = seconds / plain_seconds
        records.append(dict(step=name, ms=1000 * seconds, tokens_per_s=B * T / seconds, vs_plain=ratio))
        rows.append([name, f"{1000 * seconds:.0f}", f"{B * T / seconds:,.0f}", f"{ratio:.2f}x"])
    print(f"trajectory: {B} rows x {T} tokens, {traj.round_row.numel()} eviction rounds, "
          f"peak KV entries {int(traj.peak_entries.max())} of {T}")
    print(markdown_table(["forward+backward", "ms", "tokens/s", "vs plain (target < 1.5x)"], rows))
    return records


def build_peer(config):
    """Build a random-weight Qwen2ForCausalLM of the same shape as `config`; return None without transformers."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: the Hugging Face row is skipped (pip install transformers)")
        return None
    peer_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.max_seq_len, rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, pad_token_id=0)
    peer = transformers.Qwen2ForCausalLM(peer_config).eval()
    print(f"peer: transformers {transformers.__version__} Qwen2ForCausalLM, attention {peer.config._attn_implementation}, "
          f"{sum(p.numel() for p in peer.parameters()):,} parameters")
    return peer


def bench_rollout(model, args, ecfg, generator):
    """Measure tokens/s of whole rollouts: ours with and without eviction, and the Hugging Face peer."""
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = random_prompts(B, P, model.config.vocab_size, generator)
    warmup = rollout.SamplingConfig(max_new_tokens=min(N, 16))
    scfg = rollout.SamplingConfig(max_new_tokens=N)
    runs = []
    for policy in ("none", "ngc"):
        label = "full cache" if policy == "none" else f"NGC eps={ecfg.eps}"
        rollout.generate(model, prompts, NO_STOP, policy, ecfg, warmup, generator)
        seconds = median_seconds(lambda: rollout.generate(model, prompts, NO_STOP, policy, ecfg, scfg, generator), args.repeats)
        runs.append(("this repository", label, seconds))

    peer = build_peer(model.config)
    if peer is not None:
        ids = torch.tensor(prompts)  # (B, P)

        def peer_generate(new_tokens):
            out = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            assert out.shape == (B, P + new_tokens), f"peer generated {tuple(out.shape)}, expected {(B, P + new_tokens)}"

        peer_generate(min(N, 16))
        runs.append(("transformers generate", "full cache (DynamicCache)", median_seconds(lambda: peer_generate(N), args.repeats)))

    peer_seconds = runs[-1][2] if peer is not None else None
    rows, records = [], []
    for impl, label, seconds in runs:
        ratio = peer_seconds / seconds if peer_seconds else None
        records.append(dict(implementation=impl, policy=label, seconds=seconds, tokens_per_s=B * N / seconds, vs_peer=ratio))
        rows.append([impl, label, f"{B * N / seconds:,.0f}", f"{seconds:.2f}", f"{ratio:.2f}x" if ratio else "-"])
    print(f"rollouts: {B} rows, prompt {P} tokens, {N} new tokens")
    print(markdown_table(["implementation", "policy", "tokens/s", "s per rollout", "speed vs peer"], rows))
    return records


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for a smoke test: batch 4, lengths 128 192, 128 new tokens, replay 4x128, 1 repeat, "
                             "1 thread unless --threads is given (these values replace the matching flags)")
    parser.add_argument("--sections", nargs="+", default=["decode", "replay", "rollout"], choices=["decode", "replay", "rollout"])

    parser.add_argument("--batch", type=int, default=64, help="rows in the decode and rollout measurements")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths (tokens) for decode")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens generated per row in the rollout measurement")
    parser.add_argument("--replay-batch", type=int, default=32, help="rows of the replayed trajectory batch")
    parser.add_argument("--replay-len", type=int, default=256, help="tokens per row (prompt included) of the replayed batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per replay and rollout measurement; the median is reported")
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="timed runs to the longest length per decode policy (each window already averages delta steps)")

    parser.add_argument("--delta", type=int, default=64, help="eviction cadence in tokens")
    parser.add_argument("--eps", type=float, default=0.5, help="eviction rate: the share of each layer's blocks a round evicts")
    parser.add_argument("--block-size", type=int, default=32, help="entries per eviction block")
    parser.add_argument("--window", type=int, default=5, help="recent queries that score the keys")

    parser.add_argument("--vocab-size", type=int, default=300)
    parser.add_argument("--n-layer", type=int, default=GPTConfig.n_layer)
    parser.add_argument("--n-embd", type=int, default=GPTConfig.n_embd)
    parser.add_argument("--n-head", type=int, default=GPTConfig.n_head)
    parser.add_argument("--n-kv-head", type=int, default=GPTConfig.n_kv_head)

    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and sampling")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")

    args = parser.parse_args()
    if args.quick:
        args.batch, args.lengths, args.new_tokens, args.repeats, args.decode_repeats = 4, [128, 192], 128, 1, 1
        # Tensors this small gain nothing from intra-op threads, and idle threads spin-wait when other
        # jobs share the cores: with two other jobs on 2 cores, --quick decoded 6 tokens/s with 2 threads
        # and 500 with 1 (torch 2.13 CPU).
        args.threads = args.threads or 1
        args.replay_batch, args.replay_len = 4, 128
    if min(args.lengths) < args.prompt_len + args.delta:
        parser.error(f"--lengths {min(args.lengths)} is too short: each length must be at least "
                     f"--prompt-len + --delta = {args.prompt_len + args.delta}")
    if args.replay_len <= args.prompt_len:
        parser.error(f"--replay-len {args.replay_len} must exceed --prompt-len {args.prompt_len}")
    return args


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                   torch=torch.__version__, threads=torch.get_num_threads(), load_average_1min=os.getloadavg()[0])
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"machine: {machine['platform']}, python {machine['python']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
          f"{machine['threads']} threads, load average {machine['load_average_1min']:.2f} (1 min)")
    print(f"command: {command}\n")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    longest = max(max(args.lengths) + 2, args.prompt_len + args.new_tokens, args.replay_len)
    config = GPTConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                       n_kv_head=args.n_kv_head, max_seq_len=longest)
    model = GPT(config).eval()
    ecfg = EvictionConfig(delta=args.delta, eps=args.eps, block_size=args.block_size, window=args.window)
    print(f"model: {config}, {model.num_params():,} parameters")
    print(f"eviction: {ecfg}, steady-state cache delta/eps = {ecfg.delta / ecfg.eps:.0f} entries per layer\n")

    results = dict(machine=machine, command=command, args=vars(args))
    if "decode" in args.sections:
        print("## Decode throughput")
        with torch.inference_mode():
            results["decode"] = bench_decode(model, args, ecfg, generator)
        print()
    if "replay" in args.sections:
        print("## Replay cost")
        results["replay"] = bench_replay(model, args, ecfg, generator)
        print()
    if "rollout" in args.sections:
        print("## Rollout throughput")
        with torch.inference_mode():
            results["rollout"] = bench_rollout(model, args, ecfg, generator)
        print()
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
