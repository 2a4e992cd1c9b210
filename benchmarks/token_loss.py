"""What PS-KD's token loss costs over plain cross-entropy, per step; prints JSON.

``token_soft_cross_entropy`` takes the log-softmax of the (B, L, V) logits like
``F.cross_entropy`` does, and on top of it sums, at each position, the log-probabilities of
the classes outside the teacher's k (a copy of the log-probabilities with the row's own
zeroed, so that a masked class among them adds nothing). Both losses, forward and
backward, are timed in turn on the same logits and labels (a quarter of the positions
padding), ``--repeats`` times; ``ratio`` is the median of each turn's token loss over its
cross-entropy.

    python benchmarks/token_loss.py                          # B 8, L 128, V 32,000, top-8, one thread
    python benchmarks/token_loss.py --vocabulary 50257 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pskd_store.loss import token_soft_cross_entropy
from pskd_store.sequences import IGNORE_INDEX


def timed(loss: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> float:
    """Milliseconds of one forward and backward of ``loss``."""
    started = time.perf_counter()
    loss(logits).backward()
    elapsed = time.perf_counter() - started
    logits.grad = None
    return 1e3 * elapsed


def measure(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.length)
    logits = torch.randn(*shape, args.vocabulary, generator=generator).requires_grad_()
    labels = torch.randint(0, args.vocabulary, shape, generator=generator)
    labels[:, -args.length // 4:] = IGNORE_INDEX
    probs = torch.rand(*shape, args.topk, generator=generator).half() / args.topk
    classes = torch.randint(0, args.vocabulary, (*shape, args.topk), generator=generator)
    arms = {
        "cross_entropy_ms": lambda z: F.cross_entropy(z.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX),
        "token_loss_ms": lambda z: token_soft_cross_entropy(z, labels, probs, classes, 0.8),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for turn in range(args.repeats + 1):  # the first turn warms up, untimed
        for name, loss in (arms.items() if turn % 2 else reversed(arms.items())):
            elapsed = timed(loss, logits)
            if turn:
                times[name].append(elapsed)
    ratios = [token / plain for token, plain in zip(times["token_loss_ms"], times["cross_entropy_ms"])]
    return {**{name: statistics.median(values) for name, values in times.items()},
            "ratio": statistics.median(ratios), "per_turn_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocabulary", type=int, default=32_000)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"config": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                "torch": torch.__version__}, **measure(args)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
