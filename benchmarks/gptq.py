"""GPTQ of one weight: autotune's (the Hessian's own factor) beside the paper's form (the inverse's factor).

    python benchmarks/gptq.py                 # SmolLM2's and a 1B model's weight shapes, 1 thread
    python benchmarks/gptq.py --threads 2 --repeats 5

:func:`autotune.gptq.gptq_weight` spreads the original weight's errors by ``F = V D_V^-1``, ``H = V V^T``
(one Cholesky factorisation of the Hessian). The baseline is the paper's form, as autotune ran it before
340ae2a: each column's updated error spread by ``U``, the upper Cholesky factor of ``H^-1`` (a
factorisation and a triangular inverse), with the same lazy batches, grid and rounding. Both run
in the same process on the same inputs, alternating, so the ratio is of one sitting.

Per weight (the stacked shapes GPTQ rounds: q/k/v, o, gate/up, down, and the tied head): the time of each,
the share of codes they agree on, and the ratio of their output errors on the calibration inputs
(``tr((W - Q) H (W - Q)^T)``; the same algorithm, so about 1); then the model's every weight once (its layers
times the layer's, plus the head: GPTQ's rounding of the whole model, without its forwards and Hessians).
Inputs are random and correlated, 3400 tokens (128 demo examples); the timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (hidden, intermediate, query + key + value rows, vocabulary, decoder layers); the 1B is benchmarks/scale.py's
MODELS = {"SmolLM2-135M": (576, 1536, 576 + 2 * 192, 49152, 30), "1B (TinyLlama widths)": (2048, 5632, 2048 + 2 * 256, 49152, 22)}
TOKENS = 3400


def inverse_factor_gptq(weight, hessian, grid, damping: float = 0.01):
    """The baseline: autotune's GPTQ before 340ae2a, the paper's form (errors spread by the inverse's factor)."""
    import torch

    from autotune.gptq import LAZY_COLUMNS
    from autotune.quantize import QuantizedWeight, _grid_of, _reciprocal

    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * torch.mean(torch.diag(h)))
    hinv = _lower_inverse(torch.linalg.cholesky(h.flip(0, 1))).flip(0, 1)  # U, H^-1 = U^T U
    del h
    out_features, in_features = weight.shape
    block, width = grid.block_size, max(grid.block_size, LAZY_COLUMNS)
    wt = weight.T.clone(memory_format=torch.contiguous_format)
    wt[dead] = 0
    codes = torch.empty(in_features, out_features, dtype=torch.uint8)
    block_codes = torch.empty(block, out_features)
    scales = torch.zeros(in_features // block, out_features)
    zeros = torch.zeros(in_features // block, out_features, dtype=torch.uint8)
    for batch in range(0, in_features, width):
        batch_end = min(in_features, batch + width)
        errors = torch.empty(batch_end - batch, out_features)
        for start in range(batch, batch_end, block):
            end = start + block
            w1, hinv1, errors1 = wt[start:end], hinv[start:end, start:end], errors[start - batch:end - batch]
            scale, zero = (t[:, 0] for t in _grid_of(w1.T.unsqueeze(1), grid))
            scales[start // block], zeros[start // block] = scale, zero
            reciprocal, half_up = _reciprocal(scale), zero + 0.5
            inverse_diagonal = (1 / torch.diag(hinv1)).tolist()
            for i in range(block):
                column, error = w1[i], errors1[i]
                q = torch.mul(column, reciprocal, out=block_codes[i])
                q.add_(half_up).floor_().clamp_(0.0, 15.0)
                torch.sub(q, zero, out=error)
                error.mul_(scale)
                torch.sub(column, error, out=error)
                error.mul_(inverse_diagonal[i])
                w1[i + 1:].addr_(hinv1[i, i + 1:], error, alpha=-1)
            codes[start:end] = block_codes
            wt[end:batch_end].addmm_(hinv[start:end, end:batch_end].T, errors1, alpha=-1)
        wt[batch_end:].addmm_(hinv[batch:batch_end, batch_end:].T, errors, alpha=-1)
    return QuantizedWeight(codes.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous())


def _lower_inverse(lower):
    """A lower-triangular matrix's inverse by halves (as autotune had it: torch has no trtri)."""
    import torch

    n = lower.shape[0]
    if n <= 256:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    k = n // 2
    inverse = torch.zeros_like(lower)
    inverse[:k, :k], inverse[k:, k:] = _lower_inverse(lower[:k, :k]), _lower_inverse(lower[k:, k:])
    right = torch.linalg.solve_triangular(lower[:k, :k], lower[k:, :k], upper=False, left=False)
    inverse[k:, :k] = torch.linalg.solve_triangular(lower[k:, k:], right, upper=False).neg_()
    return inverse


def shapes(hidden: int, intermediate: int, qkv: int, vocab: int, layers: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, columns, how many the model has) of each weight GPTQ rounds."""
    return [("q/k/v", qkv, hidden, layers), ("o", hidden, hidden, layers), ("gate/up", 2 * intermediate, hidden, layers),
            ("down", hidden, intermediate, layers), ("head", vocab, hidden, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating (the best is kept)")
    args = parser.parse_args()
    import torch

    from autotune.gptq import gptq_weight
    from autotune.quantize import Int4Grid

    torch.set_num_threads(args.threads)
    grid = Int4Grid(32, False)
    print(f"GPTQ of one weight, {TOKENS} calibration tokens, block 32 asymmetric, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print(f"{'model':<22} {'weight':<8} {'shape':>12} {'inverse s':>10} {'autotune s':>11} {'ratio':>6} "
          f"{'codes agree':>12} {'error ratio':>12}")
    for model, dims in MODELS.items():
        totals = [0.0, 0.0]
        for name, out, columns, count in shapes(*dims):
            generator = torch.Generator().manual_seed(0)
            mix = torch.eye(columns) + 0.3 * torch.randn(columns, columns, generator=generator) / columns ** 0.5
            x = torch.randn(TOKENS, columns, generator=generator) @ mix
            hessian = x.T @ x / TOKENS
            del x, mix
            weight = torch.randn(out, columns, generator=generator) * 0.02
            best = [float("inf"), float("inf")]
            results = [None, None]
            for fn in (inverse_factor_gptq, gptq_weight):  # untimed: the first call of a shape allocates
                fn(weight, hessian, grid)
            for _ in range(args.repeats):
                for i, fn in enumerate((inverse_factor_gptq, gptq_weight)):
                    start = time.perf_counter()
                    results[i] = fn(weight, hessian, grid)
                    best[i] = min(best[i], time.perf_counter() - start)
            totals = [t + count * b for t, b in zip(totals, best)]
            agree = (results[0].q == results[1].q).float().mean().item()

            def error(q):
                delta = weight - q.dequantize()
                return float(((delta @ hessian) * delta).sum())

            print(f"{model:<22} {name:<8} {f'{out}x{columns}':>12} {best[0]:>10.3f} {best[1]:>11.3f} "
                  f"{best[1] / best[0]:>6.2f} {agree:>11.2%} {error(results[1]) / error(results[0]):>12.4f}", flush=True)
        print(f"{model:<22} {'model':<8} {f'{dims[4]} layers':>12} {totals[0]:>10.1f} {totals[1]:>11.1f} "
              f"{totals[1] / totals[0]:>6.2f}   (every weight of the model once)")


if __name__ == "__main__":
    main()
