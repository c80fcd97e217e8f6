"""The DeepSpeed engine: the JSON config (bundled or a path), the values fastmae fills into it (batch sizes,
precision, clipping, the ZeRO settings that decide host syncs) and the engine every program steps."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .precision import Precision

BUNDLED_DS_CONFIGS = ("zero0.json", "zero1.json", "zero2.json", "zero3.json")


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config: a bare bundled name (``zero2.json`` or ``zero2``) or a path."""
    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    name = name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    if "/" not in name and name in BUNDLED_DS_CONFIGS:
        return json.loads(resources.files("fastmae").joinpath("configs", name).read_text())
    raise ConfigError(
        f"DeepSpeed config {name_or_path!r} is neither a file nor a bundled config; "
        f"bundled: {', '.join(BUNDLED_DS_CONFIGS)}"
    )


def _fill_key(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``key`` to ``value`` unless the user wrote a different explicit value (then refuse)."""
    current = section.get(key, "auto")
    if current == "auto" or current == value:
        section[key] = value
        return
    raise ConfigError(
        f"DeepSpeed config sets {where}{key}={current!r} but the fastmae config implies {value!r}; "
        f"set it to \"auto\" (fastmae fills it) or change the fastmae setting instead"
    )


def fill_ds_config(
    ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, precision: str,
    clip_grad: float,
) -> dict[str, Any]:
    """Fill the values fastmae owns (batch sizes, precision, clipping) so the two configs never disagree."""
    ds = json.loads(json.dumps(ds))  # deep copy
    _fill_key(ds, "train_micro_batch_size_per_gpu", micro_batch, "")
    _fill_key(ds, "gradient_accumulation_steps", grad_accum, "")
    _fill_key(ds, "train_batch_size", micro_batch * grad_accum * world_size, "")
    _fill_key(ds, "gradient_clipping", float(clip_grad), "")
    want = Precision(precision).deepspeed
    for mode in ("bf16", "fp16"):
        section = ds.setdefault(mode, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want[mode]
    if bool(ds["bf16"]["enabled"]) and precision == "bf16":
        raise ConfigError(
            "the DeepSpeed config enables its bf16 mode, which casts the weights to bf16 and accumulates and "
            "reduces gradients in bf16; fastmae's train.precision=bf16 is bf16 autocast over fp32 weights with "
            "fp32 gradients (the official MAE recipe's mixed precision): set \"bf16\": {\"enabled\": \"auto\"}")
    if bool(ds["bf16"]["enabled"]) != want["bf16"] or bool(ds["fp16"]["enabled"]) != want["fp16"]:
        raise ConfigError(
            f"DeepSpeed config enables bf16={ds['bf16']['enabled']} fp16={ds['fp16']['enabled']} but "
            f"train.precision={precision!r}; make them agree"
        )
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError("remove 'optimizer'/'scheduler' from the DeepSpeed config: fastmae builds both "
                          "from its optim section (the paper's recipe)")
    _fill_zero_sync_settings(ds, world_size, precision, clip_grad)
    return ds


def _fill_zero_sync_settings(ds: dict[str, Any], world_size: int, precision: str, clip_grad: float) -> None:
    """The ``"auto"`` ZeRO settings that decide host syncs in the step (the bundled configs use them):

    * ``overlap_comm``: on only with more than one rank. Overlapping the gradient reduction with the backward
      pass makes DeepSpeed synchronise the device with the host before each bucket; on one rank there is no
      reduction to overlap.
    * ``compute_grad_norm`` (ZeRO-1/2): off when nothing needs the norm every step (no clipping, no fp16 loss
      scaling). The fp32 engine otherwise computes it and reads ``bool(norm is finite)`` on the host every step;
      the trainer asks for it only on the steps it logs (:func:`set_grad_norm_needed`).
    """
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    stage = int(zero.get("stage", 0))
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = world_size > 1
    if zero.get("compute_grad_norm") == "auto":
        on_demand = stage in (1, 2) and not clip_grad and precision != "fp16"
        if on_demand:
            zero["compute_grad_norm"] = False
        else:
            del zero["compute_grad_norm"]  # DeepSpeed's default (ZeRO-0/3 accept no other value)


def zero3_bucket_elements(ds_config: dict[str, Any]) -> int:
    """Elements of ZeRO-3's contiguous gradient bucket (allocated once, fp32) under ``ds_config``; 0 if none."""
    zero = ds_config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) < 3 or not zero.get("contiguous_gradients", True):
        return 0
    return int(float(zero.get("reduce_bucket_size", 5e8)))  # DeepSpeed's default: 5e8


def grad_norm_on_demand(ds_config: dict[str, Any]) -> bool:
    """True when the filled config computes the gradient norm only when asked (see :func:`set_grad_norm_needed`)."""
    return (ds_config.get("zero_optimization") or {}).get("compute_grad_norm") is False


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                scheduler: Any = None) -> Any:
    """The DeepSpeed engine every training program steps (and ``benchmarks/throughput.py`` times): ``model``'s
    trainable parameters, fastmae's own optimizer and schedule, ``ds_config`` filled by :func:`fill_ds_config`.
    Step it as the programs do: the loss under :meth:`fastmae.precision.Precision.autocast`, then
    ``engine.backward(loss)`` and ``engine.step()``."""
    import deepspeed

    ds_config = dict(ds_config, zero_allow_untested_optimizer=True)  # LARS and other plain torch optimizers
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=[p for p in model.parameters() if p.requires_grad])
    engine.fastmae_grad_norm_on_demand = grad_norm_on_demand(ds_config)
    return engine


def set_grad_norm_needed(engine: Any, needed: bool) -> None:
    """Whether the next optimizer step computes the gradient norm (``engine.get_global_grad_norm()``), for an
    engine whose config computes it on demand (ZeRO-1/2 without clipping); a no-op otherwise. Only the steps
    that report the norm pay for it and for the host read that comes with it."""
    if getattr(engine, "fastmae_grad_norm_on_demand", False):
        engine.optimizer.compute_grad_norm = bool(needed)
