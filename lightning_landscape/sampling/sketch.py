r"""Fixed-size sketches of parameter (or gradient) vectors: exact below a size, sparse JL above.

A trajectory of n samples of a D-parameter model would need n·D numbers. Above
``exact_max_params`` parameters each sample is compressed to ``dim`` numbers by a seeded sparse
Johnson–Lindenstrauss transform in the block construction of Kane & Nelson (2014): the output is
split into ``nnz`` blocks of ``dim / nnz`` buckets, and coordinate i of the input adds
:math:`\sigma_r(i) x_i / \sqrt{\text{nnz}}` to bucket :math:`h_r(i)` of block r. The hashes are
polynomials modulo the prime :math:`p = 2^{31} - 1` with coefficients drawn from ``seed``:
:math:`h_r(i) = ((a i + b) \bmod p) \bmod (\text{dim}/\text{nnz})` (2-wise independent) and
:math:`\sigma_r(i) = \pm 1` from the parity of a cubic (4-wise independent, as the variance bound
below needs). ``nnz = 1`` is the count sketch (Charikar, Chen & Farach-Colton 2002). The
D × dim matrix is never formed: the hashes of each chunk of :data:`CHUNK` coordinates are
computed on the parameters' own device by integer arithmetic, so nothing is transferred, every
device gives the same map, and the cost is O(nnz · D) per sketch. Up to ``cache_max_entries``
(nnz · D) they are kept after the first call (5 bytes an entry: hashing costs several times the
sketch itself); above, recomputed at every call, in O(dim + CHUNK) memory whatever D. Up to
2^31 - 1 parameters.

**Distance distortion.** The map S is linear, so distances between sketches are sketches of
differences. For any fixed vector x, :math:`E\|Sx\|^2 = \|x\|^2` and
:math:`\operatorname{Var}\|Sx\|^2 = \tfrac{2}{\text{dim}}(\|x\|^4 - \sum_i x_i^4) \le
\tfrac{2}{\text{dim}}\|x\|^4`, so the relative error of a squared distance has standard deviation
at most :math:`\sqrt{2/\text{dim}}` (2.2% for the default dim = 4096; about half of that for the
distance itself). Over all pairs of n samples the worst pair stays within ε with high probability
when dim ≳ 4 ln n / (ε²/2 − ε³/3) (JL); with dim = 4096 that is ε ≈ 0.12 for n = 1000. Tests check
that the empirical relative errors over many pairs have the documented standard deviation and lie
within 5 of it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .._checks import check_int

__all__ = ["ParameterSketch", "sketch_distortion_bound"]

#: Entries per hash chunk: the memory of the hashes at any moment.
CHUNK = 1 << 20

#: Hashes (nnz · D entries, 5 bytes each) kept between calls up to this many: 40 MiB.
CACHE_MAX_ENTRIES = 1 << 23

#: Mersenne prime 2^31 - 1 of the polynomial hashes (coordinates are reduced modulo it).
_PRIME = (1 << 31) - 1


def sketch_distortion_bound(dim: int) -> float:
    """Upper bound :math:`\\sqrt{2/\\text{dim}}` on the standard deviation of the relative error
    of a squared distance after sketching to ``dim`` numbers."""
    return math.sqrt(2.0 / dim)


class ParameterSketch:
    """Linear map from a list of tensors (flattened, concatenated) to a fixed-size vector.

    Exact (the concatenation itself, in float64) when the total size is at most
    ``exact_max_params``; a seeded sparse JL sketch of size ``dim`` otherwise.

    Args:
        sizes: number of entries of each tensor, in order (e.g. the trainable parameters in
            ``named_parameters()`` order).
        dim: sketch size; a multiple of ``nnz``.
        nnz: non-zeros per input coordinate (1: count sketch).
        seed: seeds the hashes; the same seed gives the same map in every process.
        exact_max_params: up to this total size the vector is kept exactly.
        cache_max_entries: keep the hashes between calls up to this many (nnz · D) entries.

    Raises:
        ValueError: On bad arguments (naming the argument, the rule and the value).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        dim: int = 4096,
        nnz: int = 1,
        seed: int = 0,
        exact_max_params: int = 8192,
        cache_max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        sizes = list(sizes)
        dim = check_int("dim", dim, minimum=1)
        nnz = check_int("nnz", nnz, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        exact_max_params = check_int("exact_max_params", exact_max_params, minimum=0)
        cache_max_entries = check_int("cache_max_entries", cache_max_entries, minimum=0)
        if dim % nnz:
            raise ValueError(f"dim must be a multiple of nnz ({nnz}); got dim={dim}")
        if not sizes or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in sizes
        ):
            raise ValueError(f"sizes must be a non-empty list of integers >= 0; got {sizes!r}")
        self.sizes = [int(s) for s in sizes]
        self.num_params = sum(self.sizes)
        self.dim = int(dim)
        self.nnz = int(nnz)
        self.seed = int(seed)
        self.exact = self.num_params <= exact_max_params
        self.cache = self.nnz * self.num_params <= cache_max_entries
        # Per device: (int32 buckets, int8 signs) of each chunk, filled at the first call.
        self._hash_cache: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if not self.exact and self.num_params >= _PRIME:
            raise ValueError(
                f"sizes must total fewer than 2^31 - 1 parameters to be sketched; got "
                f"{self.num_params}"
            )
        # Per block r: (a, b) of the bucket hash, then the 4 coefficients of the sign hash.
        rng = np.random.default_rng(self.seed)
        self.coefficients = rng.integers(1, _PRIME, size=(self.nnz, 6)).tolist()

    @property
    def output_dim(self) -> int:
        """Length of a sketch: ``num_params`` when exact, ``dim`` otherwise."""
        return self.num_params if self.exact else self.dim

    def hashes(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (nnz, m) in [0, dim) and signs (nnz, m) of the global coordinates ``index``.

        Computed on ``index``'s device by integer arithmetic only (no random generator, nothing
        to transfer), so every device and process gives the same map.
        """
        width = self.dim // self.nnz
        i = index.to(torch.int64).unsqueeze(0)
        a = torch.as_tensor(self.coefficients, dtype=torch.int64, device=index.device)
        # Horner steps with a reduction after each: every product stays below 2^62.
        h = (a[:, 0:1] * i + a[:, 1:2]) % _PRIME
        buckets = h % width + torch.arange(self.nnz, device=index.device).unsqueeze(1) * width
        g = a[:, 2:3].expand(-1, i.shape[1])
        for col in range(3, 6):
            g = (g * i + a[:, col : col + 1]) % _PRIME
        signs = 1 - 2 * (g & 1)
        return buckets, signs

    @torch.no_grad()
    def __call__(self, tensors: Iterable[torch.Tensor]) -> np.ndarray:
        """The sketch (float64 numpy array of ``output_dim``) of the given tensors.

        Raises:
            ValueError: If the tensors' sizes differ from ``sizes``.
        """
        tensors = list(tensors)
        got = [t.numel() for t in tensors]
        if got != self.sizes:
            raise ValueError(f"tensors must have sizes {self.sizes}; got {got}")
        if self.exact:
            if not tensors:
                return np.zeros(0)
            # Copied into one float64 array (no per-tensor casts, no concatenation).
            out = np.empty(self.num_params)
            flat = torch.from_numpy(out)
            offset = 0
            for t, n in zip(tensors, self.sizes, strict=True):
                flat[offset : offset + n].copy_(t.detach().reshape(-1))
                offset += n
            return out
        device = tensors[0].device
        out = torch.zeros(self.dim, dtype=torch.float64, device=device)
        scale = 1.0 / math.sqrt(self.nnz)
        for x, buckets, signs in self._chunks(tensors, device):
            for r in range(self.nnz):
                out.index_add_(0, buckets[r], x * signs[r], alpha=scale)
        return out.cpu().numpy()

    def _chunks(
        self, tensors: list[torch.Tensor], device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each chunk of the concatenated tensors in float64, with its buckets and signs (from
        the cache, else computed, and cached when it is on)."""
        cached = self._hash_cache.get(device)
        fill: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if cached is None and self.cache:
            fill = []
        offset, k = 0, 0
        for t in tensors:
            flat = t.detach().reshape(-1)
            for start in range(0, flat.numel(), CHUNK):
                x = flat[start : start + CHUNK].to(torch.float64)
                if cached is not None:
                    buckets, signs = cached[k]
                else:
                    index = torch.arange(x.numel(), device=device) + (offset + start)
                    buckets, signs = self.hashes(index)
                    if fill is not None:
                        fill.append((buckets.to(torch.int32), signs.to(torch.int8)))
                k += 1
                yield x, buckets, signs
            offset += flat.numel()
        if fill is not None:
            self._hash_cache[device] = fill

    def state(self) -> dict[str, int]:
        """What defines the map (to check a resumed run sketches the same way)."""
        return {
            "num_params": self.num_params,
            "output_dim": self.output_dim,
            "dim": self.dim,
            "nnz": self.nnz,
            "seed": self.seed,
            "exact": int(self.exact),
        }
