"""Realistic models for the scale benchmark: builders of (model, loss_fn, probe batches).

Every model is wrapped so that it takes one input tensor and returns log-probabilities or
logits, and every batch is an ``(inputs, targets)`` pair: the same module, loss and data then go
to ``hessian_spectrum``, hessian-eigenthings (``loss(model, batch)``) and PyHessian
(``criterion(model(inputs), targets)``). Data are synthetic and seeded; nothing is downloaded.

* ``resnet``: ResNet-style CNN with BatchNorm (stem, two basic blocks at 32 channels, a
  strided block to 64, one more at 64, global pooling), CIFAR-shaped inputs 3x32x32, 10 classes,
  about 170k parameters. Inputs: a smooth random template per class plus noise.
* ``transformer``: Lightning's demo ``lightning.pytorch.demos.transformer.Transformer``
  (``nn.Transformer`` 2+2 layers, d=200, 2 heads), vocabulary 64, about 1.3M parameters.
* ``lstm``: Lightning's demo ``lightning.pytorch.demos.lstm.SimpleLSTM``, vocabulary 64
  (``--lstm-width``/``nlayers`` set its size; default 256 wide, 2 layers, about 1.1M parameters).
* ``mlp20m``, ``mlp100m``, ``mlp1b``: 3072-h-h-h-10 ReLU MLPs on flattened CIFAR-shaped inputs
  with ``h`` solved for about 20M / 100M / 1B parameters (``mlp`` with ``params=`` for other
  sizes; ``mlp1b`` is for a GPU and not in ``scale.py``'s default list).

Token data for the sequence models come from a seeded random Markov chain whose every token has
four likely successors, so the next-token loss has structure to learn. Models are returned in
eval mode (dropout off, BatchNorm on its running statistics): the measurement is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
VOCAB = 64


@dataclass
class Problem:
    """A model with its loss and probe batches."""

    name: str
    model: nn.Module
    batches: list[Batch]
    criterion: Callable[[Tensor, Tensor], Tensor]
    description: str
    notes: list[str] = field(default_factory=list)

    def loss_fn(self, model: nn.Module, batch: Batch) -> Tensor:
        """``loss_fn(model, batch)``: mean loss on one probe batch."""
        inputs, targets = batch
        return self.criterion(model(inputs), targets)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def num_samples(self) -> int:
        return sum(len(b[0]) for b in self.batches)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets)


def token_nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Next-token loss of the Lightning demos: ``nll_loss(output, target.view(-1))``."""
    return F.nll_loss(log_probs, targets.reshape(-1))


# --------------------------------------------------------------------------- data


def cifar_like(num: int, *, seed: int, classes: int = 10) -> Batch:
    """3x32x32 images: a smooth random template per class (upsampled 8x8 noise) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = F.interpolate(
        torch.randn(classes, 3, 8, 8, generator=torch.Generator().manual_seed(12345)),
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
    )
    y = torch.randint(0, classes, (num,), generator=gen)
    x = templates[y] + 0.8 * torch.randn(num, 3, 32, 32, generator=gen)
    return x, y


def markov_tokens(num: int, length: int, *, seed: int, vocab: int = VOCAB) -> Tensor:
    """``(num, length + 1)`` token sequences from a fixed random chain (4 likely successors)."""
    chain = torch.Generator().manual_seed(54321)
    succ = torch.randint(0, vocab, (vocab, 4), generator=chain)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.empty(num, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (num,), generator=gen)
    for t in range(length):
        pick = torch.randint(0, 4, (num,), generator=gen)
        noise = torch.randint(0, vocab, (num,), generator=gen)
        jump = torch.rand(num, generator=gen) < 0.1
        seq[:, t + 1] = torch.where(jump, noise, succ[seq[:, t], pick])
    return seq


def _batches(make: Callable[[int], Batch], num_batches: int) -> list[Batch]:
    return [make(1000 + i) for i in range(num_batches)]


# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Stem 3->w, blocks [w, w], [2w (stride 2), 2w], pooling, linear: ~170k parameters at w=32."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.layers = nn.Sequential(
            BasicBlock(width, width),
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 2 * width),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TransformerLM(nn.Module):
    """Lightning's demo Transformer behind a one-tensor interface: input ``(B, 2, T)`` holds
    (source tokens, target tokens); output the demo's log-probabilities ``(B T, vocab)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from lightning.pytorch.demos.transformer import Transformer

        self.net = Transformer(vocab_size=VOCAB, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, 0], x[:, 1])


class LSTMLM(nn.Module):
    """Lightning's demo SimpleLSTM from a zero hidden state; output ``(B T, vocab)`` log-probs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from lightning.pytorch.demos.lstm import SimpleLSTM

        self.net = SimpleLSTM(vocab_size=VOCAB, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.net.init_hidden(x.shape[0]))[0]


def mlp_width(params: float, depth: int = 3, d_in: int = 3072, classes: int = 10) -> int:
    """Hidden width ``h`` of a ``d_in-h-...-h-classes`` MLP (``depth`` hidden layers) with
    about ``params`` parameters: ``(depth-1) h^2 + (d_in + classes + depth) h + classes``."""
    a, b, c = depth - 1, d_in + classes + depth, classes - params
    return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))


def make_mlp(width: int, depth: int = 3, d_in: int = 3072, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- builders


def resnet(
    *, seed: int = 0, num_batches: int = 4, batch_size: int = 32, width: int = 32
) -> Problem:
    torch.manual_seed(seed)
    model = ResNetCNN(width)
    batches = _batches(lambda s: cifar_like(batch_size, seed=s), num_batches)
    _warm_batchnorm(model, batches)
    return Problem(
        "resnet",
        model.eval(),
        batches,
        cross_entropy,
        f"ResNet-style CNN + BatchNorm, width {width}, 3x32x32, 10 classes",
    )


def transformer(
    *, seed: int = 0, num_batches: int = 4, batch_size: int = 16, length: int = 32, **kw: Any
) -> Problem:
    torch.manual_seed(seed)
    model = TransformerLM(**kw)

    def make(s: int) -> Batch:
        seq = markov_tokens(batch_size, length, seed=s)
        src, tgt = seq[:, :-1], seq[:, 1:]
        return torch.stack([src, tgt], dim=1), tgt

    return Problem(
        "transformer",
        model.eval(),
        _batches(make, num_batches),
        token_nll,
        f"Lightning demo Transformer, vocab {VOCAB}, {batch_size}x{length} tokens per batch",
    )


def lstm(
    *,
    seed: int = 0,
    num_batches: int = 4,
    batch_size: int = 16,
    length: int = 32,
    width: int = 256,
    nlayers: int = 2,
) -> Problem:
    torch.manual_seed(seed)
    model = LSTMLM(ninp=width, nhid=width, nlayers=nlayers)

    def make(s: int) -> Batch:
        seq = markov_tokens(batch_size, length, seed=s)
        return seq[:, :-1], seq[:, 1:]

    return Problem(
        "lstm",
        model.eval(),
        _batches(make, num_batches),
        token_nll,
        f"Lightning demo SimpleLSTM {nlayers}x{width}, vocab {VOCAB}, "
        f"{batch_size}x{length} tokens per batch",
    )


def mlp(
    *, params: float = 20e6, seed: int = 0, num_batches: int = 4, batch_size: int = 128
) -> Problem:
    width = mlp_width(params)
    torch.manual_seed(seed)
    model = make_mlp(width)
    batches = _batches(lambda s: cifar_like(batch_size, seed=s), num_batches)
    return Problem(
        f"mlp{round(params / 1e6)}m",
        model.eval(),
        batches,
        cross_entropy,
        f"MLP 3072-{width}-{width}-{width}-10 (ReLU), CIFAR-shaped inputs",
    )


def _warm_batchnorm(model: nn.Module, batches: list[Batch]) -> None:
    """Running statistics from the probe data (a few train-mode forwards, no weight update),
    so eval-mode BatchNorm normalises like a trained network's."""
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)


BUILDERS: dict[str, Callable[..., Problem]] = {
    "resnet": resnet,
    "transformer": transformer,
    "lstm": lstm,
    "mlp20m": lambda params=20e6, **kw: mlp(params=params, **kw),
    "mlp100m": lambda params=100e6, **kw: mlp(params=params, **kw),
    # The GPU goal (not in scale.py's default list): 4 GB of float32 weights, h = 21,603.
    "mlp1b": lambda params=1e9, **kw: mlp(params=params, **kw),
}

#: ``--quick``: fewer, smaller probe batches, and MLPs scaled down to 2M / 10M parameters.
QUICK: dict[str, dict[str, Any]] = {
    "resnet": {"num_batches": 2, "batch_size": 16},
    "transformer": {"num_batches": 2, "batch_size": 4, "length": 16},
    "lstm": {"num_batches": 2, "batch_size": 4, "length": 16},
    "mlp20m": {"num_batches": 2, "batch_size": 32, "params": 2e6},
    "mlp100m": {"num_batches": 2, "batch_size": 32, "params": 10e6},
    "mlp1b": {"num_batches": 2, "batch_size": 32, "params": 20e6},
}


def build(name: str, *, quick: bool = False, seed: int = 0, **kw: Any) -> Problem:
    """The problem ``name`` (a key of :data:`BUILDERS`), seeded; ``quick`` uses small batches."""
    if name not in BUILDERS:
        raise ValueError(f"model must be one of {sorted(BUILDERS)}; got {name!r}")
    opts = {**(QUICK[name] if quick else {}), **kw}
    return BUILDERS[name](seed=seed, **opts)
