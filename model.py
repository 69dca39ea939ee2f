"""The GPT, its explicit per-layer KV cache, and the replay forward.

A decoder-only transformer in the Qwen2/Llama style: RMSNorm, rotary position
embeddings, SwiGLU MLP, grouped-query attention, optional q/k/v bias, tied or
untied embeddings. Parameter names follow the Hugging Face Qwen2 layout
(`layers.0.self_attn.q_proj.weight`, ...) so pretrained checkpoints of that
family map onto this module by dropping the leading `model.`.

Three ways to run it:
- `forward(idx)`: a plain causal forward over a batch (warm-start training).
- `prefill(idx, lengths, cache)` then `decode(tokens, cache)`: generation with
  the `KVCache` below, which stores per row and per layer the keys, values,
  absolute positions and validity of every slot.
- `replay(idx, visible)`: one teacher-forced forward in which each layer has
  its own boolean visibility mask (built from eviction times in ngc.py), so
  training sees exactly what generation saw. It also returns every layer's
  rotated queries and keys, which ngc.py needs to recompute eviction scores
  on the autograd graph.
"""

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512  # tokens, including special tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention); divides n_head
    n_embd: int = 128  # model width
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 means about 8/3 of the width, rounded up to 32
    max_seq_len: int = 1024  # maximum sequence length the rotary table covers
    rope_theta: float = 10000.0  # rotary base
    qkv_bias: bool = True  # bias on q/k/v projections, as in Qwen2
    tie_embeddings: bool = True  # share the input embedding and the output head
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} is invalid: it must be at least 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_head={self.n_head} does not divide n_embd={self.n_embd}: pick a width that is a multiple of n_head")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: grouped-query attention needs whole groups")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head size {self.n_embd // self.n_head} is odd: rotary embeddings need an even head size")
        if self.mlp_hidden == 0:
            self.mlp_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# ---------------------------------------------------------------------------
# Rotary position embeddings


def rope_tables(head_dim, max_len, theta):
    """Return the cos and sin tables, each (max_len, head_dim), for the half-rotation layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (..., T, D) by the angles of its positions; cos and sin broadcast to x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Per-layer keys, values, positions and validity for a batch of rows.

    Layout, for layer l (layers can hold different entries after eviction):
        k[l], v[l]   (B, Hkv, S, D)  rotated keys and values, slot-major
        pos[l]       (B, S) int64    absolute position each slot was written at
        valid[l]     (B, S) bool     the slot contains a live entry
        fill[l]      (B,) int64      next free slot of each row
    Within a row, live slots are in position order: appends go to the row's
    own next free slot, and compaction keeps the order of what stays. Slots
    past `fill` and evicted slots are invalid and never attended to.

    Also kept per row (shared by all layers):
        next_pos     (B,)  the position of the next token; counts every token
                           written so far, evicted or not
    and per layer, for the eviction scorers:
        q_recent[l]  (B, H, W, D) rotated queries of the W most recent tokens
        q_pos        (B, W)       their positions (-1 for none yet)
        attn_sum[l]  (B, S)       attention each slot has received, summed over
                                  queries and averaged over heads (only when
                                  track_attention is set; used by H2O)

    The cache never changes itself from inside a layer: the model writes keys
    and values at the slots `begin_step` chose, and `end_step` advances.
    """

    def __init__(self, config, batch_size, window, capacity=64, track_attention=False, device=None, dtype=torch.float32):
        self.n_layer = config.n_layer
        self.B, self.Hkv, self.D, self.H = batch_size, config.n_kv_head, config.head_dim, config.n_head
        self.window = window
        self.track_attention = track_attention
        self.dtype, self.device = dtype, device
        L, B, S = self.n_layer, batch_size, capacity
        self.k = [torch.zeros(B, self.Hkv, S, self.D, device=device, dtype=dtype) for _ in range(L)]
        self.v = [torch.zeros(B, self.Hkv, S, self.D, device=device, dtype=dtype) for _ in range(L)]
        self.pos = [torch.zeros(B, S, device=device, dtype=torch.long) for _ in range(L)]
        self.valid = [torch.zeros(B, S, device=device, dtype=torch.bool) for _ in range(L)]
        self.fill = [torch.zeros(B, device=device, dtype=torch.long) for _ in range(L)]
        self.attn_sum = [torch.zeros(B, S, device=device, dtype=torch.float32) for _ in range(L)] if track_attention else None
        self.q_recent = [torch.zeros(B, self.H, window, self.D, device=device, dtype=dtype) for _ in range(L)]
        self.q_pos = torch.full((B, window), -1, device=device, dtype=torch.long)
        self.next_pos = torch.zeros(B, device=device, dtype=torch.long)
        self._slots = None  # (B,) slot each row writes to in the current decode step

    # -- sizes --------------------------------------------------------------

    def capacity(self):
        return self.k[0].shape[2]

    def span(self, layer):
        """Number of leading slots that can hold live entries in this layer."""
        return int(self.fill[layer].max())

    def lengths(self):
        """Live entries per row and layer, (B, L)."""
        return torch.stack([v.sum(1) for v in self.valid], dim=1)

    def bytes_per_entry(self):
        """Bytes one entry takes in one layer: a key and a value for every KV head."""
        return 2 * self.Hkv * self.D * torch.finfo(self.dtype).bits // 8

    def _grow(self, needed):
        """Double the slot capacity until `needed` slots fit (contents kept)."""
        S = self.capacity()
        if needed <= S:
            return
        new = max(needed, 2 * S)
        pad = new - S
        for l in range(self.n_layer):
            self.k[l] = F.pad(self.k[l], (0, 0, 0, pad))
            self.v[l] = F.pad(self.v[l], (0, 0, 0, pad))
            self.pos[l] = F.pad(self.pos[l], (0, pad))
            self.valid[l] = F.pad(self.valid[l], (0, pad))
            if self.track_attention:
                self.attn_sum[l] = F.pad(self.attn_sum[l], (0, pad))

    # -- writing ------------------------------------------------------------

    def prefill(self, layer, k, v, lengths):
        """Write a right-padded prompt's keys and values (B, Hkv, T, D) into slots 0..T-1."""
        T = k.shape[2]
        self._grow(T)
        arange = torch.arange(T, device=k.device)
        self.k[layer][:, :, :T] = k
        self.v[layer][:, :, :T] = v
        self.pos[layer][:, :T] = arange
        self.valid[layer][:, :T] = arange[None, :] < lengths[:, None]  # (B, T)
        self.fill[layer] = lengths.clone()

    def begin_step(self):
        """Choose the slot every row writes its next token to: its own next free slot."""
        self._grow(max(self.span(l) for l in range(self.n_layer)) + 1)
        self._slots = [f.clone() for f in self.fill]

    def append(self, layer, k, v):
        """Write one token's key and value (B, Hkv, 1, D) at the slots chosen by `begin_step`."""
        rows = torch.arange(self.B, device=k.device)
        slots = self._slots[layer]
        self.k[layer][rows, :, slots] = k[:, :, 0]
        self.v[layer][rows, :, slots] = v[:, :, 0]
        self.pos[layer][rows, slots] = self.next_pos
        self.valid[layer][rows, slots] = True
        if self.track_attention:
            self.attn_sum[layer][rows, slots] = 0.0

    def push_query(self, layer, q):
        """Add one token's rotated query (B, H, 1, D) to the recent window."""
        self.q_recent[layer] = torch.cat([self.q_recent[layer][:, :, 1:], q], dim=2)  # (B, H, W, D)
        if layer == self.n_layer - 1:
            self.q_pos = torch.cat([self.q_pos[:, 1:], self.next_pos[:, None]], dim=1)  # (B, W)

    def end_step(self):
        """Advance every row by one token in every layer."""
        for l in range(self.n_layer):
            self.fill[l] = self.fill[l] + 1
        self.next_pos = self.next_pos + 1
        self._slots = None

    def keep_rows(self, rows):
        """Drop every row not in rows (R,), e.g. rows that finished; the kept rows are renumbered 0..R-1."""
        per_layer = ["k", "v", "pos", "valid", "fill", "q_recent"] + (["attn_sum"] if self.track_attention else [])
        for name in per_layer:
            setattr(self, name, [t[rows] for t in getattr(self, name)])
        self.q_pos, self.next_pos = self.q_pos[rows], self.next_pos[rows]
        self.B = len(rows)

    # -- eviction -----------------------------------------------------------

    def compact(self, layer, rows, keep):
        """Keep, for each row in `rows` (R,), the slots where keep (R, S) is true, moved to the front in order."""
        S = keep.shape[1]
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (R, S) kept slots first, in order
        n_keep = keep.sum(1)  # (R,)
        still_valid = torch.arange(S, device=keep.device)[None, :] < n_keep[:, None]  # (R, S)

        idx_kv = order[:, None, :, None].expand(-1, self.Hkv, -1, self.D)  # (R, Hkv, S, D)
        self.k[layer][rows, :, :S] = self.k[layer][rows, :, :S].gather(2, idx_kv)
        self.v[layer][rows, :, :S] = self.v[layer][rows, :, :S].gather(2, idx_kv)
        self.pos[layer][rows, :S] = self.pos[layer][rows, :S].gather(1, order)
        self.valid[layer][rows, :S] = still_valid
        if self.track_attention:
            self.attn_sum[layer][rows, :S] = self.attn_sum[layer][rows, :S].gather(1, order)
        self.fill[layer][rows] = n_keep


# ---------------------------------------------------------------------------
# The transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_width = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def project(self, x, cos, sin):
        """Return rotated queries (B, H, T, D), rotated keys and values (B, Hkv, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D); mask (B, 1, Tq, Tk) bool, True = visible."""
        B, H, Tq, D = q.shape
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)  # (B, H, Tq, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, H * D))


def attention_weights(q, k, mask):
    """Softmax attention weights (B, H, Tq, Tk) of q (B, H, Tq, D) over k (B, Hkv, Tk, D).

    mask (B, 1 or Tq, Tk) or broadcastable, True = visible. A query that sees
    no key gets uniform weights, so callers must give such queries no weight.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    grouped = q.reshape(B, Hkv, H // Hkv * Tq, D)  # query head h reads key head h // (H // Hkv)
    logits = (grouped @ k.transpose(-2, -1)).view(B, H, Tq, Tk) / math.sqrt(D)  # (B, H, Tq, Tk)
    logits = logits.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    return logits.softmax(-1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _rope_at(self, positions):
        """cos and sin (B, 1, T, D) for integer positions (B, T)."""
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is past max_seq_len={self.config.max_seq_len}: "
                             "raise GPTConfig.max_seq_len or generate fewer tokens")
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def _block(self, block, x, cos, sin, mask):
        """One transformer block over full sequences; returns x and the layer's rotated q and k."""
        q, k, v = block.self_attn.project(block.input_layernorm(x), cos, sin)
        x = x + block.self_attn.attend(q, k, v, mask)
        x = x + block.mlp(block.post_attention_layernorm(x))
        return x, q, k

    # -- full sequences -----------------------------------------------------

    def forward(self, idx, visible=None):
        """Plain causal forward: logits (B, T, V) for token ids idx (B, T).

        With per-layer masks `visible`, this is `replay` instead (the training
        step calls it through forward because DistributedDataParallel only
        synchronises gradients of forward calls).
        """
        if visible is not None:
            return self.replay(idx, visible)
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self._rope_at(positions)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]  # (1, 1, T, T)
        x = self.embed_tokens(idx)
        for block in self.layers:
            x, _, _ = self._block(block, x, cos, sin, causal)
        return self.lm_head(self.norm(x))

    def replay(self, idx, visible):
        """Teacher-forced forward with one visibility mask per layer.

        idx (B, T) token ids; visible: list of L bool masks (B, T, T), True
        where query i may attend key j. Returns logits (B, T, V) and, per
        layer, the rotated queries (B, H, T, D) and keys (B, Hkv, T, D).
        """
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self._rope_at(positions)
        x = self.embed_tokens(idx)
        qs, ks = [], []
        for block, mask in zip(self.layers, visible):
            x, q, k = self._block(block, x, cos, sin, mask[:, None])
            qs.append(q)
            ks.append(k)
        return self.lm_head(self.norm(x)), qs, ks

    # -- generation with a cache ---------------------------------------------

    def new_cache(self, batch_size, window, track_attention=False):
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, window, track_attention=track_attention, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def prefill(self, idx, lengths, cache):
        """Run right-padded prompts idx (B, T) with lengths (B,) into an empty cache; return last-token logits (B, V)."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self._rope_at(positions)
        key_ok = positions < lengths[:, None]  # (B, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None] & key_ok[:, None, :]  # (B, T, T)
        mask = mask | torch.eye(T, dtype=torch.bool, device=idx.device)[None]  # padding queries see themselves, never NaN

        W = cache.window
        win_pos = lengths[:, None] - W + torch.arange(W, device=idx.device)  # (B, W) last W prompt positions
        win_idx = win_pos.clamp(min=0)[:, None, :, None].expand(-1, self.config.n_head, -1, self.config.head_dim)
        cache.q_pos = torch.where(win_pos >= 0, win_pos, -1)

        x = self.embed_tokens(idx)
        for l, block in enumerate(self.layers):
            q, k, v = block.self_attn.project(block.input_layernorm(x), cos, sin)
            cache.prefill(l, k, v, lengths)
            cache.q_recent[l] = q.gather(2, win_idx)  # (B, H, W, D)
            if cache.track_attention:
                weights = attention_weights(q, k, mask[:, None])  # (B, H, T, T)
                cache.attn_sum[l][:, :T] = (weights * key_ok[:, None, :, None]).mean(1).sum(1)  # (B, T) over real queries
            x = x + block.self_attn.attend(q, k, v, mask[:, None])
            x = x + block.mlp(block.post_attention_layernorm(x))
        cache.next_pos = lengths.clone()

        logits = self.lm_head(self.norm(x))  # (B, T, V)
        return logits[torch.arange(B, device=idx.device), lengths - 1]

    @torch.no_grad()
    def decode(self, tokens, cache):
        """Run one token per row, tokens (B,), through the cache; return logits (B, V)."""
        positions = cache.next_pos[:, None]  # (B, 1)
        cos, sin = self._rope_at(positions)
        cache.begin_step()

        x = self.embed_tokens(tokens[:, None])  # (B, 1, C)
        for l, block in enumerate(self.layers):
            q, k, v = block.self_attn.project(block.input_layernorm(x), cos, sin)
            cache.append(l, k, v)
            cache.push_query(l, q)
            S = cache.span(l) + 1
            mask = cache.valid[l][:, None, None, :S]  # (B, 1, 1, S)
            k_all, v_all = cache.k[l][:, :, :S], cache.v[l][:, :, :S]
            if cache.track_attention:
                cache.attn_sum[l][:, :S] += attention_weights(q, k_all, mask).mean(1)[:, 0]  # (B, S)
            x = x + block.self_attn.attend(q, k_all, v_all, mask)
            x = x + block.mlp(block.post_attention_layernorm(x))
        cache.end_step()
        return self.lm_head(self.norm(x))[:, 0]


# ---------------------------------------------------------------------------
# Checkpoints



def save_checkpoint(path, model, **extra):
    """Write the model's weights and config plus `extra` (plain values and tensors) atomically.

    The file is written under a temporary name and renamed, so a run killed
    mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = getattr(model, "module", model)  # unwrap DistributedDataParallel
    raw = getattr(raw, "_orig_mod", raw)  # unwrap torch.compile, so keys never carry "_orig_mod."
    state = dict(model=raw.state_dict(), model_config=asdict(raw.config), **extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint; return (GPT, the whole checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass the path of a .pt file written by train.py")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint of this project ({reason}); "
                         "delete it and rerun, or pass another file") from error
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise ValueError(f"checkpoint {path} has no model weights or config; pass a file written by train.py")
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint {path} does not match this version of model.py: {str(error).splitlines()[0]}") from error
    return model, state
