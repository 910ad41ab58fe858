"""Training workloads that every ggcomm benchmark reuses.

Compression is judged on what it does to training, so the benchmarks need a real model on
real data that runs anywhere (CPU, no download) and is the same everywhere. Two workloads:

* **Byte-level GPT on Python source.** :class:`GPT` is a small decoder-only transformer
  (token + learned position embeddings, pre-LayerNorm blocks with causal
  ``scaled_dot_product_attention`` and a 4x GELU MLP, final LayerNorm, untied linear head),
  trained as a next-byte language model on :func:`stdlib_corpus`: the ``*.py`` sources of the
  running interpreter's standard library. Its gradients are the realistic mix of embedding,
  attention, MLP and LayerNorm tensors that DDP buckets carry. :class:`ByteDataset` samples
  deterministic batches from it; :func:`next_token_accuracy` is the quality metric next to
  the loss.
* **Wide MLP regression.** :func:`make_mlp_workload` builds ``depth`` ``width x width``
  linear layers (50M parameters at the default 4096 x 3) fed with a small random batch from
  :func:`mlp_batch`: compute per step is tiny next to the 200 MB of fp32 gradients to
  exchange, so step time is dominated by communication, which is what compression targets.

Both models have ``forward(x, targets=None) -> (output, loss)`` so one training loop
(:func:`ggcomm.tools.train.fit`) drives either. Initialization is deterministic given
``torch.manual_seed``. :func:`free_port` picks the rendezvous port of a local multi-process
run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPT",
    "ByteDataset",
    "GPTConfig",
    "GPTEmbed",
    "GPTHead",
    "WideMLP",
    "gpt_layers",
    "lr_factor",
    "recipe_report",
    "regression_dataset",
    "lm_loss",
    "make_mlp_workload",
    "mlp_batch",
    "next_token_accuracy",
    "stdlib_corpus",
]

Split = Literal["train", "val"]

# ---------------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """Shape of :class:`GPT`. The defaults (~0.88M parameters) are byte-level (vocab 256)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    @classmethod
    def small(cls, **overrides: int | float) -> GPTConfig:
        """The ~2.8M-parameter variant: 6 layers, 6 heads, width 192."""
        params: dict = {"n_layer": 6, "n_head": 6, "n_embd": 192}
        params.update(overrides)
        return cls(**params)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Small GPT-style decoder-only language model.

    ``forward(idx, targets=None)`` takes int64 token ids ``(B, T)`` with ``T <= block_size``
    and returns ``(logits, loss)``: logits ``(B, T, vocab_size)`` and the mean cross-entropy
    against ``targets`` (``None`` without targets).

    Weights are initialized GPT-2 style (normal(0, 0.02), residual projections scaled by
    ``1 / sqrt(2 * n_layer)``, zero biases), drawn from torch's global generator in
    module-registration order, so ``torch.manual_seed(s)`` fixes them.
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GPTConfig()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


class GPTEmbed(nn.Module):
    """A GPT's input layer as a module of its own: token ids ``(B, T)`` -> hidden states."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop = gpt.tok_emb, gpt.pos_emb, gpt.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


class GPTHead(nn.Module):
    """A GPT's output layer as a module of its own: hidden states -> logits."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


def gpt_layers(gpt: GPT) -> list[nn.Module]:
    """``gpt`` as a flat list of layers, for pipeline engines that cut a model into stages.

    ``[GPTEmbed, Block, ..., Block, GPTHead]``, sharing ``gpt``'s parameters:
    ``nn.Sequential(*gpt_layers(gpt))(idx)`` equals ``gpt(idx)[0]``. Every activation
    between two layers is a float ``(B, T, n_embd)`` tensor, what a stage boundary sends.
    """
    return [GPTEmbed(gpt), *gpt.blocks, GPTHead(gpt)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits ``(B, T, V)`` against targets ``(B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def lr_factor(steps: int, warmup: int = 20, floor: float = 0.1, cosine: bool = True):
    """Learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR`` (step 0 first).

    Linear warm-up over ``warmup`` steps, then a cosine decay that reaches ``floor`` at step
    ``steps`` (or constant with ``cosine=False``). Decay makes the final loss far less
    sensitive to when a run happens to leave a plateau, so runs compared at the same step
    are comparable.
    """
    warmup = max(warmup, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def next_token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions where the arg-max of ``logits`` (…, V) equals ``targets`` (…)."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def stdlib_corpus(max_bytes: int = 8_000_000) -> bytes:
    """The running interpreter's standard-library ``*.py`` sources, concatenated.

    Files under ``sysconfig.get_paths()["stdlib"]`` are read as raw bytes in sorted order of
    their POSIX relative path and concatenated until ``max_bytes`` (the last file is cut).
    Skipped: any directory named ``site-packages`` / ``dist-packages`` (third-party code that
    differs between environments) and the test suites ``test`` / ``tests`` / ``idlelib/idle_test``
    (large, full of odd fixtures, and removed by some distributions, so leaving them out keeps
    the corpus the same across installs of one Python version). ``idlelib`` itself is kept: it
    is ordinary application code. CPython 3.11 gives about 12 MB this way.

    Deterministic for a given interpreter version and installation; nothing is downloaded or
    cached on disk.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune skipped directories instead of filtering afterwards: the test suites are
        # most of the stdlib's files.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    chunks: list[bytes] = []
    total = 0
    for _, path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return b"".join(chunks)


class ByteDataset:
    """A byte corpus as a uint8 tensor, split into train (first 95%) and val (last 5%).

    :meth:`batch` draws ``batch_size`` random windows of ``block_size + 1`` bytes from one split
    with the given ``torch.Generator``: inputs are the first ``block_size`` bytes, targets the
    same shifted by one. The same generator state gives the same batch.
    """

    def __init__(self, data: bytes, block_size: int = 128, val_fraction: float = 0.05) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.block_size = block_size
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n_val = int(len(self.data) * val_fraction)
        self.train = self.data[: len(self.data) - n_val]
        self.val = self.data[len(self.data) - n_val :]
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) < block_size + 1:
                raise ValueError(
                    f"{name} split has {len(split)} bytes, need at least block_size + 1 = "
                    f"{block_size + 1}"
                )

    @classmethod
    def from_stdlib(cls, block_size: int = 128, max_bytes: int = 8_000_000) -> ByteDataset:
        """The dataset over :func:`stdlib_corpus`."""
        return cls(stdlib_corpus(max_bytes), block_size=block_size)

    def split(self, split: Split) -> torch.Tensor:
        """The uint8 tensor of ``"train"`` or ``"val"``."""
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def batch(
        self, split: Split, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both int64 ``(batch_size, block_size)``: ``y[:, i]`` is the byte that
        follows ``x[:, i]`` in the text (so ``y[:, :-1] == x[:, 1:]``)."""
        data = self.split(split)
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(self.block_size + 1)
        windows = data[idx].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------
# Wide MLP
# ---------------------------------------------------------------------------------------------


class WideMLP(nn.Module):
    """``depth`` ``width x width`` linear layers with ReLU between them, MSE regression.

    ``forward(x, targets=None) -> (y, loss)`` like :class:`GPT`.
    """

    def __init__(self, width: int = 4096, depth: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"need width >= 1 and depth >= 1, got {width=} {depth=}")
        self.width = width
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width, width))
        self.net = nn.Sequential(*layers)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self.net(x)
        loss = F.mse_loss(y, targets) if targets is not None else None
        return y, loss


def make_mlp_workload(width: int = 4096, depth: int = 3) -> WideMLP:
    """The communication-bound workload: a :class:`WideMLP` (``depth * (width^2 + width)``
    parameters; 50.3M at the defaults) with PyTorch's default, seed-determined init.
    Feed it with :func:`mlp_batch`."""
    return WideMLP(width, depth)


def mlp_batch(
    batch_size: int, width: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random regression batch ``(x, y)``, both float32 ``(batch_size, width)``.

    ``x`` is standard normal; the target is a fixed nonlinear function of it,
    ``y = tanh(roll(x, 1, dim=-1))``, so the loss can actually go down (there is a function
    to learn) without storing a teacher network.
    """
    x = torch.randn(batch_size, width, generator=generator)
    return x, torch.tanh(torch.roll(x, shifts=1, dims=-1))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: a local run's rendezvous port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def regression_dataset(n: int = 8192, features: int = 32) -> torch.utils.data.TensorDataset:
    """Synthetic regression for the framework recipes: ``y = tanh(x @ w)`` for a fixed
    ``w`` (seeded, no download)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tanh(x @ torch.randn(features, 1, generator=g)))


def recipe_report(stats: dict, rank: int, losses: list[float], json_dir: str | None,
                  **extra: object) -> None:
    """What a framework recipe prints per rank (losses, steps through ggcomm, bytes saved),
    and with ``json_dir`` writes to ``json_dir/rank{rank}.json`` with ``extra``."""
    sent = (f"{stats['ratio']:.1f}x fewer bytes than fp32 allreduce" if stats["bytes_sent"]
            else "nothing sent")
    print(f"rank {rank}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, {stats['steps']:.0f} steps "
          f"through ggcomm, {sent}", flush=True)
    if json_dir:
        os.makedirs(json_dir, exist_ok=True)
        with open(os.path.join(json_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"rank": rank, **extra, "losses": losses, "stats": stats}, fh)
