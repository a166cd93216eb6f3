"""gateloop models in Hugging Face transformers (`pip install 'gateloop[hf]'`).

Importing this package registers, with transformers' auto classes, the config (model_type
"gateloop"), the causal LM and the tokenizer, so that after `import gateloop.hf`

    model = AutoModelForCausalLM.from_pretrained(HF_DIR)    # a folder written by `gateloop export`
    tokenizer = AutoTokenizer.from_pretrained(HF_DIR)

load without trust_remote_code. Nothing in the core package imports this one (docs/hf.md).
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without the extra installed
    raise ImportError("gateloop.hf needs transformers: pip install 'gateloop[hf]'") from e

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .modeling import GateLoopCache, GateLoopConfig, GateLoopForCausalLM
from .tokenization import GateLoopTokenizer

AutoConfig.register(GateLoopConfig.model_type, GateLoopConfig, exist_ok=True)
AutoModelForCausalLM.register(GateLoopConfig, GateLoopForCausalLM, exist_ok=True)
AutoTokenizer.register(GateLoopConfig, tokenizer_class=GateLoopTokenizer, exist_ok=True)

__all__ = ["GateLoopCache", "GateLoopConfig", "GateLoopForCausalLM", "GateLoopTokenizer"]
