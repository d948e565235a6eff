"""A tiny GPT for the character-level corpus: 2 layers, d=64, 4 heads, context 64, vocab 128.

``model(batch).loss`` works like a Hugging Face causal LM: ``batch`` is an int64 tensor of shape
``(B, T + 1)`` (what :class:`training.data.BatchSampler` yields) and the model predicts column
``j + 1`` from columns ``<= j``. The returned :class:`GPTOutput` carries ``loss`` and ``logits``.

Initialisation is a pure function of ``seed``: the layers allocate uninitialised parameters
(no ``nn.Linear`` / ``nn.Embedding``, whose constructors draw from the global RNG) and every
parameter is then drawn from a private ``torch.Generator``, so constructing a model never
consumes or depends on the global RNG (two processes with the same seed hold bit-identical
weights). No dropout: a forward pass is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPTOutput", "TinyGPT"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; the defaults are the tiny GPT of the DiLoCo validation."""

    vocab_size: int = 128
    context: int = 64
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.context, self.n_layer, self.d_model, self.n_head, self.mlp_ratio) < 1:
            raise ValueError(f"every GPTConfig field must be positive: {self}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")


class GPTOutput(NamedTuple):
    """``loss``: mean next-token cross-entropy in nats (a scalar); ``logits``: ``(B, T, V)``."""

    loss: torch.Tensor
    logits: torch.Tensor


class _Linear(nn.Module):
    """``y = x W^T + b`` with uninitialised parameters (:meth:`TinyGPT.reset_parameters` fills them)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Embedding(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = _Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = _Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = _Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = _Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Pre-LayerNorm GPT with learned positions and an output head tied to the token embedding."""

    def __init__(self, config: GPTConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else GPTConfig()
        self.tok_emb = _Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = _Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Draw every parameter again from a generator seeded with ``seed`` (GPT-2's scheme).

        Weights ~ N(0, 0.02); the projections that write into the residual stream use
        0.02 / sqrt(2 * n_layer) so the stream's variance does not grow with depth; biases 0,
        LayerNorm gains 1.
        """
        gen = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():  # a stable, documented order
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                else:
                    std = residual_std if name.endswith(("attn.proj.weight", "out.weight")) else 0.02
                    p.normal_(0.0, std, generator=gen)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for int64 ``tokens`` of shape ``(B, T)``, ``T <= context``.

        Raises ``ValueError`` if the sequence is longer than the context.
        """
        t = tokens.shape[1]
        if t > self.config.context:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.config.context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)

    def forward(self, batch: torch.Tensor, targets: torch.Tensor | None = None) -> GPTOutput:
        """Loss and logits of a batch.

        With ``targets=None``, ``batch`` is ``(B, T + 1)``: inputs are ``batch[:, :-1]`` and
        targets ``batch[:, 1:]``. With ``targets``, ``batch`` holds the inputs and ``targets``
        the labels, both ``(B, T)``.

        Raises ``ValueError`` if the sequence exceeds the context or the shapes disagree.
        """
        if targets is None:
            batch, targets = batch[:, :-1], batch[:, 1:]
        if batch.shape != targets.shape:
            raise ValueError(f"inputs {tuple(batch.shape)} and targets {tuple(targets.shape)} differ in shape")
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return GPTOutput(loss, logits)

    def num_parameters(self) -> int:
        """Number of distinct trainable scalars (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
