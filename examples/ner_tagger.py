"""The seeds' named-entity tagger: a bidirectional RNN over "John lives in Paris" and
"Mary lives in London" (embedding 16, hidden 32 per direction, 3 tags), trained 20 epochs with
Adam(lr=0.01), one sentence per step. Swap FastBiRNN for FastBiLSTM or FastBiGRU freely.

    python examples/ner_tagger.py
"""
import torch
from torch import nn

from birnn_fast import FastBiRNN

SENTENCES = [("John lives in Paris".split(), ["PER", "O", "O", "LOC"]),
             ("Mary lives in London".split(), ["PER", "O", "O", "LOC"])]
TAGS = {"O": 0, "PER": 1, "LOC": 2}


class Tagger(nn.Module):
    def __init__(self, vocabulary_size, rnn_class=FastBiRNN, embedding_size=16, hidden_size=32):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, embedding_size)
        self.rnn = rnn_class(embedding_size, hidden_size, batch_first=True)
        self.classify = nn.Linear(2 * hidden_size, len(TAGS))

    def forward(self, tokens):
        output, _ = self.rnn(self.embedding(tokens))
        return self.classify(output)


def train(rnn_class=FastBiRNN, epochs=20, seed=0, log=print):
    """Train the tagger; return (model, vocabulary, last loss)."""
    torch.manual_seed(seed)
    vocabulary = {word: i for i, word in enumerate(sorted({w for words, _ in SENTENCES for w in words}))}
    model = Tagger(len(vocabulary), rnn_class)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(epochs):
        for words, tags in SENTENCES:
            tokens = torch.tensor([[vocabulary[w] for w in words]])
            target = torch.tensor([TAGS[t] for t in tags])
            loss = nn.functional.cross_entropy(model(tokens)[0], target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log(f"epoch {epoch + 1:2d}  loss {loss.item():.5f}")
    return model, vocabulary, loss.item()


if __name__ == "__main__":
    model, vocabulary, _ = train()
    names = {i: tag for tag, i in TAGS.items()}
    with torch.no_grad():
        for words, _ in SENTENCES:
            predicted = model(torch.tensor([[vocabulary[w] for w in words]]))[0].argmax(-1)
            print(" ".join(f"{w}/{names[int(p)]}" for w, p in zip(words, predicted)))
