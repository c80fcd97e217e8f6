"""Runs a training program's main() for the tests, with optional instrumentation through the trainer's
batch hooks. Launched like the real programs (``deepspeed --num_gpus N tests/train_runner.py ...``, torchrun,
or plain python).

* ``FASTMAE_TEST_PROGRAM``: ``train`` (default), ``finetune`` or ``linprobe``.
* ``FASTMAE_TEST_NAN_AT=k`` (with ``FASTMAE_TEST_NAN_RANK=r``, default 0): rank r's k-th micro batch of this
  process (0-based) becomes NaN images.
* ``FASTMAE_TEST_RECORD=DIR``: every rank appends one JSON line per micro batch to ``DIR/rank<r>.jsonl``:
  the optimizer step it belongs to, the epoch, the rank, its labels (test shards label each image uniquely) and the
  optimizer's parameter groups as [weight decay, lr].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def hooks() -> list:
    out = []
    nan_at = int(os.environ.get("FASTMAE_TEST_NAN_AT", "-1"))
    nan_rank = int(os.environ.get("FASTMAE_TEST_NAN_RANK", "0"))
    record = os.environ.get("FASTMAE_TEST_RECORD")
    count = {"n": 0}

    if nan_at >= 0:
        def poison(tr, imgs, labels):
            k = count["n"]
            count["n"] += 1
            if tr.dist.rank == nan_rank and k == nan_at:
                return imgs * float("nan"), labels
            return None

        out.append(poison)
    if record:
        def rec(tr, imgs, labels):
            Path(record).mkdir(parents=True, exist_ok=True)
            groups = [[g["weight_decay"], g["lr"]] for g in tr.engine.optimizer.param_groups]
            model_dtype, accum_dtype = tr.engine.get_data_types()
            dtypes = {"weights": str(next(tr.engine.module.parameters()).dtype), "engine": str(model_dtype),
                      "grad_accum": str(accum_dtype), "communication": str(tr.engine.communication_data_type)}
            line = {"step": tr.step + 1, "epoch": tr.loader.epoch, "rank": tr.dist.rank, "labels": labels.tolist(),
                    "groups": groups, "dtypes": dtypes}
            with open(Path(record) / f"rank{tr.dist.rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

        out.append(rec)
    return out


def main() -> int:
    program = os.environ.get("FASTMAE_TEST_PROGRAM", "train")
    if program == "train":
        import fastmae.train as prog

        return prog.main(sys.argv[1:], hooks=hooks())
    import fastmae.finetune as ft

    return ft.main(sys.argv[1:], probe=program == "linprobe", hooks=hooks())


if __name__ == "__main__":
    raise SystemExit(main())
