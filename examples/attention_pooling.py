"""Attention pooling over a BiLSTM, written with torch.nn only and moved onto birnn_fast with one
call, ``birnn_fast.convert(model)``: the model's code is not changed (it still packs its batch; the
converted layer takes the PackedSequence). The pooling scores every position and softmaxes over the
real words only: padded positions are masked out of the softmax (left in, they would take weight
from the real words, more the more a sentence is padded). Same sentences as sentiment.py.

    python examples/attention_pooling.py [--epochs 6] [--device cpu|cuda]
"""
import argparse
import copy

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import birnn_fast
from sentiment import CLASSES, VOCABULARY, compare, make_data


class AttentionClassifier(nn.Module):
    """Embedding -> BiLSTM -> a score per position -> softmax over the real positions -> the
    weighted sum of the BiLSTM's outputs -> linear. Plain torch.nn."""

    def __init__(self, embedding_size=50, hidden_size=32):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, embedding_size, padding_idx=0)
        self.rnn = nn.LSTM(embedding_size, hidden_size, batch_first=True, bidirectional=True)
        self.score = nn.Linear(2 * hidden_size, 1)
        self.classify = nn.Linear(2 * hidden_size, CLASSES)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embedding(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=tokens.shape[1])
        scores = self.score(output).squeeze(-1)  # (B, T)
        padding = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lengths[:, None]
        weights = scores.masked_fill(padding, float("-inf")).softmax(dim=-1)  # 0 at padded positions
        pooled = torch.bmm(weights.unsqueeze(1), output).squeeze(1)  # (B, 2H)
        return self.classify(pooled)


def run(epochs=6, sentences=2000, device=None, log=print):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = [t.to(device) for t in make_data(sentences, seed=0)]
    test = [t.to(device) for t in make_data(sentences // 4, seed=1)]
    torch.manual_seed(0)
    torch_model = AttentionClassifier().to(device)
    fast_model, names = birnn_fast.convert(copy.deepcopy(torch_model), return_names=True)
    log(f"attention pooling over a BiLSTM (torch.nn code), {sentences} padded sentences, on {device}; "
        f"birnn_fast.convert swapped: {', '.join(f'{name} -> {type(fast_model.get_submodule(name)).__name__}' for name in names)}")
    return compare(fast_model, torch_model, train, test, epochs, log=log)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    run(args.epochs, args.sentences, args.device)


if __name__ == "__main__":
    main()
