"""The mixer contract, and the registry that names the mixers.

A mixer is the sequence-mixing half of a block (the MLP is the other): an nn.Module built as

    Mixer(d_model, *, layer_idx=0, n_layers=1, **options)

(layer_idx / n_layers let it scale its initialisation with depth, as HGRN's bounds and GPT-2's
output scaling do) whose forward is

    y, state = mixer(x, state=None)        x, y: [B, T, d_model]; T >= 1

`state` is None before the first call; what the mixer returns as state is its own business (a
tensor, a tuple or dict of tensors, a KV cache), with one rule: feeding x in two pieces, the second
from the first's state, gives the outputs and final state of feeding it whole. So a one-token call
(T = 1) is the recurrent step that generation uses, and a recurrent mixer's state has a size that
does not grow with T. The output at t depends on x[:, :t + 1] only (causality); every parameter gets
a gradient, also through a state carried between calls. gateloop.testing.check_mixer checks all of
this for any mixer, yours included.

Mixers are found by name in MIXERS; `@register_mixer("name")` adds a class, and a config's
`model.mixer = "package.module:Class"` names a class outside the package (resolve_mixer).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from torch import Tensor, nn

MIXERS: dict[str, type[nn.Module]] = {}


class Mixer(nn.Module):
    """Base of the package's mixers: the contract above, in one place. A mixer of your own need not
    derive from it; it only has to keep the contract."""

    # Small configurations (at d_model = 16, sequences of a few dozen tokens) that the tests build,
    # each exercising another path; the first is the one used where a test needs just one. Chunk
    # and block sizes of 8 or 5 put chunk boundaries inside the tests' sequences of 37 tokens.
    test_options: ClassVar[list[dict[str, Any]]] = [{}]

    def forward(self, x, state=None):  # pragma: no cover  (the contract; every mixer overrides it)
        raise NotImplementedError


def map_state(state, fn):
    """fn applied to every tensor of a state, whatever its nesting (a tensor; tuples, lists and dicts of
    them, dicts walked in key order); other leaves (counters, None) are kept as they are."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(state[k], fn) for k in sorted(state)}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(s, fn) for s in state)
    return state


def state_tensors(state) -> list[Tensor]:
    """The tensors of a state, in map_state's order."""
    found: list[Tensor] = []
    map_state(state, found.append)
    return found


def register_mixer(name: str):
    """Class decorator: MIXERS[name] = the class. A name already taken by another class is an error."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if MIXERS.get(name, cls) is not cls:
            raise ValueError(f"mixer name {name!r} is taken by {MIXERS[name].__module__}.{MIXERS[name].__name__}")
        MIXERS[name] = cls
        return cls

    return register


def resolve_mixer(name: str) -> type[nn.Module]:
    """The mixer class a config names: a key of MIXERS, or "package.module:Class" (imported; the
    module must be importable, e.g. installed or on PYTHONPATH). ValueError says what is wrong."""
    if name in MIXERS:
        return MIXERS[name]
    if ":" not in name:
        raise ValueError(f"model.mixer: unknown mixer {name!r}; choose one of {', '.join(sorted(MIXERS))}, "
                         "or name your own as 'package.module:Class'")
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.mixer: cannot import {module_name!r} for mixer {name!r}: {e}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model.mixer: {name!r} is not an nn.Module class")
    return cls
