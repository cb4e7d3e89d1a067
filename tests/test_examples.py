"""The examples run and learn."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import ner_tagger  # noqa: E402
from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN  # noqa: E402


@pytest.mark.parametrize("rnn_class", [FastBiRNN, FastBiLSTM, FastBiGRU])
def test_ner_tagger_learns(rnn_class):
    _, _, loss = ner_tagger.train(rnn_class, epochs=20, log=lambda line: None)
    assert loss < 0.01
