"""A gateloop LanguageModel as a transformers causal LM: its config, the model, and the mixer states as a Cache.

    config = GateLoopConfig.from_model_config(run_cfg.model)       # model_type "gateloop"
    model = GateLoopForCausalLM(config)                           # wraps LanguageModel as model.model
    out = model(input_ids, labels=input_ids)                      # out.loss: the project's loss
    model.generate(input_ids, max_new_tokens=50, do_sample=True, top_p=0.9)

The state of every layer (a recurrent state, a KV cache, a memory's weights) lives in one GateLoopCache,
so generate feeds each new token once: one call for the prompt, then one token per call.
"""

from __future__ import annotations

from dataclasses import field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..checkpoint import build_model
from ..errors import UserError
from ..layers import MIXERS, map_state, state_tensors
from ..models import ModelConfig

# Mixers whose state is a fixed-size tensor per sequence, whatever its length: a batch of unequal
# prompts can be run one prompt at a time and the states stacked. The others keep state that
# depends on the position (a KV cache's length; Miras's partial chunk, counted per batch), so rows
# of different lengths cannot share one state. tests/test_hf.py checks this table against the mixers.
PADDABLE_MIXERS = frozenset({"gateloop", "hgrn", "hgrn2", "lstm", "mingru", "minlstm"})


class GateLoopConfig(PretrainedConfig):
    """The fields of gateloop's ModelConfig (tie_embeddings is transformers' tie_word_embeddings)."""

    model_type = "gateloop"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    mixer: str = "gateloop"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    mixer_options: dict = field(default_factory=dict)
    mlp: str = "swiglu"
    mlp_expansion: float | None = None
    norm: str = "pre"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mixer not in MIXERS:  # never resolve "module:Class" here: that would import code a config names
            raise UserError(f"gateloop config: mixer {self.mixer!r} is not one of the package's mixers "
                            f"({', '.join(sorted(MIXERS))}); transformers loads those only (no remote code)")
        try:  # a tampered config.json fails here, naming the field, before any weights are read
            self.to_model_config().validate()
        except (ValueError, TypeError) as e:
            raise UserError(f"gateloop config: {e}") from None

    def to_model_config(self) -> ModelConfig:
        if not isinstance(self.mixer_options, dict):
            raise TypeError(f"mixer_options must be a JSON object, got {self.mixer_options!r}")
        return ModelConfig(mixer=self.mixer, vocab_size=self.vocab_size, d_model=self.d_model,
                           n_layers=self.n_layers, mixer_options=dict(self.mixer_options), mlp=self.mlp,
                           mlp_expansion=self.mlp_expansion, norm=self.norm, tie_embeddings=self.tie_word_embeddings)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> GateLoopConfig:
        return cls(mixer=cfg.mixer, vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                   mixer_options=dict(cfg.mixer_options), mlp=cfg.mlp, mlp_expansion=cfg.mlp_expansion,
                   norm=cfg.norm, tie_word_embeddings=cfg.tie_embeddings, **kwargs)


def cat_states(states: list, mixer: str):
    """The states of separate batches joined along the batch dimension (dim 0 of every tensor)."""
    first = states[0]
    if isinstance(first, Tensor):
        shapes = {tuple(s.shape[1:]) for s in states}
        if len(shapes) > 1:
            raise ValueError(f"mixer {mixer!r}: the prompts' states differ in shape {sorted(shapes)}")
        return torch.cat(states, dim=0)
    if isinstance(first, dict):
        return {k: cat_states([s[k] for s in states], mixer) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_states(list(parts), mixer) for parts in zip(*states))
    if any(s != first for s in states):
        raise ValueError(f"mixer {mixer!r}: the prompts' states differ ({states})")
    return first


class GateLoopCache(Cache):
    """The LanguageModel's state (one entry per layer) and the number of tokens it has seen.

    A recurrent state cannot be rolled back, so crop() refuses; reordering and selecting batch rows
    (beam search, several sequences per prompt) act on dim 0 of every state tensor."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__(layers=[])
        self.state = None
        self.seen = 0

    def __repr__(self):
        return f"GateLoopCache(seen={self.seen})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        tensors = state_tensors(self.state)
        return tensors[0].shape[0] if tensors else -1

    def advance(self, state, n_tokens: int) -> None:
        self.state, self.seen = state, self.seen + n_tokens

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = map_state(self.state, lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot be rolled back (GateLoopCache.crop)")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a recurrent state keeps no past states to roll back to (GateLoopCache)")


class GateLoopPreTrainedModel(PreTrainedModel):
    config_class = GateLoopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted generation: the state cannot be rolled back
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """Nothing: LanguageModel initialises itself (each mixer as its paper does) when it is built, and
        from_pretrained then overwrites every weight; transformers' generic init would undo the first."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own GateLoopCache


class GateLoopForCausalLM(GateLoopPreTrainedModel, GenerationMixin):
    """LanguageModel (as self.model) behind transformers' causal-LM interface."""

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: GateLoopConfig):
        super().__init__(config)
        self.model = build_model(config.to_model_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, refusing a checkpoint whose weights do not all match the config
        (it would otherwise fill the gaps with fresh random weights and only warn)."""
        asked = kwargs.pop("output_loading_info", False)
        where = args[0] if args else "checkpoint"
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as e:  # transformers' own refusal of weights of the wrong shape, after its report
            if "mismatched" not in str(e):
                raise
            raise UserError(f"{where}: the weights do not match config.json: their shapes differ (the load "
                            f"report above lists them)") from None
        bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                  "mismatched_keys") and v}
        if bad:
            raise UserError(f"{where}: the weights do not match config.json: "
                            + "; ".join(f"{k} {v}" for k, v in bad.items()))
        return (model, info) if asked else model

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None, labels: Tensor | None = None,
                inputs_embeds: Tensor | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, vocab]; labels (e.g. input_ids, -100 to skip) give the loss
        of predicting labels[:, t + 1] from the tokens up to t, the project's training loss."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("GateLoopForCausalLM takes input_ids (inputs_embeds are not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is not None and not isinstance(cache, GateLoopCache):
            if cache.get_seq_length() > 0:
                raise TypeError(f"past_key_values must be a GateLoopCache, got a filled {type(cache).__name__}")
            cache = None  # an empty cache of another kind (a caller's default): replace it
        if cache is None and use_cache:
            cache = GateLoopCache()
        state = cache.state if cache is not None else None
        T = input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] < T:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns for {T} input tokens")
        mask = None if attention_mask is None else attention_mask[:, -T:]  # the columns of these tokens
        if mask is not None and not bool(mask.all()):
            logits, state = self._forward_left_padded(input_ids, mask.bool(), state)
        else:
            logits, state = self.model(input_ids, state)
        if cache is not None:
            cache.advance(state, T)
        loss = None
        if labels is not None:
            # As train.py computes it: at least float32 (bfloat16 logits are upcast).
            scores = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(scores.flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def _forward_left_padded(self, input_ids: Tensor, mask: Tensor, state):
        """Rows padded on the left (mask 0 then 1): each prompt runs alone (rows of one length together)
        and the states are stacked, so every row gets what it gets alone. Padded positions get logits 0."""
        mixer = self.config.mixer
        if mixer not in PADDABLE_MIXERS:
            raise ValueError(f"mixer {mixer!r} does not support padding (an attention_mask with zeros): its state "
                             f"depends on the position, so prompts of unequal length cannot share a batch; "
                             f"generate each prompt alone. Mixers that do: {', '.join(sorted(PADDABLE_MIXERS))}")
        if state is not None:
            raise ValueError("padding (zeros in attention_mask) is only supported in the first call, before the "
                             "cache holds a state")
        if (mask[:, 1:].int() < mask[:, :-1].int()).any():
            raise ValueError("attention_mask must pad on the left (zeros before each row's tokens); "
                             "use tokenizer.padding_side = 'left'")
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise ValueError("attention_mask has a row of zeros only: every row needs at least one token")
        B, T = input_ids.shape
        logits = None
        rows, states = [], []
        for n in sorted(set(lengths.tolist())):
            idx = (lengths == n).nonzero().flatten()
            part, s = self.model(input_ids[idx, T - n:])
            if logits is None:
                logits = part.new_zeros(B, T, part.shape[-1])
            logits[idx, T - n:] = part
            rows.append(idx)
            states.append(s)
        state = cat_states(states, mixer)
        order = torch.argsort(torch.cat(rows))  # back to the rows' original order
        return logits, map_state(state, lambda t: t.index_select(0, order.to(t.device)))
