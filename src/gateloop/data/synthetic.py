"""Synthetic tasks: pure generator functions, seed in, tensors out (docs/tasks.md).

Each generator returns ``(inputs [n, T] int64, targets [n, T] int64)``; a target of IGNORE (-100)
marks a position that is not scored. A task is scored by per-token accuracy on the scored positions.
The same (arguments, seed) always give the same tensors; nothing here draws from global RNG state.

    memory_horizon   running sum mod N since the last RESET (the GateLoop paper's task, our form)
    mqar             multi-query associative recall (Zoology, Arora et al. 2023)
    selective_copy   data tokens scattered among noise, reproduced in order at the end (Mamba)

``vocab_size(name, **params)`` gives the vocabulary a task's tokens live in, and ``TASKS`` maps a
task's name to its generator, so a runner needs nothing task-specific. ``drop_overlap`` removes
from a test set every sequence that also occurs in the training set.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

IGNORE = -100


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _random_positions(n: int, length: int, count: Tensor, g: torch.Generator) -> Tensor:
    """[n, length] bool with exactly count[i] True entries in row i, at uniformly random places."""
    ranks = torch.rand(n, length, generator=g).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    return ranks < count[:, None]


def memory_horizon(n: int, seq_len: int = 64, *, n_numbers: int = 10, max_resets: int = 8,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Numbers 0..N-1 (N = n_numbers) and a RESET token (= N); every step is scored.

    Each sequence holds R resets at distinct random positions, R uniform in 1..max_resets (at most
    seq_len). The target at step t is (sum of the numbers since the last RESET, or since the start
    before the first RESET) mod N; at a RESET it is 0. Vocabulary: N + 1 tokens.
    """
    _check(n >= 1 and seq_len >= 1 and n_numbers >= 2 and max_resets >= 1,
           "memory_horizon needs n >= 1, seq_len >= 1, n_numbers >= 2, max_resets >= 1")
    g = _generator(seed)
    numbers = torch.randint(0, n_numbers, (n, seq_len), generator=g)
    resets = torch.randint(1, min(max_resets, seq_len) + 1, (n,), generator=g)
    is_reset = _random_positions(n, seq_len, resets, g)
    inputs = torch.where(is_reset, n_numbers, numbers)
    total = torch.where(is_reset, 0, numbers).cumsum(dim=1)  # running sum that skips resets
    # Running sum at the last RESET at or before t (0 before the first one): subtract it.
    steps = torch.arange(seq_len).expand(n, seq_len)
    last_reset = torch.where(is_reset, steps, -1).cummax(dim=1).values
    base = torch.where(last_reset >= 0, total.gather(1, last_reset.clamp(min=0)), 0)
    return inputs, (total - base) % n_numbers


def mqar(n: int, seq_len: int = 64, *, n_keys: int = 32, n_values: int = 32, n_pairs: int = 8,
         seed: int = 0) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall: key-value pairs, then each key queried once, later.

    Tokens: 0 = blank, keys 1..n_keys, values n_keys+1..n_keys+n_values. The first 2 * n_pairs
    steps are the pairs k_1 v_1 ... k_P v_P (distinct keys, values drawn with replacement). The rest
    of the sequence is blank except for the P queries: every key once, in random order, at random
    positions; a query is followed by its value (as in Zoology, the next input is the answer). The
    target at a query is its value; nothing else is scored. Zoology draws query gaps from a power
    law; here they are uniform. Vocabulary: 1 + n_keys + n_values tokens.
    """
    _check(n >= 1 and n_pairs >= 1 and n_values >= 1, "mqar needs n >= 1, n_pairs >= 1, n_values >= 1")
    _check(n_keys >= n_pairs, f"mqar needs n_keys >= n_pairs (distinct keys), got {n_keys} < {n_pairs}")
    _check(seq_len >= 4 * n_pairs, f"mqar needs seq_len >= 4 * n_pairs = {4 * n_pairs}, got {seq_len}")
    g = _generator(seed)
    keys = torch.rand(n, n_keys, generator=g).argsort(dim=1)[:, :n_pairs] + 1  # [n, P] distinct
    values = torch.randint(0, n_values, (n, n_pairs), generator=g) + n_keys + 1
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * n_pairs:2], inputs[:, 1:2 * n_pairs:2] = keys, values
    # Query slots: the query region holds seq_len - 2P steps, seen as (seq_len - 2P) // 2 pairs of
    # steps (query, answer); P of those slots are chosen, and the pairs are asked in random order.
    slots = (seq_len - 2 * n_pairs) // 2
    chosen = torch.rand(n, slots, generator=g).argsort(dim=1)[:, :n_pairs].sort(dim=1).values
    query_pos = 2 * n_pairs + 2 * chosen  # [n, P] ascending
    order = torch.rand(n, n_pairs, generator=g).argsort(dim=1)
    rows = torch.arange(n)[:, None]
    inputs[rows, query_pos] = keys.gather(1, order)
    inputs[rows, query_pos + 1] = values.gather(1, order)
    targets[rows, query_pos] = values.gather(1, order)
    return inputs, targets


def selective_copy(n: int, seq_len: int = 64, *, n_data: int = 8, n_tokens: int = 8,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Selective copying (Gu & Dao 2023): reproduce the scattered data tokens in order.

    Tokens: 0 = noise (blank), 1 = marker, data tokens 2..n_tokens+1. A sequence is a context of
    seq_len - n_data steps holding n_data data tokens at random positions among noise, then n_data
    markers; the target at the i-th marker is the i-th data token of the context. Only the markers
    are scored. Vocabulary: n_tokens + 2 tokens.
    """
    context = seq_len - n_data
    _check(n >= 1 and n_data >= 1 and n_tokens >= 1, "selective_copy needs n >= 1, n_data >= 1, n_tokens >= 1")
    _check(context >= n_data, f"selective_copy needs seq_len >= 2 * n_data = {2 * n_data}, got {seq_len}")
    g = _generator(seed)
    data = torch.randint(0, n_tokens, (n, n_data), generator=g) + 2
    where = _random_positions(n, context, torch.full((n,), n_data), g)
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, :context][where] = data.flatten()  # row-major: the i-th True of a row gets data[row, i]
    inputs[:, context:] = 1
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, context:] = data
    return inputs, targets


TASKS = {"memory_horizon": memory_horizon, "mqar": mqar, "selective_copy": selective_copy}


def vocab_size(name: str, **params) -> int:
    """The number of distinct tokens task `name` uses with these generator parameters."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    p = {**task_defaults(name), **params}
    return {"memory_horizon": lambda: p["n_numbers"] + 1,
            "mqar": lambda: 1 + p["n_keys"] + p["n_values"],
            "selective_copy": lambda: p["n_tokens"] + 2}[name]()


def task_defaults(name: str) -> dict:
    """The generator's parameters and their defaults: {"seq_len": 256, "n_numbers": 10, ...}."""
    params = inspect.signature(TASKS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("n", "seed")}


def drop_overlap(train_inputs: Tensor, test_inputs: Tensor, test_targets: Tensor) -> tuple[Tensor, Tensor, int]:
    """The test set without the sequences whose inputs also occur in training, and how many went."""
    seen = {row.numpy().tobytes() for row in train_inputs}
    keep = torch.tensor([row.numpy().tobytes() not in seen for row in test_inputs], dtype=torch.bool)
    return test_inputs[keep], test_targets[keep], int((~keep).sum())


def accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, scored) over the positions whose target is not IGNORE; logits [..., vocab]."""
    scored = targets != IGNORE
    correct = (logits.argmax(-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
