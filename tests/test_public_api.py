"""The public API is pinned: a change to it is a deliberate edit of this file."""

import gateloop
import gateloop.ops


def test_top_level_api():
    assert sorted(gateloop.__all__) == sorted(["MIXERS", "LanguageModel", "ModelConfig", "UserError", "__version__"])
    for name in gateloop.__all__:
        assert hasattr(gateloop, name)


def test_gateloop_ops_api():
    assert {"gateloop_recurrent", "gateloop_scan", "gateloop_attention", "gateloop_chunk",
            "GATELOOP_MODES", "linear_recurrence_scan", "linear_recurrence_loop"} <= set(gateloop.ops.__all__)
    assert list(gateloop.ops.GATELOOP_MODES) == ["recurrent", "scan", "attention", "chunk"]


def test_registry_holds_the_seed_models():
    assert {"gateloop", "transformer", "hgrn", "hgrn2", "mingru", "minlstm", "lstm", "fox"} <= set(gateloop.MIXERS)
