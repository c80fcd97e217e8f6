"""Runs a training program's main() for the tests, with optional instrumentation through the trainer's
batch hooks. Launched like the real programs (``deepspeed --num_gpus N tests/helpers/train_runner.py ...``, torchrun,
or plain python).

* ``FASTMAE_TEST_PROGRAM``: ``train`` (default), ``finetune`` or ``linprobe``.
* ``FASTMAE_TEST_NAN_AT=k`` (with ``FASTMAE_TEST_NAN_RANK=r``, default 0): rank r's k-th micro batch of this
  process (0-based) becomes NaN images.
* ``FASTMAE_TEST_SYNCS=FILE``: counts, per optimizer step, every host synchronisation of the step (calls of
  DeepSpeed's accelerator ``synchronize``) and every read of a tensor value on the host (``item``, ``bool``,
  ``float``, ``int``, ``tolist``), with the code location that made it; written to FILE as JSON at the end.
  With ``FASTMAE_TEST_SYNCS_AS_CUDA=1`` DeepSpeed takes the code paths it takes on CUDA, where a device does not
  order dependent work by itself (``resolves_data_dependency`` is False: ZeRO-1/2 then synchronise around
  overlapped reductions); the CPU accelerator's ``synchronize`` does nothing either way.
* ``FASTMAE_TEST_RECORD=DIR``: every rank appends one JSON line per micro batch to ``DIR/rank<r>.jsonl``:
  the optimizer step it belongs to, the epoch, the rank, its labels (test shards label each image uniquely), the
  optimizer's parameter groups as [weight decay, lr], the host, the wall-clock time, and ``start``: the step this
  process began from (0, or the step it resumed at: a restarted job's records tell its attempts apart by it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


def hooks() -> list:
    out = []
    nan_at = int(os.environ.get("FASTMAE_TEST_NAN_AT", "-1"))
    nan_rank = int(os.environ.get("FASTMAE_TEST_NAN_RANK", "0"))
    record = os.environ.get("FASTMAE_TEST_RECORD")
    count = {"n": 0}
    start: list[int] = []

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
            start[:] = start or [tr.step]
            groups = [[g["weight_decay"], g["lr"]] for g in tr.engine.optimizer.param_groups]
            model_dtype, accum_dtype = tr.engine.get_data_types()
            dtypes = {"weights": str(next(tr.engine.module.parameters()).dtype), "engine": str(model_dtype),
                      "grad_accum": str(accum_dtype), "communication": str(tr.engine.communication_data_type)}
            line = {"step": tr.step + 1, "epoch": tr.loader.epoch, "rank": tr.dist.rank, "labels": labels.tolist(),
                    "groups": groups, "dtypes": dtypes, "host": socket.gethostname(), "time": time.time(),
                    "start": start[0]}
            with open(Path(record) / f"rank{tr.dist.rank}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

        out.append(rec)
    return out


def count_syncs(path: str) -> tuple[list, dict]:
    """Install the counters of FASTMAE_TEST_SYNCS; returns (the batch hook that tells them the step, the counts)."""
    import traceback

    import torch

    from fastmae.distributed import import_deepspeed

    import_deepspeed()  # as the program would, before the first deepspeed submodule
    from deepspeed.accelerator import get_accelerator

    counts: dict[str, int] = {}
    state = {"step": None}

    def note(kind: str) -> None:
        if state["step"] is None:
            return
        frame = next(f for f in reversed(traceback.extract_stack()[:-2]) if not f.filename.endswith("_tensor.py"))
        key = f"{state['step']}|{kind}|{os.path.basename(frame.filename)}:{frame.name}"
        counts[key] = counts.get(key, 0) + 1

    acc = get_accelerator()
    if os.environ.get("FASTMAE_TEST_SYNCS_AS_CUDA") == "1":
        acc.resolves_data_dependency = lambda: False
    sync = acc.synchronize
    acc.synchronize = lambda *a, **k: (note("synchronize"), sync(*a, **k))[1]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *a, _original=original, _name=name, **k):
            note(_name)
            return _original(self, *a, **k)

        setattr(torch.Tensor, name, read)

    def hook(tr, imgs, labels):  # calls until the next hook belong to optimizer step tr.step + 1
        state["step"] = tr.step + 1

    return [hook], counts


def main() -> int:
    syncs = os.environ.get("FASTMAE_TEST_SYNCS")
    if syncs:
        extra, counts = count_syncs(syncs)
        try:
            return _main(extra)
        finally:
            Path(syncs).write_text(json.dumps(counts, indent=1))
    return _main([])


def _main(extra: list) -> int:
    program = os.environ.get("FASTMAE_TEST_PROGRAM", "train")
    if program == "train":
        import fastmae.train as prog

        return prog.main(sys.argv[1:], hooks=hooks() + extra)
    import fastmae.finetune as ft

    return ft.main(sys.argv[1:], probe=program == "linprobe", hooks=hooks() + extra)


if __name__ == "__main__":
    raise SystemExit(main())
