"""Runs fastmae/train.py's main() for the tests, optionally with a NaN image injected at one micro batch.

Launched like the real program (``deepspeed --num_gpus N tests/train_runner.py ...`` or plain python);
``FASTMAE_TEST_NAN_AT=k`` turns the k-th batch (0-based, counted on rank 0) into NaNs.
"""

from __future__ import annotations

import os
import sys

import fastmae.train as train


def main() -> int:
    nan_at = int(os.environ.get("FASTMAE_TEST_NAN_AT", "-1"))
    if nan_at >= 0:
        original = train.make_loader

        class Poisoned:
            def __init__(self, inner):
                self.inner = inner
                self.count = 0

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __len__(self) -> int:
                return len(self.inner)

            def __iter__(self):
                for imgs, labels in self.inner:
                    if self.count == nan_at:
                        imgs = imgs * float("nan")
                    self.count += 1
                    yield imgs, labels

        train.make_loader = lambda cfg, dist: Poisoned(original(cfg, dist))
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
