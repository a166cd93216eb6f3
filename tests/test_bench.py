"""`gateloop bench`: the table runs end to end on a tiny case, and the FLOP count is the documented one."""

from __future__ import annotations

from gateloop.bench import SHAPES, chunk_flops, markdown_table, run_table
from gateloop.cli import main


def test_chunk_flop_count_is_the_documented_formula():
    shape = SHAPES["multi-head, decay per head"]  # C = 64, K = V = 64, complex: P = 2
    per_token_head = 65 * 128 + 4 * 2 * 64 * 64
    assert chunk_flops(4, 2048, shape) == 4 * 2048 * 8 * per_token_head
    assert chunk_flops(4, 2048, shape, backward=True) == 3 * chunk_flops(4, 2048, shape)


def test_table_runs_and_skips_what_does_not_fit():
    rows = run_table(T_values=[8, 16], shapes=[SHAPES["max-headed"]], modes=("scan", "chunk"), repeat=1,
                     gemm=1.0, max_bytes=1e12, progress=None)
    assert len(rows) == 2 * 2 * 2 and all(r["ms"] > 0 for r in rows)
    assert "| max-headed | fwd | 8 |" in markdown_table(rows)
    skipped = run_table(T_values=[8], shapes=[SHAPES["max-headed"]], modes=("attention",), gemm=1.0,
                        max_bytes=1.0, progress=None)
    assert all(r["ms"] is None and r["note"] == "skipped: memory" for r in skipped)


def test_cli_rejects_a_bad_length(capsys):
    assert main(["bench", "--T", "0"]) == 2
    assert "--T" in capsys.readouterr().err
