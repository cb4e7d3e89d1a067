"""The main demo: train a 2-layer BiLSTM sequence tagger on a synthetic task with FastBiLSTM and
padded, variable-length batches (lengths=), then time a training step next to torch's nn.LSTM
(on a PackedSequence, as it needs for the same batches), same weights, same data.

    python examples/train_tagger.py [--steps 150] [--device cpu|cuda]

The task: an even token is tagged with the class of the token before it, an odd token with the
class of the token after it, so both directions are needed; accuracy climbs towards 100%.
"""
import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import birnn_fast
from birnn_fast import FastBiLSTM

VOCABULARY, TAGS = 50, 5


def batch(batch_size, max_steps, device, generator):
    lengths = torch.randint(max_steps // 4, max_steps + 1, (batch_size,), generator=generator)
    tokens = torch.randint(1, VOCABULARY, (batch_size, max_steps), generator=generator)
    valid = torch.arange(max_steps)[None, :] < lengths[:, None]
    tokens = tokens * valid
    before = nn.functional.pad(tokens, (1, 0))[:, :-1]
    after = nn.functional.pad(tokens, (0, 1))[:, 1:]
    tags = torch.where(tokens % 2 == 0, before, after) % TAGS
    return tokens.to(device), tags.to(device), lengths, valid.to(device)


class Tagger(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, rnn.input_size)
        self.rnn = rnn
        self.classify = nn.Linear(2 * rnn.hidden_size, TAGS)

    def forward(self, tokens, lengths):
        embedded = self.embedding(tokens)
        if isinstance(self.rnn, birnn_fast.FastBiLSTM):
            output, _ = self.rnn(embedded, lengths=lengths)
        else:
            packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
            output, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=tokens.shape[1])
        return self.classify(output)


def step(model, optimizer, tokens, tags, lengths, valid):
    logits = model(tokens, lengths)
    loss = nn.functional.cross_entropy(logits[valid], tags[valid])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, logits


def seconds_per_step(model, data, repeats, device):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, optimizer, *data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(argv=None):
    """Run as the command line says (or `argv`); return the seconds per training step of each side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=64)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    model = Tagger(FastBiLSTM(64, 128, num_layers=2, batch_first=True, dropout=0.1)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"training a 2-layer FastBiLSTM tagger on {device} ({torch.get_num_threads()} threads)")
    for number in range(1, args.steps + 1):
        tokens, tags, lengths, valid = batch(args.batch, args.max_steps, device, generator)
        loss, logits = step(model, optimizer, tokens, tags, lengths, valid)
        if number % 25 == 0 or number == 1:
            accuracy = (logits.argmax(-1) == tags)[valid].float().mean().item()
            print(f"step {number:4d}  loss {loss.item():.4f}  accuracy {accuracy:6.1%}")

    torch_model = Tagger(nn.LSTM(64, 128, num_layers=2, batch_first=True, dropout=0.1, bidirectional=True)).to(device)
    torch_model.load_state_dict(model.state_dict())
    data = batch(args.batch, args.max_steps, device, generator)
    fast = seconds_per_step(model, data, 10, device)
    slow = seconds_per_step(torch_model, data, 10, device)
    tokens = int(data[2].sum())
    print(f"\ntraining step, B={args.batch}, T<={args.max_steps}, {tokens} real tokens (median of 10):")
    print(f"  nn.LSTM + PackedSequence  {slow * 1e3:8.2f} ms  {tokens / slow:10.0f} tokens/s")
    print(f"  FastBiLSTM(lengths=)      {fast * 1e3:8.2f} ms  {tokens / fast:10.0f} tokens/s   {slow / fast:.2f}x")
    return {"torch.nn": slow, "birnn_fast": fast}


if __name__ == "__main__":
    main()
