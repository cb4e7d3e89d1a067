"""`make demo`: a newcomer's tour of birnn_fast. The examples in turn, each next to the same model on
torch.nn (same weights, same data), then the tagger's training step timed next to nn.LSTM, then a
chart of the speedups measured on the way.

    python examples/demo.py [--out build/demo/speedups.png] [--quick]

On a GPU (if torch sees one) everything runs there; otherwise on the CPU.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import attention_pooling  # noqa: E402
import ner_tagger  # noqa: E402
import sentiment  # noqa: E402
import train_tagger  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "build", "demo", "speedups.png")


def indented(line):
    print(f"    {line}", flush=True)


def plot(speedups, device, out):
    """Horizontal bars of torch.nn time / birnn_fast time per example, parity marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names, values = list(speedups), list(speedups.values())
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    axes.barh(range(len(names)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.invert_yaxis()
    for row, value in enumerate(values):
        axes.text(value, row, f" {value:.2f}x", va="center", fontsize=8)
    axes.set_xlim(0, max(values + [1.0]) * 1.25)
    axes.set_xlabel("speedup: torch.nn time / birnn_fast time (training, same model, weights and data)")
    axes.set_title(f"make demo on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}", fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the chart goes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run: the figures mean nothing)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs, sentences, tagger_steps = (1, 128, ["--steps", "2", "--max-steps", "8"]) if args.quick else (4, 2000, [])
    started = time.perf_counter()
    speedups = {}
    steps = 6

    def stage(number, title):
        print(f"\n[{number}/{steps}] {title}  ({time.perf_counter() - started:.0f} s so far)", flush=True)

    stage(1, "The seeds' NER tagger (examples/ner_tagger.py): FastBiRNN, two sentences, 20 epochs")
    model, vocabulary, loss = ner_tagger.train(epochs=20, log=lambda line: None)
    names = {i: tag for tag, i in ner_tagger.TAGS.items()}
    with torch.no_grad():
        for words, _ in ner_tagger.SENTENCES:
            predicted = model(torch.tensor([[vocabulary[w] for w in words]]))[0].argmax(-1)
            indented(" ".join(f"{w}/{names[int(p)]}" for w, p in zip(words, predicted)) + f"   (loss {loss:.4f})")

    for number, cell in enumerate(("LSTM", "GRU", "RNN"), start=2):
        stage(number, f"Sentiment with a Bi{cell} and lengths= (examples/sentiment.py --cell {cell})")
        results = sentiment.run(cell, epochs=epochs, sentences=sentences, device=device, log=indented)
        speedups[f"sentiment Bi{cell}, per epoch"] = results["torch.nn"][1] / results["birnn_fast"][1]

    stage(5, "Attention pooling: a torch.nn model moved over by birnn_fast.convert (examples/attention_pooling.py)")
    results = attention_pooling.run(epochs=epochs, sentences=sentences, device=device, log=indented)
    speedups["attention pooling (convert), per epoch"] = results["torch.nn"][1] / results["birnn_fast"][1]

    stage(6, "A 2-layer BiLSTM tagger, then its training step next to nn.LSTM (examples/train_tagger.py)")
    timings = train_tagger.main(["--device", device, *tagger_steps])
    speedups["tagger 2-layer BiLSTM, per step"] = timings["torch.nn"] / timings["birnn_fast"]

    plot(speedups, device, args.out)
    print(f"\nspeedups (torch.nn time / birnn_fast time):")
    for name, value in speedups.items():
        print(f"  {name:40s} {value:6.2f}x")
    print(f"chart: {os.path.relpath(args.out)}")
    print(f"tour done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
