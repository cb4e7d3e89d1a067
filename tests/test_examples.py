"""The examples run and learn, at small sizes."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import attention_pooling  # noqa: E402
import ner_tagger  # noqa: E402
import sentiment  # noqa: E402
from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN  # noqa: E402


def quiet(line):
    pass


@pytest.mark.parametrize("rnn_class", [FastBiRNN, FastBiLSTM, FastBiGRU])
def test_ner_tagger_learns(rnn_class):
    _, _, loss = ner_tagger.train(rnn_class, epochs=20, log=quiet)
    assert loss < 0.01


# (cell, epochs, the test accuracy both models must pass): chance is 1/3; a plain RNN learns slower.
@pytest.mark.parametrize("cell, epochs, target", [("LSTM", 6, 0.9), ("GRU", 6, 0.9), ("RNN", 6, 0.45)])
def test_sentiment_learns_as_torch_does(cell, epochs, target):
    results = sentiment.run(cell, epochs=epochs, sentences=1000, device="cpu", log=quiet)
    (fast_accuracy, fast_seconds), (torch_accuracy, torch_seconds) = results["birnn_fast"], results["torch.nn"]
    assert fast_accuracy > target and torch_accuracy > target, results
    assert fast_seconds > 0 and torch_seconds > 0
    if cell != "RNN":  # same weights, same data: the two runs differ only by rounding
        assert abs(fast_accuracy - torch_accuracy) <= 0.05, results


def test_attention_pooling_learns_as_torch_does():
    results = attention_pooling.run(epochs=5, sentences=1000, device="cpu", log=quiet)
    (fast_accuracy, _), (torch_accuracy, _) = results["birnn_fast"], results["torch.nn"]
    assert fast_accuracy > 0.9 and abs(fast_accuracy - torch_accuracy) <= 0.05, results


def test_attention_pooling_masks_padding_out_of_the_softmax():
    import torch

    torch.manual_seed(0)
    model = attention_pooling.AttentionClassifier()
    tokens, lengths, _ = sentiment.make_data(4, seed=3)
    padded_more = torch.nn.functional.pad(tokens, (0, 9))  # the same sentences, 9 more padding steps
    torch.testing.assert_close(model(padded_more, lengths), model(tokens, lengths))


@pytest.mark.parametrize("command", [
    ["examples/sentiment.py", "--cell", "GRU", "--epochs", "1", "--sentences", "128"],
    ["examples/attention_pooling.py", "--epochs", "1", "--sentences", "128"],
    ["examples/train_tagger.py", "--steps", "2", "--batch", "4", "--max-steps", "8"],
], ids=["sentiment", "attention_pooling", "train_tagger"])
def test_example_scripts_run(command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "birnn_fast" in result.stdout or "FastBiLSTM" in result.stdout, result.stdout


def test_demo_tour_runs_and_draws_its_chart(tmp_path):
    """`make demo`'s script end to end at tiny sizes (--quick): every stage, then the PNG."""
    pytest.importorskip("matplotlib", reason="the demo's chart needs matplotlib (in the Makefile's DEPENDENCIES)")
    out = tmp_path / "speedups.png"
    result = subprocess.run([sys.executable, "examples/demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[6/6]" in result.stdout and "tour done" in result.stdout, result.stdout[-4000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
