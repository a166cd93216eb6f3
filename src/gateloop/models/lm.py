"""The language model: embedding, blocks of (mixer, MLP), final norm, head; and generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MLP, GatedMLP, RMSNorm, resolve_mixer
from .config import ModelConfig

LayerStates = list  # one mixer state per layer (a tensor, a KV cache, ...), or None before the first call


class Block(nn.Module):
    """One layer: the mixer and the MLP, each in a residual branch, pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.post_norm = cfg.norm == "post"
        self.mixer = resolve_mixer(cfg.mixer)(cfg.d_model, layer_idx=layer_idx, n_layers=cfg.n_layers,
                                       **cfg.mixer_options)
        self.norm1 = RMSNorm(cfg.d_model)
        expansion = {} if cfg.mlp_expansion is None else {"expansion": cfg.mlp_expansion}
        self.mlp = {"swiglu": lambda: GatedMLP(cfg.d_model, **expansion),
                    "gelu": lambda: MLP(cfg.d_model, **expansion),
                    "none": lambda: None}[cfg.mlp]()
        self.norm2 = RMSNorm(cfg.d_model) if self.mlp is not None else None

    def forward(self, x: Tensor, state=None):
        if self.post_norm:
            y, state = self.mixer(x, state)
            x = self.norm1(x + y)
            if self.mlp is not None:
                x = self.norm2(x + self.mlp(x))
        else:
            y, state = self.mixer(self.norm1(x), state)
            x = x + y
            if self.mlp is not None:
                x = x + self.mlp(self.norm2(x))
        return x, state


class LanguageModel(nn.Module):
    """tokens [B, T] int64 -> logits [B, T, vocab_size], carrying one state per layer.

        logits, state = model(tokens)               # a whole sequence, in parallel
        logits, state = model(next_tokens, state)   # continue from where it stopped
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Post-norm blocks end normalised already; pre-norm ones need a final norm.
        self.norm = RMSNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, state: LayerStates | None = None) -> tuple[Tensor, LayerStates]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T]; got shape {tuple(tokens.shape)}")
        # An id outside the embedding is an IndexError there (a device-side assert on CUDA): a clear
        # error instead. On an accelerator the check would sync the host on every call and, under
        # torch.compile, break the graph, so there it is made at the data boundary (generate's
        # prompt; the training batches come from the run's own tokenizer, checked by load_run).
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            check_token_ids(tokens, self.cfg.vocab_size)
        x = self.embed(tokens)  # [B, T, D]
        state = state if state is not None else [None] * len(self.blocks)
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s = block(x, s)
            new_state.append(s)
        return self.head(self.norm(x)), new_state

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False):
        """Sample a continuation of prompt [B, T0] (int64): tokens [B, T0 + max_new_tokens].

        The prompt runs once in parallel; then one token per step, carrying the state, so a
        recurrent mixer's memory per token does not grow with the context. temperature 0 is greedy.
        With return_logits, also returns the logits [B, max_new_tokens, vocab] each token was drawn from.
        """
        tokens, seen = [prompt], []
        for token, logits in self.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, generator=generator):
            tokens.append(token)
            seen.append(logits)
        out = torch.cat(tokens, dim=1)
        if not return_logits:
            return out
        if not seen:
            return out, self.head.weight.new_empty(out.shape[0], 0, self.cfg.vocab_size)
        return out, torch.stack(seen, dim=1)

    @torch.no_grad()
    def stream(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None):
        """generate() one step at a time: yields (token [B, 1], the logits [B, vocab] it was drawn from)."""
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be [B, T0] with T0 >= 1; got shape {tuple(prompt.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        check_token_ids(prompt, self.cfg.vocab_size)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            return
        logits, state = self(prompt)
        logits = logits[:, -1]
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator, top_p=top_p)  # [B, 1]
            yield token, logits
            if i + 1 < max_new_tokens:  # the last token's own logits are never needed
                logits, state = self(token, state)
                logits = logits[:, -1]


def check_token_ids(tokens: Tensor, vocab_size: int) -> None:
    """ValueError unless every id is in [0, vocab_size)."""
    if tokens.numel():
        lo, hi = torch.aminmax(tokens)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}) (the vocabulary); "
                             f"got ids from {lo.item()} to {hi.item()}")


def sample(logits: Tensor, temperature: float, top_k: int | None, generator=None, *,
           top_p: float | None = None) -> Tensor:
    """One token per row of logits [B, vocab] -> [B, 1]: greedy at temperature 0, else sampling from the
    top_k most likely tokens and, with top_p, from the fewest most likely whose probabilities reach top_p."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens ranked above each
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0)  # the most likely always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)
