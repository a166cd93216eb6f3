"""`gateloop export`: a run directory as a Hugging Face model folder.

    export_run("runs/latest", "hf/shakespeare")   # config.json, model.safetensors, tokenizer files

The folder is built complete in a hidden temp folder beside HF_DIR and renamed into place, so a
failed export leaves nothing behind, and an existing non-empty HF_DIR is never touched.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from ..checkpoint import create_run_dir, load_run
from ..data import TOKENIZER_FILE
from ..errors import UserError
from .modeling import GateLoopConfig, GateLoopForCausalLM
from .tokenization import GateLoopTokenizer


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write run_dir's model and tokenizer to out_dir (which must not exist, or be empty)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: export to a new folder")
    model, tokenizer, cfg = load_run(run_dir)
    bpe_file = run_dir / TOKENIZER_FILE if tokenizer.name == "bpe" else None
    hf_tokenizer = GateLoopTokenizer(bpe_file=bpe_file, kind=tokenizer.name)
    # The prefix id (byte 0xFF, see tokenization.py) pads and opens a text; no eos_token_id: the model
    # was never trained to end a text, so generate runs to max_new_tokens as `gateloop generate` does.
    prefix = hf_tokenizer.prefix_token_id
    config = GateLoopConfig.from_model_config(cfg.model, bos_token_id=prefix, pad_token_id=prefix)
    hf_model = GateLoopForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.eval()

    def write(tmp: Path) -> None:
        disable_progress_bar()  # one line of output from the CLI, not a progress bar per file
        hf_model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)

    create_run_dir(out_dir, write)
    return out_dir
