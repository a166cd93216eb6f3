"""gateloop: sequence models with data-controlled linear recurrence (GateLoop) and their peers.

    from gateloop.ops import gateloop_chunk          # the maths: pure tensor functions
    from gateloop.layers import MIXERS, GateLoop      # nn.Modules behind one mixer contract
    from gateloop.models import LanguageModel, ModelConfig
"""

from .errors import UserError
from .layers import MIXERS
from .models import LanguageModel, ModelConfig

__version__ = "0.1.0"

__all__ = ["MIXERS", "LanguageModel", "ModelConfig", "UserError", "__version__"]
