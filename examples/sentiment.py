"""Sentiment of padded, variable-length sentences with a bidirectional RNN: embedding 50, hidden 32
per direction, 3 classes (negative, neutral, positive) read from the last hidden states of both
directions. The batch stays padded and the layer gets `lengths=`; the same model on torch.nn needs
a PackedSequence for the same batches. Both train from the same weights on the same data, and the
script prints each one's accuracy and time per epoch.

    python examples/sentiment.py [--cell LSTM|GRU|RNN] [--epochs 6] [--device cpu|cuda]

The data is made here: a sentence is neutral filler words, plus one negative or one positive word
somewhere for those two classes.
"""
import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import birnn_fast

VOCABULARY, CLASSES = 100, 3
NEGATIVE, POSITIVE = range(1, 11), range(11, 21)  # word ids; 0 is padding, the rest neutral
FAST = {"LSTM": birnn_fast.FastBiLSTM, "GRU": birnn_fast.FastBiGRU, "RNN": birnn_fast.FastBiRNN}
TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def make_data(sentences, max_length=32, seed=0):
    """(tokens (N, max_length) padded with 0, lengths (N,), labels (N,)): label 0 sentences hold
    one negative word, label 2 one positive word, label 1 none."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, max_length + 1, (sentences,), generator=generator)
    labels = torch.randint(0, CLASSES, (sentences,), generator=generator)
    tokens = torch.randint(POSITIVE.stop, VOCABULARY, (sentences, max_length), generator=generator)
    position = (torch.rand(sentences, generator=generator) * lengths).long()
    word = torch.randint(0, len(NEGATIVE), (sentences,), generator=generator)
    marked = torch.where(labels == 0, NEGATIVE.start + word, POSITIVE.start + word)
    rows = torch.arange(sentences)
    tokens[rows, position] = torch.where(labels == 1, tokens[rows, position], marked)
    tokens[torch.arange(max_length)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths, labels


class SentimentClassifier(nn.Module):
    """Embedding -> bidirectional RNN -> [h_n forward; h_n backward] -> linear, for a FastBi* layer
    (padded batch with lengths=) or a torch.nn one (PackedSequence)."""

    def __init__(self, rnn_class, embedding_size=50, hidden_size=32):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, embedding_size, padding_idx=0)
        torch_layer = rnn_class in TORCH.values()
        self.rnn = rnn_class(embedding_size, hidden_size, batch_first=True, **({"bidirectional": True} if torch_layer else {}))
        self.classify = nn.Linear(2 * hidden_size, CLASSES)

    def forward(self, tokens, lengths):
        embedded = self.embedding(tokens)
        if isinstance(self.rnn, (birnn_fast.FastBiLSTM, birnn_fast.FastBiGRU, birnn_fast.FastBiRNN)):
            _, h_n = self.rnn(embedded, lengths=lengths)
        else:
            packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h_n = self.rnn(packed)
        if isinstance(h_n, tuple):  # an LSTM's (h_n, c_n)
            h_n = h_n[0]
        # The last layer's two directions: the forward one ends at each row's last real word, the reverse
        # one at its first.
        return self.classify(torch.cat([h_n[-2], h_n[-1]], dim=-1))


def accuracy(model, data, batch_size=256):
    tokens, lengths, labels = data
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            chunk = slice(start, start + batch_size)
            correct += (model(tokens[chunk], lengths[chunk]).argmax(-1) == labels[chunk]).sum().item()
    model.train()
    return correct / len(labels)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fit(model, train, test, epochs, batch_size=64, lr=0.01, seed=0, log=print, label=""):
    """Train with Adam, one pass over `train` per epoch in a fixed shuffled order; return
    (test accuracy after each epoch, seconds of each epoch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    tokens, lengths, labels = train
    device = tokens.device
    order = torch.Generator().manual_seed(seed)
    accuracies, seconds = [], []
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(len(labels), generator=order).to(device)
        synchronize(device)
        start = time.perf_counter()
        for first in range(0, len(labels), batch_size):
            rows = permutation[first:first + batch_size]
            loss = nn.functional.cross_entropy(model(tokens[rows], lengths[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a plain RNN's gradients can explode
            optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        accuracies.append(accuracy(model, test))
        log(f"  {label}epoch {epoch:2d}  loss {loss.item():.4f}  test accuracy {accuracies[-1]:6.1%}  "
            f"{seconds[-1] * 1e3:7.1f} ms")
    return accuracies, seconds


def per_epoch(seconds):
    """The typical epoch: the median, leaving out the first (warm-up) where there are others."""
    return statistics.median(seconds[1:] or seconds)


def compare(fast_model, torch_model, train, test, epochs, log=print):
    """Train both models from the same weights on the same data; log and return
    {"birnn_fast" | "torch.nn": (final test accuracy, seconds per epoch)}."""
    results = {}
    for name, model in (("birnn_fast", fast_model), ("torch.nn", torch_model)):
        log(f"{name}:")
        accuracies, seconds = fit(model, train, test, epochs, log=log)
        results[name] = (accuracies[-1], per_epoch(seconds))
    (fast_accuracy, fast_time), (torch_accuracy, torch_time) = results["birnn_fast"], results["torch.nn"]
    log(f"{'':12s} {'test accuracy':>13s} {'ms per epoch':>13s}")
    log(f"{'torch.nn':12s} {torch_accuracy:13.1%} {torch_time * 1e3:13.1f}")
    log(f"{'birnn_fast':12s} {fast_accuracy:13.1%} {fast_time * 1e3:13.1f}   {torch_time / fast_time:.2f}x")
    return results


def run(cell="LSTM", epochs=6, sentences=2000, device=None, log=print):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = [t.to(device) for t in make_data(sentences, seed=0)]
    test = [t.to(device) for t in make_data(sentences // 4, seed=1)]
    torch.manual_seed(0)
    fast_model = SentimentClassifier(FAST[cell]).to(device)
    torch_model = SentimentClassifier(TORCH[cell]).to(device)
    torch_model.load_state_dict(fast_model.state_dict())  # same names, same weights
    log(f"sentiment, Bi{cell} (embedding 50, hidden 32), {sentences} padded sentences of 4-32 words, "
        f"on {device}")
    return compare(fast_model, torch_model, train, test, epochs, log=log)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=list(FAST), default="LSTM")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    run(args.cell, args.epochs, args.sentences, args.device)


if __name__ == "__main__":
    main()
