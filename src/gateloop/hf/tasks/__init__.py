"""lm-evaluation-harness task files (YAML, JSONL) for gateloop models; built by data.py."""
