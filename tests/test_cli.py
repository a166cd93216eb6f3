"""The command line as a user drives it: train, eval, generate, and one clear line + exit 2 on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gateloop.cli import main
from gateloop.layers import MIXERS

TINY = ["--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "train.steps=4",
        "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set", "train.eval_tokens=256",
        "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "train.warmup_steps=1",
        "--no-progress"]


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gl"
    assert main(["train", "--out", str(out), "--set", f"data.path={corpus}", *TINY]) == 0
    return out


def test_train_writes_the_run_directory(run, capsys):
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "loss.png"):
        assert (run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["final"] and final["step"] == 4
    assert final["val_bits_per_byte"] > 0 and final["unigram_bits_per_byte"] > 0
    assert json.loads((run / "config.json").read_text())["step"] == 4


def test_eval_prints_one_json_line(run, capsys):
    assert main(["eval", "--run", str(run), "--split", "test"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    metrics = json.loads(line[0])
    assert metrics["split"] == "test" and metrics["loss"] > 0 and metrics["bits_per_byte"] > 0


def test_eval_at_several_contexts_with_the_loss_per_position(run, capsys):
    assert main(["eval", "--run", str(run), "--split", "test"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["eval", "--run", str(run), "--split", "test", "--context", "16", "64", "--per-position"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [m["context"] for m in lines] == [16, 64]
    assert lines[0]["loss"] == pytest.approx(default["loss"], rel=1e-6)  # 16 is the training length
    curves = json.loads((run / "per_position_test.json").read_text())
    assert {k: len(v) for k, v in curves.items()} == {"16": 16, "64": 64}
    for m in lines:  # every window is full, so the loss is the mean of the per-position means
        assert sum(curves[str(m["context"])]) / m["context"] == pytest.approx(m["loss"], rel=1e-6)
    assert (run / "per_position_test.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--run", str(run), "--context", "0"]) == 2
    assert "--context must be positive" in capsys.readouterr().err


def test_generate_continues_the_prompt(run, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "the cat", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text.encode()) >= len("the cat") + 10


def test_generate_streams_and_stops_before_the_stop_text(run, capsys, monkeypatch):
    args = ["generate", "--run", str(run), "--prompt", "the", "--max-new-tokens", "40", "--top-p", "0.95"]
    assert main(args) == 0
    full = capsys.readouterr().out
    writes = []
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append(s) or len(s))
    assert main(args) == 0
    monkeypatch.undo()
    assert "".join(writes) == full and len([w for w in writes if w]) > 2  # pieces as they were made
    continuation = full[len("the"):-1]
    stop = next(c for c in continuation[3:] if c.isprintable() and c != "\ufffd")  # a character it will write
    assert main([*args, "--stop", stop, "--stop", "never written"]) == 0
    assert capsys.readouterr().out == "the" + continuation[:continuation.index(stop)] + "\n"
    assert main([*args, "--top-p", "1.5"]) == 2 and "--top-p" in capsys.readouterr().err


def test_transformer_baseline_and_bpe_train(corpus, tmp_path):
    out = tmp_path / "tf"
    assert main(["train", "--out", str(out), "--set", f"data.path={corpus}", "--set", "model.mixer=transformer",
                 "--set", "model.mixer_options.head_dim=8", "--set", "data.tokenizer=bpe",
                 "--set", "data.bpe_vocab_size=300", *TINY]) == 0
    assert (out / "tokenizer.json").exists()
    assert main(["generate", "--run", str(out), "--prompt", "rain", "--max-new-tokens", "5"]) == 0


def test_resume_continues_to_more_steps(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--set", f"data.path={corpus}", *TINY]) == 0
    assert main(["train", "--resume", str(out), "--set", "train.steps=6", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 6
    assert main(["train", "--resume", str(out), "--set", "model.d_model=8"]) == 2
    assert "only train.*" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "drop --out" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()


def bad(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--set", "data.corpus=nope"], "unknown corpus 'nope'"),
    (["train", "--set", "model.mixer=nope"], "unknown mixer"),
    (["train", "--set", "model.bogus=1"], "model.bogus"),
    (["train", "--set", "train.steps=many"], "train.steps expects an integer"),
    (["train", "--set", "data.path=/no/such/place"], "/no/such/place"),
    (["train", "--set", "model.mixer_options.head_dim=7"], "head_dim"),
    (["eval", "--run", "/no/such/run"], "does not exist"),
    (["generate", "--run", "/no/such/run"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    code, err = bad(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] == "train" else []))
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_empty_data_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = bad(capsys, "train", "--out", str(tmp_path / "o"), "--set", f"data.path={empty}")
    assert code == 2 and "empty" in err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_existing_run_is_never_overwritten(run, corpus, capsys):
    before = snapshot(run)
    code, err = bad(capsys, "train", "--out", str(run), "--set", f"data.path={corpus}", *TINY)
    assert code == 2 and "--resume" in err and snapshot(run) == before


@pytest.mark.parametrize("victim,content,needle", [
    ("model.safetensors", b"not a safetensors file", "corrupt"),
    ("config.json", b"{", "corrupt"),
    ("config.json", b"[]", "not a gateloop run config"),
])
def test_corrupt_run_directories(run, tmp_path, capsys, victim, content, needle):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in snapshot(run).items():
        (copy / name).write_bytes(content if name == victim else data)
    for cmd in (["eval", "--run", str(copy)], ["generate", "--run", str(copy)]):
        code, err = bad(capsys, *cmd)
        assert code == 2 and needle in err, err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gateloop", "eval", "--run", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_every_mixer_trains_end_to_end(mixer, corpus, tmp_path, capsys):
    """`gateloop train --set model.mixer=NAME`, tiny, for every registered mixer; then generate."""
    options = MIXERS[mixer].test_options[0]
    extra = [a for k, v in options.items() for a in ("--set", f"model.mixer_options.{k}={json.dumps(v)}")]
    out = tmp_path / mixer
    assert main(["train", "--out", str(out), "--set", f"model.mixer={mixer}", "--set", f"data.path={corpus}",
                 *TINY, *extra]) == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # An untrained byte model scores ln 256 = 5.545 nats (its logits start near zero): 4 steps must learn.
    assert final["val_loss"] < math.log(256) - 0.05, final["val_loss"]
    assert main(["generate", "--run", str(out), "--prompt", "the", "--max-new-tokens", "4"]) == 0


OWN_MIXER = '''
import torch
from torch import nn


class PreviousToken(nn.Module):
    """y_t = W [x_t; x_(t-1)]: the smallest mixer that mixes; its state is the last input."""

    def __init__(self, d_model, *, layer_idx=0, n_layers=1):
        super().__init__()
        self.W = nn.Linear(2 * d_model, d_model)

    def forward(self, x, state=None):
        last = state if state is not None else x.new_zeros(x.shape[0], 1, x.shape[2])
        previous = torch.cat([last, x[:, :-1]], dim=1)
        return self.W(torch.cat([x, previous], dim=-1)), x[:, -1:]
'''


def test_a_mixer_of_ones_own_trains_evaluates_and_generates(corpus, tmp_path, monkeypatch, capsys):
    """model.mixer="module:Class" names a mixer outside the package (here a file on sys.path)."""
    (tmp_path / "own_mixers.py").write_text(OWN_MIXER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", "model.mixer=own_mixers:PreviousToken",
                 "--set", f"data.path={corpus}", *TINY]) == 0
    assert main(["eval", "--run", str(out), "--split", "test"]) == 0
    assert main(["generate", "--run", str(out), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    assert "own_mixers:PreviousToken" in (out / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "bad"), "--set", "model.mixer=own_mixers:Nothing",
                 "--set", f"data.path={corpus}", *TINY]) == 2
    assert "is not an nn.Module class" in capsys.readouterr().err
