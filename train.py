"""The main job: warm start, NGC reinforcement learning, and the results table.

    python train.py --task countdown                  # the default CPU run
    python train.py --task countdown --preset smoke   # a two-minute check
    torchrun --nproc_per_node=2 train.py --task countdown --preset smoke

Stages, each saved to its own checkpoint in --out and skipped on --resume
once finished:
1. warm   A GPT trained from scratch on solver search traces with a full
          cache (next-token loss on the response only).
2. ngc    Dr. GRPO from the warm start with eviction rounds in every rollout:
          tokens and keep sets are both sampled actions, scored by the replay
          forward, trained by the task reward alone. The eviction rate rises
          along a staircase curriculum to its target.
3. full   The same reinforcement learning with a full cache: the upper bound.
4. eval   Every policy on held-out problems: results.json, results.md and
          results.png (accuracy against peak KV cache size).

Where this implementation departs from the paper:
1. The paper starts from a pretrained reasoning model (DeepSeek-R1-Distill-
   Qwen-1.5B). Here a small GPT is trained from scratch, so it first learns
   to search from solver traces (as in Stream of Search, the paper's source
   of Countdown) with a full cache. The eviction policy is never supervised.
2. Everything is scaled down to run on a CPU: the model, the cadence and
   block size, the group size, the number of steps and 3-number problems.
   The values in use are printed at start-up and saved with the results.
3. The loss is averaged over the rollouts of a step (a constant normaliser,
   as Dr. GRPO asks); the paper does not state its normaliser.
4. Evaluation decodes greedily, and the learned policy keeps its top-k
   blocks instead of sampling them.
5. The peak-KV reduction of every row is measured against the full-cache
   upper-bound model on the same problems.
6. The block logits are the mean attention weights divided by a score
   temperature (0.005 by default), where the paper adds the Gumbel noise to
   the raw scores. Raw means lie in [0, 1/b], so the sampled keep sets would
   be close to uniform and differ from the greedy top-k used in evaluation.
7. Tokens are bytes, so the cadence (8) and window (5) span a few words,
   and the rate is low (0.2): with b = 8, a round evicts one block once a
   layer's cache reaches five blocks.
8. The eviction term is weighted 16 times the token term (--evict-coef),
   where the paper adds the two. The token term sums over about 60 tokens
   and the eviction term averages over rounds. With equal weights, the
   eviction term's gradient is far smaller than the token term's, and a few
   hundred steps barely move the keep policy.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from ngc import SCORERS, EvictionConfig
from rollout import SamplingConfig, evaluate, format_row, generate, replay

TASKS = ("countdown",)
ABLATIONS = ("none", "kv-dropout", "token-only")
STAGES = ("warm", "ngc", "full")
# Settings the warm start depends on; a warm.pt from a run that agrees on these can seed new RL settings.
WARM_FIELDS = ("task", "seed", "n_numbers", "max_number", "max_target", "n_train_problems", "n_layer", "n_embd",
               "n_head", "n_kv_head", "warm_steps", "warm_batch", "warm_lr", "warm_target", "warm_eval_every",
               "max_new_tokens", "interoception", "dev_problems", "grad_clip")


@dataclass
class Config:
    # run
    task: str = "countdown"  # the task to train on
    out: str = "out/countdown"  # output folder for checkpoints, logs and results
    seed: int = 0  # seed of problems, initialisation and sampling
    device: str = "auto"  # cpu, cuda, or auto (cuda when available)
    dtype: str = "auto"  # float32 or bfloat16 (autocast); auto: bfloat16 on cuda, float32 on cpu
    compile: bool = False  # torch.compile the training forward
    resume: bool = False  # continue from the checkpoints in --out
    wandb: bool = False  # log to Weights & Biases (needs the wandb package)
    # task
    n_numbers: int = 3  # input numbers per Countdown problem
    max_number: int = 50  # input numbers are drawn from 1..max_number
    max_target: int = 200  # targets are in 1..max_target
    n_train_problems: int = 20000  # training pool (warm start and RL prompts)
    # model
    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # width
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads
    # warm start
    warm_steps: int = 800  # optimizer steps on search traces (at most)
    warm_batch: int = 64  # traces per step
    warm_lr: float = 3e-3  # peak learning rate (cosine decay after a linear warm-up)
    warm_target: float = 0.6  # stop early once greedy dev accuracy reaches this share
    warm_eval_every: int = 200  # steps between dev evaluations
    # reinforcement learning
    rl_steps: int = 200  # optimizer steps per RL stage
    prompts_per_step: int = 8  # problems per step, each rolled out group_size times
    group_size: int = 8  # rollouts per problem (G)
    replay_batch: int = 16  # rollouts per replay forward and backward, grouped by length (fewer use less memory)
    rl_lr: float = 5e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay in RL
    grad_clip: float = 1.0  # max global gradient norm
    temperature: float = 1.0  # rollout sampling temperature
    max_new_tokens: int = 256  # response length limit in tokens
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    # eviction
    delta: int = 8  # cadence in tokens
    eps: float = 0.2  # target eviction rate
    block_size: int = 8  # entries per block
    window: int = 5  # recent queries that score the keys
    score_temperature: float = 0.005  # block logits are mean attention weights / this (1.0: the raw scores)
    evict_coef: float = 16.0  # weight of the eviction term in the loss (1.0 is the paper's plain sum)
    curriculum_stages: int = 3  # levels of the eviction-rate staircase, the last at eps (1: eps from the start)
    curriculum_steps: int = 50  # RL steps until the rate reaches eps, where it then stays
    interoception: bool = False  # put the eviction rate in the prompt, sampled per group
    ablation: str = "none"  # none, kv-dropout (plain causal update) or token-only (no eviction term)
    # evaluation and bookkeeping
    n_eval: int = 300  # held-out problems per evaluated policy
    eval_eps: str = "0.15,0.25"  # further rates for NGC and the baselines on the full-cache model (the trained eps is always in)
    dev_problems: int = 200  # training-pool problems held back for warm-start early stopping
    eval_every: int = 25  # RL steps between greedy dev evaluations
    ckpt_every: int = 25  # steps between checkpoints
    stop_after: int = 0  # exit after this many optimizer steps in this process, as if killed (tests resume); 0 = never


PRESETS = {
    "default": {},
    "smoke": dict(
        n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_train_problems=600, dev_problems=32,
        warm_steps=40, warm_batch=32, warm_eval_every=20, warm_target=1.0,
        rl_steps=2, curriculum_steps=1, prompts_per_step=4, group_size=4, replay_batch=6, max_new_tokens=96,
        n_eval=16, eval_eps="0.7", eval_every=1, ckpt_every=1,
    ),
}


def parse_args(argv=None):
    """Build the command line from Config: one flag per field, help from the field comments."""
    comments = _field_comments()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", help=f"starting values: {', '.join(PRESETS)}")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{comments.get(f.name)} (default: {f.default})")
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=f"{comments.get(f.name)} (default: {f.default})")
    args = parser.parse_args(argv)

    if args.preset not in PRESETS:
        parser.error(f"unknown --preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    if args.task is not None and args.task not in TASKS:
        parser.error(f"unknown --task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    if args.ablation is not None and args.ablation not in ABLATIONS:
        parser.error(f"unknown --ablation {args.ablation!r}; choose one of: {', '.join(ABLATIONS)}")
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None and k != "preset"}}
    cfg = Config(**values)
    try:
        validate(cfg)
    except ValueError as error:
        parser.error(str(error))
    return cfg, args.preset


def _field_comments():
    """Map each Config field to the comment on its line, for --help."""
    import inspect
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def validate(cfg):
    """Raise ValueError naming the first invalid setting."""
    eviction_config(cfg, cfg.eps)
    SamplingConfig(cfg.max_new_tokens, cfg.temperature)
    if not cfg.temperature > 0:
        raise ValueError(f"invalid temperature={cfg.temperature}: RL needs sampled rollouts, so use a positive value")
    GPTConfig(vocab_size=tasks.VOCAB_SIZE, n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd)
    for name in ("warm_lr", "rl_lr", "grad_clip"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"invalid {name}={getattr(cfg, name)}: it must be a positive number")
    for name in ("weight_decay", "evict_coef"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ValueError(f"invalid {name}={getattr(cfg, name)}: use 0 or a positive number")
    for name in ("warm_steps", "warm_batch", "warm_eval_every", "rl_steps", "prompts_per_step", "replay_batch", "n_eval",
                 "curriculum_stages", "ckpt_every", "eval_every", "dev_problems", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"invalid {name}={getattr(cfg, name)}: it must be at least 1")
    if cfg.curriculum_steps < 0:
        raise ValueError(f"invalid curriculum_steps={cfg.curriculum_steps}: use 0 (no curriculum) or a positive count")
    if cfg.curriculum_stages > 1 and cfg.curriculum_steps >= cfg.rl_steps:
        raise ValueError(f"invalid curriculum_steps={cfg.curriculum_steps}: with rl_steps={cfg.rl_steps} the rate "
                         f"would never reach eps; use --curriculum-steps below --rl-steps")
    if cfg.group_size < 2:
        raise ValueError(f"invalid group_size={cfg.group_size}: a group baseline needs at least 2 rollouts")
    for rate in eval_rates(cfg):
        EvictionConfig(eps=rate)
        if cfg.interoception:
            tasks.eps_tag(rate)  # the prompt can only carry rates on the tag grid
    if cfg.interoception:
        tasks.eps_tag(cfg.eps)
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ValueError(f"invalid device={cfg.device!r}: use auto, cpu or cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} requested, but this torch build sees no CUDA GPU; use --device cpu")
    if cfg.dev_problems >= cfg.n_train_problems:
        raise ValueError(f"dev_problems={cfg.dev_problems} leaves no training problems out of {cfg.n_train_problems}")


def eviction_config(cfg, eps):
    """Build the run's EvictionConfig (cadence, block size, window, score temperature) at a given rate."""
    return EvictionConfig(cfg.delta, eps, cfg.block_size, cfg.window, cfg.score_temperature)


def eval_rates(cfg):
    try:
        return [float(x) for x in cfg.eval_eps.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"invalid eval_eps={cfg.eval_eps!r}: give comma-separated rates such as 0.6,0.7") from None


# ---------------------------------------------------------------------------
# Plumbing: devices, processes, logging


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def setup_runtime(cfg):
    """Pick the device and dtype and join the process group when started by torchrun."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
        if dtype is None:
            raise SystemExit(f"unknown --dtype {cfg.dtype!r}; choose float32, bfloat16 or auto")
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.prompts_per_step % world or cfg.warm_batch % world:
            raise SystemExit(f"{world} processes need prompts_per_step ({cfg.prompts_per_step}) and warm_batch "
                             f"({cfg.warm_batch}) to be multiples of {world}, so every process gets an equal share; "
                             "change them or the number of processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return Runtime(device, dtype, rank, world)


class Logger:
    """One line per step to stdout and log.jsonl; wandb only when asked for and installed."""

    def __init__(self, cfg, rt):
        self.active = rt.main
        self.path = Path(cfg.out) / "log.jsonl"
        self.wandb = None
        if cfg.wandb and rt.main:
            try:
                import wandb
                self.wandb = wandb.init(project="ngc", config=asdict(cfg))
            except ImportError:
                print("wandb is not installed; logging to log.jsonl only")

    def step(self, stage, record):
        if not self.active:
            return
        record = dict(stage=stage, **{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{stage}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        fields_shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {'-' if v is None else v}"
                        for k, v in record.items() if k != "stage"]
        shown = " | ".join(fields_shown)
        tqdm.write(f"[{stage}] {shown}")


def all_mean(value, rt):
    """Average a float over processes."""
    if rt.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world


# ---------------------------------------------------------------------------
# Data


def problem_pool(cfg):
    """Training problems, the dev slice held back for early stopping, and held-out test problems."""
    shape = dict(seed=cfg.seed, n_numbers=cfg.n_numbers, max_number=cfg.max_number, max_target=cfg.max_target)
    try:
        pool = tasks.make_problems(cfg.n_train_problems, split="train", **shape)
        test = tasks.make_problems(cfg.n_eval, split="test", **shape)
    except ValueError as error:  # too few distinct problems for the number ranges
        raise SystemExit(f"{error} (flags --n-train-problems, --n-eval, --max-number, --max-target)") from None
    return pool[cfg.dev_problems:], pool[:cfg.dev_problems], test


def prompt_for(problem, cfg, eps):
    return tasks.prompt_tokens(problem, eps if cfg.interoception else None)


def warm_batch(examples, step, cfg, rt):
    """Inputs, targets, a response-only loss mask and per-layer masks for one warm-start step.

    The step draws warm_batch random traces (the same step, the same draw) and
    packs them first-fit into rows as long as the longest example. A token attends
    only to the earlier tokens of its own trace. With rotary positions, a packed
    trace therefore gives the same logits as the trace on its own. One batch
    mixes short and long searches with almost no padding.
    """
    rng = random.Random(f"{cfg.seed}:warm:{step}")
    seqs = [examples[rng.randrange(len(examples))] for _ in range(cfg.warm_batch)][rt.rank::rt.world]
    T = max(len(prompt) + len(trace) for prompt, trace in examples)
    rows, fill = [], []  # rows[r]: the (prompt, trace) pairs packed into row r, fill[r]: tokens used
    for prompt, trace in sorted(seqs, key=lambda pair: -len(pair[0]) - len(pair[1])):
        n = len(prompt) + len(trace)
        r = next((r for r in range(len(rows)) if fill[r] + n <= T), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r].append((prompt, trace))
        fill[r] += n

    idx = torch.zeros(len(rows), T, dtype=torch.long)
    doc = torch.arange(T).repeat(len(rows), 1) + T  # (R, T) padding: each token its own document
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, pairs in enumerate(rows):
        at = 0
        for d, (prompt, trace) in enumerate(pairs):
            n = len(prompt) + len(trace)
            idx[r, at:at + n] = torch.tensor(prompt + trace)
            doc[r, at:at + n] = d
            loss_mask[r, at + len(prompt) - 1:at + n - 1] = True  # predict every trace token
            at += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = (causal & (doc[:, :, None] == doc[:, None, :]))[:, :-1, :-1]  # (R, T-1, T-1) [query, key]
    x, y, loss_mask, visible = (t.to(rt.device) for t in (idx[:, :-1], idx[:, 1:], loss_mask[:, :-1], visible))
    return x, y, loss_mask, [visible] * cfg.n_layer


# ---------------------------------------------------------------------------
# Stages


def curriculum_eps(step, cfg):
    """Return the eviction rate at an RL step: a staircase that reaches cfg.eps at step curriculum_steps.

    Level s of S = curriculum_stages is eps * (s + 1) / S. Each level below
    the last lasts curriculum_steps / (S - 1) steps: it holds for the first
    40% of them and then blends linearly into the next level.
    """
    S = cfg.curriculum_stages
    if S == 1 or step >= cfg.curriculum_steps:
        return cfg.eps
    length = cfg.curriculum_steps / (S - 1)
    s = int(step // length)
    level = cfg.eps * (s + 1) / S
    into = step / length - s
    if into < 0.4:
        return level
    return level + (cfg.eps / S) * (into - 0.4) / 0.6


def dev_accuracy(model, problems, cfg, rt, policy="none", eps=0.0):
    ecfg = eviction_config(cfg, eps)
    scfg = SamplingConfig(cfg.max_new_tokens, temperature=0.0)
    with rt.autocast():
        row = evaluate(model, problems, policy, ecfg, scfg, seed=cfg.seed, full_peaks=torch.ones(len(problems)),
                       interoception=cfg.interoception)
    return row["accuracy"]


def make_optimizer(model, lr, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def wrap(model, cfg, rt):
    """Wrap the model for the training step: compiled and/or DistributedDataParallel, as configured."""
    train_model = torch.compile(model) if cfg.compile else model
    if rt.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    return train_model


def accumulating(train_model, last):
    """Hold DistributedDataParallel's gradient all-reduce until a step's last backward pass."""
    if last or not hasattr(train_model, "no_sync"):
        return contextlib.nullcontext()
    return train_model.no_sync()


def check_finite(loss, bad, cfg, rt, logger, stage, step):
    """Count non-finite losses in a row (on any process); stop the run after cfg.max_bad_steps of them."""
    value = all_mean(loss.item(), rt)
    if math.isfinite(value):
        return 0
    bad += 1
    logger.step(stage, dict(step=step, skipped=f"non-finite loss {value}", in_a_row=bad))
    if bad >= cfg.max_bad_steps:
        raise SystemExit(f"{bad} non-finite losses in a row at {stage} step {step}; lower the learning rate "
                         f"(--warm-lr / --rl-lr) or --grad-clip and rerun with --resume")
    return bad


def run_warm(cfg, rt, logger, train, dev, budget):
    """Stage 1: next-token training on search traces with a full cache."""
    path = Path(cfg.out) / "warm.pt"
    model, opt, step = start_stage(path, cfg, rt, None, cfg.warm_lr, 0.1)
    if step is None:
        return
    examples = [(prompt_for(p, cfg, random.Random(i).choice(tasks.EPS_GRID)), tasks.encode(tasks.search_trace(p)))
                for i, p in enumerate(train)]
    kept = [(prompt, trace) for prompt, trace in examples if len(trace) <= cfg.max_new_tokens]
    if rt.main:
        print(f"warm start on {len(kept)} traces; {len(examples) - len(kept)} longer than max_new_tokens are left out")
    examples = kept
    if not examples:
        raise SystemExit(f"no warm-start trace fits max_new_tokens={cfg.max_new_tokens}; "
                         f"raise --max-new-tokens or --n-train-problems")
    train_model = wrap(model, cfg, rt)
    warmup = min(100, cfg.warm_steps // 10 + 1)
    bad, norm = 0, float("nan")

    bar = tqdm(range(step, cfg.warm_steps), desc="warm start", disable=not rt.main, initial=step, total=cfg.warm_steps)
    for step in bar:
        lr = cfg.warm_lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / cfg.warm_steps))
        for group in opt.param_groups:
            group["lr"] = lr

        x, y, mask, visible = warm_batch(examples, step, cfg, rt)
        started = time.perf_counter()
        with rt.autocast():
            logits, _, _ = train_model(x, visible)
        loss = F.cross_entropy(logits.float()[mask], y[mask])
        bad = check_finite(loss, bad, cfg, rt, logger, "warm", step)
        opt.zero_grad(set_to_none=True)
        if bad == 0:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

        done = step + 1
        if done % 50 == 0 or done == cfg.warm_steps:
            logger.step("warm", dict(step=f"{done}/{cfg.warm_steps}", loss=all_mean(loss.item(), rt),
                                     grad_norm=float(norm), lr=lr, tokens_per_s=mask.sum().item() * rt.world / (time.perf_counter() - started)))
        finished = done == cfg.warm_steps
        if done % cfg.warm_eval_every == 0 and not finished:
            acc = all_mean(dev_accuracy(model, dev[rt.rank::rt.world], cfg, rt), rt)
            logger.step("warm", dict(step=f"{done}/{cfg.warm_steps}", dev_acc=acc))
            finished = acc >= cfg.warm_target
        if finished or done % cfg.ckpt_every == 0:
            save_stage(path, model, opt, done, finished, cfg, rt)
        budget.tick()
        if finished:
            return


def group_advantage(reward, group_size):
    """Return the Dr. GRPO advantages (B,): each reward minus its group's mean, with no std division.

    Rollouts come in groups of group_size consecutive rows that share a problem.
    """
    grouped = reward.float().view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


def grpo_loss(token_lp, evict_lp, traj, advantage, n_rollouts, evict_coef=1.0):
    """Compute a batch's share of the Dr. GRPO loss (no KL term).

    token_lp (B, T) contains the replayed log-probs of the generated tokens (0
    on padding), and evict_lp (L, R) those of each round's kept set. An empty
    evict_lp, as replay returns without an eviction term, leaves that term
    out. advantage (B,) comes from group_advantage. The share is minus the
    batch's summed objective over n_rollouts, the step's rollouts on this
    process, so the shares of a step's replay batches add up to its loss.
    """
    objective = token_lp.float().sum(1) * advantage  # the stop token is in the sum, padding is 0
    if evict_lp.numel():
        evict_lp = evict_lp.float()
        L, B = evict_lp.shape[0], token_lp.shape[0]
        per_row = evict_lp.new_zeros(L, B).index_add(1, traj.round_row, evict_lp)  # (L, B)
        per_row = per_row / traj.n_rounds.clamp(min=1)  # mean over the rollout's rounds
        objective = objective + evict_coef * per_row.sum(0) * advantage  # summed over layers
    return -objective.sum() / n_rollouts  # a constant normaliser: the number of rollouts


def run_rl(stage, cfg, rt, logger, train, dev, budget):
    """Stages 2 and 3: Dr. GRPO with eviction rounds (stage "ngc") or with a full cache (stage "full").

    The logged acc is greedy dev accuracy at the curriculum's current rate, so
    it moves with the rate as well as with learning.
    """
    path = Path(cfg.out) / f"{stage}.pt"
    model, opt, step = start_stage(path, cfg, rt, Path(cfg.out) / "warm.pt", cfg.rl_lr, cfg.weight_decay)
    if step is None:
        return
    train_model = wrap(model, cfg, rt)
    scfg = SamplingConfig(cfg.max_new_tokens, cfg.temperature)
    evicting = stage == "ngc"
    eviction_term = evicting and cfg.ablation == "none"
    bad, acc = 0, float("nan")
    bar = tqdm(range(step, cfg.rl_steps), desc=f"rl {stage}", disable=not rt.main, initial=step, total=cfg.rl_steps)
    for step in bar:
        started = time.perf_counter()
        rng = random.Random(f"{cfg.seed}:{stage}:{step}")
        problems = [rng.choice(train) for _ in range(cfg.prompts_per_step)][rt.rank::rt.world]
        target_eps = curriculum_eps(step, cfg) if evicting else 0.0
        # with interoception each group draws its own rate from the grid up to the curriculum's
        if cfg.interoception:
            grid = [r for r in tasks.EPS_GRID if r <= target_eps + 1e-9]
            target_eps = grid[-1]
            rates = [rng.choice(grid) for _ in problems]
        else:
            rates = [target_eps] * len(problems)
        generator = torch.Generator(device=rt.device).manual_seed(rng.getrandbits(62) + rt.rank)

        # rollouts: G per problem
        rows = [(p, eps) for p, eps in zip(problems, rates) for _ in range(cfg.group_size)]
        prompts = [prompt_for(p, cfg, eps) for p, eps in rows]
        row_eps = torch.tensor([eps for _, eps in rows], device=rt.device)
        ecfg = eviction_config(cfg, max(rates))
        with torch.no_grad(), rt.autocast():
            traj = generate(model, prompts, tasks.STOP_ID, "ngc" if evicting else "none", ecfg, scfg, generator, row_eps)
        reward = torch.tensor([tasks.countdown_reward(tasks.decode(traj.response(b)), list(p.numbers), p.target)
                               for b, (p, _) in enumerate(rows)], device=rt.device)

        advantage = group_advantage(reward, cfg.group_size)

        # replay in batches of similar length and add up their gradients, then update unless the loss is not finite
        opt.zero_grad(set_to_none=True)
        batches = traj.length_batches(cfg.replay_batch)
        loss = 0.0
        for i, batch in enumerate(batches):
            part = traj.select(batch)
            with accumulating(train_model, last=i == len(batches) - 1):
                with rt.autocast():
                    token_lp, evict_lp = replay(train_model, part, ecfg, scfg, masked=cfg.ablation != "kv-dropout",
                                                eviction=eviction_term)
                    share = grpo_loss(token_lp, evict_lp, part, advantage[batch], len(reward), cfg.evict_coef)
                share.backward()
            loss = loss + share.detach()
        bad = check_finite(loss, bad, cfg, rt, logger, stage, step)
        if bad:
            continue
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.rl_steps:
            acc = all_mean(dev_accuracy(model, dev[rt.rank::rt.world], cfg, rt, "ngc-greedy" if evicting else "none",
                                        target_eps), rt)
        seconds = time.perf_counter() - started
        logger.step(stage, dict(step=f"{done}/{cfg.rl_steps}", eps=target_eps, reward=all_mean(reward.mean().item(), rt),
                                acc=acc, kv_peak=all_mean(traj.peak_total.float().mean().item(), rt),
                                len=all_mean(traj.response_len.float().mean().item(), rt), loss=all_mean(loss.item(), rt),
                                grad_norm=float(norm), tokens_per_s=int(traj.response_len.sum()) * rt.world / seconds))
        finished = done == cfg.rl_steps
        if finished or done % cfg.ckpt_every == 0:
            save_stage(path, model, opt, done, finished, cfg, rt)
        budget.tick()


class StepBudget:
    """Counts optimizer steps for --stop-after and exits as if killed when they run out."""

    def __init__(self, steps):
        self.left = steps or None

    def tick(self):
        if self.left is None:
            return
        self.left -= 1
        if self.left == 0:
            print("stopping early (--stop-after)")
            sys.exit(0)


# ---------------------------------------------------------------------------
# Checkpoints


def start_stage(path, cfg, rt, init_from, lr, weight_decay):
    """Return (model, optimizer, first step) for a stage, or step None when it already finished."""
    if cfg.resume and path.exists():
        model, state = load_checkpoint(path, map_location=rt.device)
        if state.get("done"):
            if rt.main:
                print(f"{path.name}: finished earlier, skipped")
            return None, None, None
        model.to(rt.device)
        opt = make_optimizer(model, lr, weight_decay)
        opt.load_state_dict(state["optimizer"])
        if rt.main:
            print(f"{path.name}: resuming at step {state['step']}")
        return model, opt, state["step"]
    if init_from is None:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(vocab_size=tasks.VOCAB_SIZE, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                              max_seq_len=64 + cfg.max_new_tokens))
        if rt.main:
            print(f"model: {model.num_params() / 1e6:.2f}M parameters")
    else:
        model, _ = load_checkpoint(init_from)
    model.to(rt.device)
    return model, make_optimizer(model, lr, weight_decay), 0


def save_stage(path, model, opt, step, done, cfg, rt):
    if rt.main:
        save_checkpoint(path, model, optimizer=opt.state_dict(), step=step, done=done, config=asdict(cfg))
    if rt.world > 1:
        dist.barrier()


def check_out_dir(cfg):
    """Refuse to mix runs: without --resume the output folder must contain no checkpoint; with it, the same config.

    warm.pt is compared only on the settings the warm start depends on, so a
    copied warm.pt can seed RL with other settings.
    """
    out = Path(cfg.out)
    existing = sorted(out.glob("*.pt"))
    if existing and not cfg.resume:
        raise SystemExit(f"{out} already contains checkpoints ({', '.join(p.name for p in existing)}); "
                         "pass --resume to continue that run, or choose another --out")
    for path in existing:
        try:
            saved = load_checkpoint(path)[1].get("config", {})
        except ValueError as error:
            raise SystemExit(str(error)) from None
        ignore = {"out", "resume", "stop_after", "device", "wandb", "n_eval", "eval_eps", "compile", "ckpt_every",
                  "eval_every", "max_bad_steps"}
        defaults = asdict(Config())  # a setting newer than the checkpoint compares as its default
        compared = WARM_FIELDS if path.name == "warm.pt" else [k for k in defaults if k not in ignore]
        changed = {k: (saved.get(k, defaults[k]), getattr(cfg, k)) for k in compared
                   if saved.get(k, defaults[k]) != getattr(cfg, k)}
        if changed:
            raise SystemExit(f"--resume with settings that differ from {path}: {changed}; use the original settings or another --out")


# ---------------------------------------------------------------------------
# Evaluation and results


def run_eval(cfg, rt, test):
    """Stage 4: every policy on the held-out problems; write results.json, results.md and results.png."""
    out = Path(cfg.out)
    ecfg = eviction_config(cfg, cfg.eps)
    scfg = SamplingConfig(cfg.max_new_tokens, temperature=0.0)
    models = {name: load_checkpoint(out / f"{name}.pt", map_location=rt.device)[0].to(rt.device).eval()
              for name in STAGES}
    rows = []

    def add(model_name, policy, eps, full_peaks):
        e = eviction_config(cfg, eps)
        with rt.autocast():
            row = evaluate(models[model_name], test, policy, e, scfg, seed=cfg.seed, full_peaks=full_peaks,
                           interoception=cfg.interoception)
        row["model"] = model_name
        print(format_row(row))
        rows.append(row)
        return row

    # NGC and the baselines on the full-cache model at every rate; the baselines on the NGC model at the trained rate
    baselines = [name for name in SCORERS if name != "ngc"]
    jobs = [("full", "none", 0.0), ("warm", "none", 0.0), ("ngc", "none", 0.0)]
    for rate in sorted({cfg.eps, *eval_rates(cfg)}):
        jobs += [("ngc", "ngc-greedy", rate)] + [("full", name, rate) for name in baselines]
    jobs += [("ngc", name, cfg.eps) for name in baselines]
    reference = None
    for model_name, policy, eps in tqdm(jobs, desc="evaluate"):
        row = add(model_name, policy, eps, reference)
        if reference is None:
            reference = row["full_peaks"]  # every reduction is against the full-cache upper bound
    for row in rows:
        row.pop("full_peaks")
        if row["name"] == "ngc-greedy":
            row["name"] = "ngc"

    results = dict(task=cfg.task, config=asdict(cfg), ecfg=asdict(ecfg), methods=rows)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(rows, cfg))
    plot(rows, out / "results.png")
    print((out / "results.md").read_text())


def results_table(rows, cfg):
    lines = [
        f"Countdown ({cfg.n_numbers} numbers), {rows[0]['n_problems']} held-out problems, greedy decoding; "
        f"cadence {cfg.delta}, block size {cfg.block_size}, window {cfg.window}.",
        "Peak-KV reduction: per problem, the full-cache upper bound's peak over the method's peak, then the mean.",
        "",
        "| method | model | eps | accuracy | 95% CI | peak-KV reduction | mean peak KV (entries, all layers) | mean length |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['model']} | {r['eps']:.2f} | {100 * r['accuracy']:.1f}% | "
                     f"{100 * r['ci95_low']:.1f}-{100 * r['ci95_high']:.1f} | {r['peak_kv_reduction']:.2f}x | "
                     f"{r['mean_peak_kv']:.0f} | {r['mean_response_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Accuracy against mean peak KV cache size per method, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping results.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = {"ngc": "o", "full": "s"}.get(r["model"], "^")
        ax.errorbar(r["mean_peak_kv"], 100 * r["accuracy"], fmt=marker,
                    yerr=[[100 * (r["accuracy"] - r["ci95_low"])], [100 * (r["ci95_high"] - r["accuracy"])]], capsize=2)
        ax.annotate(f"{r['name']} ({r['model']}, {r['eps']:.2f})", (r["mean_peak_kv"], 100 * r["accuracy"]), fontsize=6)
    ax.set_xlabel("mean peak KV cache (entries, summed over layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Countdown: accuracy against peak KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------------


def main(argv=None):
    cfg, preset = parse_args(argv)
    rt = setup_runtime(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if rt.main:
        check_out_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        print(f"preset {preset}, {rt.world} process(es) on {rt.device}, {rt.dtype}")
        for key, value in asdict(cfg).items():
            print(f"  {key} = {value}")
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if rt.world > 1:
        dist.barrier()

    logger = Logger(cfg, rt)
    train, dev, test = problem_pool(cfg)
    budget = StepBudget(cfg.stop_after)
    run_warm(cfg, rt, logger, train, dev, budget)
    for stage in ("ngc", "full"):
        run_rl(stage, cfg, rt, logger, train, dev, budget)
    if rt.world > 1:  # the evaluation runs on one process, so the others leave now rather than wait
        dist.barrier()
        dist.destroy_process_group()
    if rt.main:
        run_eval(cfg, rt, test)


if __name__ == "__main__":
    main()
