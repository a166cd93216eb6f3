"""Pure tensor functions: the maths of every model, each with a `*_recurrent` reference loop."""

from .gateloop import gateloop_attention, gateloop_chunk, gateloop_recurrent, gateloop_scan
from .scan import linear_recurrence_loop, linear_recurrence_scan

GATELOOP_MODES = {
    "recurrent": gateloop_recurrent,
    "scan": gateloop_scan,
    "attention": gateloop_attention,
    "chunk": gateloop_chunk,
}

__all__ = [
    "GATELOOP_MODES",
    "gateloop_attention",
    "gateloop_chunk",
    "gateloop_recurrent",
    "gateloop_scan",
    "linear_recurrence_loop",
    "linear_recurrence_scan",
]
