"""lm-evaluation-harness's command line with gateloop registered and gateloop's local tasks found.

    python -m gateloop.hf.lm_eval --model hf --model_args pretrained=HF_DIR --tasks gateloop_lastword --limit 20

Everything after the module name is lm_eval's own arguments; this adds `--include_path` pointing at
gateloop/hf/tasks/ (gateloop_lastword, gateloop_passages) unless one is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "tasks"
COMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: list[str]) -> list[str]:
    """argv for lm_eval's CLI: the given one, plus our tasks folder where a command can take it."""
    if not argv or argv[0] in ("-h", "--help") or any(a.startswith("--include_path") for a in argv):
        return list(argv)
    if argv[0] not in COMMANDS:
        argv = ["run", *argv]  # lm_eval's legacy form: no command means run
    return [*argv, "--include_path", str(TASKS)]


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"gateloop.hf.lm_eval needs lm-eval: pip install 'gateloop[hf]' ({e})") from None
    import gateloop.hf  # noqa: F401  (registers the gateloop model and tokenizer with the auto classes)

    sys.argv = ["lm-eval", *lm_eval_argv(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
