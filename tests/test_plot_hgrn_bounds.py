"""benchmarks/plot_hgrn_bounds.py, which draws the claims_hgrn plot: on a tiny trained HGRN with
learned bounds it reads one bound vector per layer (the first layer's fixed at 0) and writes the PNG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateloop.cli import main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "plot_hgrn_bounds.py"


def test_the_bounds_plot_reads_every_layer(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", f"data.path={corpus}", "--set", "model.mixer=hgrn",
                 "--set", 'model.mixer_options.lower_bound="learned"', "--set", "model.d_model=16",
                 "--set", "model.n_layers=3", "--set", "train.steps=2", "--set", "train.batch_size=2",
                 "--set", "train.seq_len=16", "--set", "train.eval_tokens=256", "--set", "train.warmup_steps=1",
                 "--no-progress"]) == 0
    out = tmp_path / "bounds.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out)], capture_output=True,
                          text=True, check=True)
    means = [float(x) for x in done.stdout.splitlines()[0].split("per layer ")[1].split(", ")]
    assert len(means) == 3 and means[0] == 0.0 and 0 < means[1] < means[2] < 1  # near 1/3, 2/3 after 2 steps
    assert out.stat().st_size > 0
