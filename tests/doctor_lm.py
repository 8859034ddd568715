"""Word-language-model runs in the style of pytorch/examples' word_language_model (tests/failure_suite.py collects
them): an embedding, a 2-layer fastlstm.LSTM and a linear decoder trained with SGD on a word stream cut into
35-step chunks (the hidden state carried over and detached), cross-entropy at every position, optional gradient
clipping. The text is generated here from a small stochastic grammar, so nothing is downloaded.

The example's recipe (SGD lr=20, clip 0.25) is healthy and must raise nothing, although its gradient is clipped at
almost every step; lr=100 without clipping diverges and must be named as diverging, with the learning rate as the
cause.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from failure_suite import _s, lstm_backend, make_monitor, single_threaded
from torch import nn

import fastlstm

NOUNS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "river",
    "tree",
    "house",
    "road",
    "city",
    "child",
    "teacher",
    "farmer",
    "king",
    "queen",
    "ship",
    "storm",
    "garden",
    "lamp",
]
VERBS = ["sees", "finds", "takes", "likes", "follows", "crosses", "builds", "watches", "opens", "carries"]
ADJECTIVES = ["old", "red", "small", "quiet", "bright", "cold", "green", "tall", "dark", "happy"]
PREPOSITIONS = ["near", "under", "over", "behind", "beside"]


def generated_text(seed: int, words: int = 6000) -> list:
    """Sentences of a small grammar: the [adjective] noun verb the noun [preposition the noun] ."""
    rng = np.random.default_rng(seed)
    text = []
    while len(text) < words:
        sentence = ["the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else [])
        sentence += [rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(NOUNS)]
        if rng.random() < 0.4:
            sentence += [rng.choice(PREPOSITIONS), "the", rng.choice(NOUNS)]
        text += [str(w) for w in sentence] + ["."]
    return text


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[T, B]: the stream cut into `batch` columns, as the example does."""
    steps = ids.numel() // batch
    return ids[: steps * batch].view(batch, steps).t().contiguous()


class WordLM(nn.Module):
    def __init__(self, vocab: int, embedding: int = 64, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.encoder = nn.Embedding(vocab, embedding)
        self.rnn = fastlstm.LSTM(embedding, hidden, layers, backend=lstm_backend())
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)  # the example's initialisation
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


def word_lm(lr: float, clip: float | None, steps: int = 120, bptt: int = 35, batch: int = 20):
    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        words = generated_text(seed)
        vocab = {w: i for i, w in enumerate(sorted(set(words)))}
        train = batchify(torch.tensor([vocab[w] for w in words]), batch)
        val = batchify(torch.tensor([vocab[w] for w in generated_text(seed + 1000, 1500)]), 10)
        model = WordLM(len(vocab))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        monitor = make_monitor(model, optimizer=opt, every=10)
        while monitor.step_count < steps:
            hidden = None
            for i in range(0, train.size(0) - 1, bptt):
                if monitor.step_count >= steps:
                    break
                n = min(bptt, train.size(0) - 1 - i)
                if hidden is not None:
                    hidden = tuple(h.detach() for h in hidden)  # the example's repackage_hidden
                out, hidden = model(train[i : i + n], hidden)
                loss = F.cross_entropy(out.reshape(-1, len(vocab)), train[i + 1 : i + 1 + n].reshape(-1))
                opt.zero_grad()
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                monitor.step(loss=loss.detach())
                if monitor.step_count % 40 == 0:
                    monitor.evaluate(_evaluate(model, val, bptt, len(vocab), monitor))
        return monitor.history.to_dict()

    return runner


@torch.no_grad()
def _evaluate(model, data, bptt: int, vocab: int, monitor) -> float:
    model.eval()
    model.rnn.telemetry.enabled = False
    total, count, hidden = 0.0, 0, None
    try:
        with monitor.paused():
            for i in range(0, data.size(0) - 1, bptt):
                n = min(bptt, data.size(0) - 1 - i)
                out, hidden = model(data[i : i + n], hidden)
                total += float(F.cross_entropy(out.reshape(-1, vocab), data[i + 1 : i + 1 + n].reshape(-1))) * n
                count += n
    finally:
        model.rnn.telemetry.enabled = True
        model.train()
    return total / count


SCENARIOS = [
    _s(
        "healthy_word_lm",
        None,
        runner=word_lm(20.0, 0.25),
        group="lm",
        what="the example's recipe: SGD lr=20, clip 0.25 (clipped at almost every step), bptt 35",
    ),
    _s(
        "diverging_word_lm",
        None,
        runner=word_lm(100.0, None, steps=80),
        group="lm",
        expected={"loss_diverging"},
        allowed={"gate_saturation", "exploding_gradients", "val_oscillation", "train_val_divergence", "non_finite"},
        what="the same with lr=100 and no clipping",
    ),
]
