"""Typed configuration: one dataclass per component, named presets, checked command-line overrides.

Each component receives only its own section (``cfg.model`` goes to the model, ``cfg.data`` to the
loader, ...). Overrides are ``section.key=value`` or ``--section.key value``; unknown keys and
impossible values stop with a :class:`ConfigError` that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin

from .data.constants import check_section as check_data_section

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "math")
MASKING_BACKENDS = ("auto", "triton", "torch")
# mask.strategy (paper Table 1f / Fig. 6): random | block (BEiT-style large blocks) | grid (one of every 2x2 kept)
MASK_STRATEGIES = ("random", "block", "grid")
KNN_FEATURES = ("cls", "pool")
PATCH_EMBED_ORDERS = ("gather_first", "embed_first")
PRECISIONS = ("bf16", "fp16", "fp32")
ON_NONFINITE = ("stop", "skip")
AUGMENT_IMPLS = ("auto", "timm", "fastmae")
# train.compile: auto (blocks on CUDA, off on CPU) | off | blocks | step | cudagraphs (fastmae.parallelize);
# on/true and false are read as blocks and off
COMPILE_CHOICES = ("auto", "off", "blocks", "step", "cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager")
# schedule settings a resumed run must share with its checkpoint (train.resume_allow_changes lifts the check)
SCHEDULE_KEYS = ("train.batch_size", "train.epochs", "optim.warmup_epochs", "optim.base_lr", "optim.lr",
                 "optim.min_lr", "train.seed", "mask.ratio")


class ConfigError(ValueError):
    """An unknown key or an impossible value in a fastmae config."""


@dataclass
class ModelConfig:
    """The MAE architecture. Field names follow the official ``MaskedAutoencoderViT`` arguments."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    # attention kernel in every block: auto | flash | sdpa | math
    attention: str = "auto"
    # the paper's "encoder w/ [M]" baseline (Table 1c / Table 2): the encoder sees all N tokens with
    # mask tokens in place of the masked ones. Only for the encoder-skip speedup measurements.
    encoder_mask_tokens: bool = False
    # order of patch embedding and masking: gather_first (gather the visible pixel patches, then embed them with
    # the conv's weights as a linear map: a quarter of the patch-embedding work at mask ratio 0.75, no (B, N, D)
    # token tensor) | embed_first (the official order: conv over every patch, then gather the visible tokens).
    # The same parameters and numbers up to float rounding; "encoder w/ [M]" always embeds every patch.
    patch_embed_order: str = "gather_first"


@dataclass
class MaskConfig:
    """Per-sample masking: which patches the encoder sees."""

    ratio: float = 0.75
    # random (the paper's default) | block (large random blocks, BEiT-style; paper Table 1f: 83.9 at 50 %,
    # 82.8 at 75 %) | grid (keeps one of every 2x2 patches: mask.ratio 0.75 only). Every strategy keeps exactly
    # int(N * (1 - ratio)) patches per sample and is a pure function of (seed, micro batch, sample)
    strategy: str = "random"
    # auto | triton | torch (auto: the fused Triton kernel on CUDA, the torch reference elsewhere)
    backend: str = "auto"


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (the paper: RandomResizedCrop + flip)."""

    # auto | dali | torch | synthetic (auto: DALI when installed, else the torch loader)
    backend: str = "auto"
    # shard files: a directory, a brace pattern "dir/{000000..000127}.tar", or "" for the bundled sample; also
    # s3://, gs://, http(s):// URLs (brace pattern, glob or folder/), streamed or fetched (see read)
    shards: str = ""
    # how shards are ordered and read: global (one permutation of all samples per epoch, random reads; remote
    # shards are first fetched whole into cache_dir) | stream (shards shuffled and split across ranks, each
    # rank's samples through a seeded shuffle buffer, every shard one sequential read; remote shards are fetched
    # just ahead of use and deleted after) | auto (stream for s3/gs/http(s) shards, global for local ones)
    read: str = "auto"
    # data.read=stream: samples in each rank's shuffle buffer; threads fetching remote shards per rank (each
    # one sequential read of a whole shard; also how many shards are fetched ahead of need)
    shuffle_buffer: int = 10000
    stream_fetchers: int = 4
    # local folder for remote shards (put it on NVMe): the whole copy (read=global) or each rank's spool of the
    # shards in use (read=stream); "" = $FASTMAE_CACHE_DIR or ~/.cache/fastmae/shards
    cache_dir: str = ""
    # micro batch per GPU (per rank)
    batch_size: int = 64
    # training drops each epoch's last incomplete global batch (as the official code): every step has one
    # shape (one compiled graph) and no rank pads with a duplicate sample. Evaluation always reads every sample.
    drop_last: bool = True
    # a sample that cannot be read or decoded (damaged JPEG, bad label, short read): stop (naming shard and key)
    # | skip (the next readable sample takes its place, deterministically; counted in the metrics as
    # data_bad_samples) until more than max_bad_samples distinct samples were bad on one rank
    on_error: str = "stop"
    max_bad_samples: int = 100
    # DALI threads / DataLoader worker processes
    num_workers: int = 4
    # DALI backend: worker processes that read the samples and draw their crops (DALI's parallel external
    # source), so no per-sample Python runs in the training process; 0 = a thread of the training process;
    # -1 = auto: 2 on a GPU, 0 on the CPU (same batches either way)
    feed_workers: int = -1
    # training crop (paper Table 1e): random_resized (RandomResizedCrop, the paper's) | fixed (a random img_size
    # crop of the image resized to img_size * 256 / 224 on its shorter side, as for evaluation) | center (that
    # resize + the centre crop: no crop augmentation; the Table 1e "none" row together with hflip=false)
    crop: str = "random_resized"
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    # training horizontal flip (p = 0.5)
    hflip: bool = True
    # colour jitter strength of brightness, contrast and saturation (each factor uniform in [1 - s, 1 + s]) on
    # training images; 0 = off (the paper's default; Table 1e "crop + color jit" uses 0.4)
    color_jitter: float = 0.0
    # resampling of the random crop: bicubic (the paper's recipe) | bilinear (cheaper on CPU)
    interpolation: str = "bicubic"
    # dtype of the images handed to the model on GPU (float32 | bfloat16 | float16): DALI outputs uint8, torch
    # normalises it into this dtype on the device
    dtype: str = "float32"
    # DALI on GPU (nvJPEG, "mixed"): the share of images decoded by the hardware JPEG decoder (A100/H100; the
    # rest on num_workers CPU threads + CUDA), and the largest image (width, height) its buffers are
    # pre-allocated for (0 = grow as needed; ImageNet originals: 5980 x 6430; shards written with --resize 320:
    # the longest side in them). 0.9 is DALI's nvImageCodec default (its legacy nvJPEG decoder's 0.65 was tuned for
    # A100's 5 hardware JPEG engines; H100 has 7)
    hw_decoder_load: float = 0.9
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0
    # synthetic backend only: how many distinct images one epoch has
    synthetic_size: int = 1281167


@dataclass
class OptimConfig:
    """AdamW with the paper's pre-training recipe (Table 8)."""

    base_lr: float = 1.5e-4
    # absolute lr; None -> base_lr * effective_batch / 256
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    # 0 = no clipping (the paper's default)
    clip_grad: float = 0.0
    # fused AdamW kernel on CUDA (auto = on where available)
    fused: str = "auto"


@dataclass
class TrainConfig:
    """Run length, batch, precision, checkpoints and logging."""

    epochs: int = 800
    # step budget for short runs (optimizer steps); 0 = run all epochs
    steps: int = 0
    # effective batch = micro batch x grad accumulation x world size (reached through accumulation)
    batch_size: int = 4096
    seed: int = 0
    precision: str = "bf16"
    log_interval: int = 20
    output_dir: str = "runs/fastmae"
    # "auto" continues from the newest complete checkpoint in output_dir; a path loads that one; "" = fresh
    resume: str = "auto"
    checkpoint_interval: int = 1000
    # save a checkpoint when the run ends (false for smoke runs and benchmarks that nothing resumes)
    checkpoint_at_end: bool = True
    keep_last: int = 3
    # per-block activation checkpointing: auto (on only when fastmae.memory's estimate exceeds 90% of the
    # GPU's memory: prefer the largest batch that fits without recompute) | on | off
    activation_checkpointing: str = "auto"
    # torch.compile (fastmae/parallelize.py), never with a graph break: blocks (each block, fullgraph) | step (the
    # whole forward with its loss as one graph) | cudagraphs (step replayed as CUDA graphs) | off | auto (blocks on
    # CUDA, off on CPU, where compiling costs more than it saves on short runs); on/true = blocks, false = off.
    # Under ZeRO-3, step and cudagraphs run per block (DeepSpeed gathers parameters in hooks between modules)
    compile: str = "auto"
    # torch.compile's backend: inductor (generates fused kernels) | aot_eager (captures and differentiates the graph
    # without generating code: for telling a tracing problem from a code-generation one, and fast CPU tests)
    compile_backend: str = "inductor"
    # a NaN/inf loss: stop (every rank, naming the step) | skip (the micro batch, on every rank)
    on_nonfinite: str = "stop"
    # peak bf16 TFLOP/s of the card for MFU; 0 = look it up from the device name
    peak_tflops: float = 0.0
    progress: bool = True
    # timeout of every process group (gloo and NCCL, DeepSpeed's included): a rank that waits longer fails
    dist_timeout_s: float = 600.0
    # experiment trackers besides metrics.jsonl: comma-separated, any of tensorboard, csv, wandb, mlflow ("" = none)
    trackers: str = "tensorboard"
    # schedule settings allowed to differ from the checkpoint on resume (comma-separated keys, e.g. train.epochs)
    resume_allow_changes: str = ""


@dataclass
class ClassifierConfig:
    """The ``cls`` section: the classifier and its fine-tuning / linear-probing recipe (unused in pre-training)."""

    num_classes: int = 1000
    # True: mean of patch tokens + fc_norm (official fine-tuning default); False: cls token after norm
    global_pool: bool = True
    drop_path: float = 0.1
    # layer-wise lr decay (1.0 = off)
    layer_decay: float = 0.75
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # random erasing probability (timm "pixel" mode, one box)
    reprob: float = 0.25
    # timm RandAugment policy, run by the training loader (DALI's or timm's ops); "" = off
    randaug: str = "rand-m9-mstd0.5-inc1"
    # auto | timm | fastmae: which implementation of mixup/cutmix/random erasing
    augment_impl: str = "auto"
    # validation shards; "" = the bundled sample's val split when data.shards is "", else no validation
    val_shards: str = ""
    # re-initialisation std of the head weights after loading (official: 2e-5 fine-tune, 0.01 probe)
    head_init_std: float = 2e-5
    # evaluate every this many epochs (and at the end)
    eval_interval: int = 1
    # partial fine-tuning (paper Fig. 9): train only the last N encoder blocks, the final norm and the head; the
    # frozen prefix runs without a backward graph; 0 = head (and norm) only; -1 = every block (the default)
    finetune_blocks: int = -1


@dataclass
class KnnConfig:
    """Weighted k-NN on frozen encoder features (DINO's monitor): ``python -m fastmae.evaluation --knn`` and,
    with ``knn.interval`` > 0, every that many epochs of pre-training."""

    # epochs between k-NN evaluations during pre-training (and at the end); 0 = off
    interval: int = 0
    # labelled shards of the feature bank and of the queries ("" with interval > 0: the bundled sample's
    # train and val splits)
    train_shards: str = ""
    val_shards: str = ""
    # neighbours and the temperature of their exp(similarity / T) votes (DINO: 20, 0.07)
    k: int = 20
    temperature: float = 0.07
    # cls (the cls token after the final norm) | pool (mean of the patch tokens)
    features: str = "cls"
    # images of each set read per evaluation (0 = all): bounds the monitor's cost on large sets
    max_images: int = 0


@dataclass
class Config:
    """A whole fastmae run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cls: ClassifierConfig = field(default_factory=ClassifierConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = ("model", "mask", "data", "optim", "train", "cls", "knn")

# ----------------------------------------------------------------------------- presets

_ARCHS: dict[str, dict[str, Any]] = {
    # paper Table 12 / official models_mae.py; decoder 8 x 512, 16 heads everywhere
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # tiny model for CPU tests and the README's first command
    "debug": dict(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    ),
}


def preset_names() -> list[str]:
    return list(_ARCHS)


def get_preset(name: str) -> Config:
    """A fresh :class:`Config` for a named preset (``mae_vit_base_patch16``, ..., ``debug``)."""
    if name not in _ARCHS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(_ARCHS)}")
    cfg = Config(model=ModelConfig(**_ARCHS[name]), preset=name)
    if name == "debug":
        cfg.data.batch_size = 16
        cfg.data.num_workers = 1
        cfg.train.batch_size = 16
        cfg.train.epochs = 400
        cfg.train.steps = 40
        cfg.train.log_interval = 5
        cfg.train.checkpoint_interval = 20
        cfg.optim.lr = 1.5e-3  # a tiny model on tiny batches: absolute lr instead of base_lr x batch / 256
        cfg.optim.warmup_epochs = 1.0
        cfg.train.precision = "fp32"
        cfg.train.output_dir = "runs/debug"
    return cfg


# ----------------------------------------------------------------------------- overrides


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Convert ``text`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, args[0], key)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return text


def _field_types(section_obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg`` from a string (parsed) or a typed value (checked)."""
    if "." not in key:
        raise ConfigError(
            f"override {key!r} must be section.key with section one of: {', '.join(SECTIONS)}"
        )
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; valid sections: {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    types_ = _field_types(obj)
    if name not in types_:
        raise ConfigError(f"unknown key {key!r}; valid keys in [{section}]: {', '.join(types_)}")
    tp = types_[name]
    if isinstance(value, str):
        value = _parse_value(value, tp, key)
    else:
        value = _parse_value(str(value), tp, key) if not _is_instance(value, tp) else value
    setattr(obj, name, value)


def _is_instance(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_instance(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``section.key=value`` and ``--section.key value`` tokens -> [(key, value), ...] in order."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" not in tok:
                if i + 1 >= len(args):
                    raise ConfigError(f"override --{tok} has no value")
                tok = f"{tok}={args[i + 1]}"
                i += 1
        if "=" not in tok:
            raise ConfigError(f"cannot read override {tok!r}: write section.key=value (e.g. train.steps=100)")
        key, value = tok.split("=", 1)
        pairs.append((key.strip(), value.strip()))
        i += 1
    return pairs


def refuse_ignored(keys: list[str], ignored: Mapping[str, str], program: str) -> None:
    """Refuse a key the running program would ignore. ``ignored`` maps a section (``mask``) or a key
    (``model.decoder_depth``) to the reason."""
    for key in keys:
        for what in (key, key.split(".", 1)[0]):
            if what in ignored:
                raise ConfigError(f"{key} is not used by {program} ({ignored[what]}); remove it")


def apply_overrides(cfg: Config, args: list[str], ignored: Mapping[str, str] | None = None,
                    program: str = "this program") -> Config:
    """Apply ``section.key=value`` and ``--section.key value`` overrides (in order) and validate; a key in
    ``ignored`` (see :func:`refuse_ignored`) is refused."""
    pairs = parse_overrides(args)
    refuse_ignored([k for k, _ in pairs], ignored or {}, program)
    for key, value in pairs:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; valid choices: {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate_model(m: ModelConfig, mask_ratio: float | None = None) -> None:
    for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
              "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio"):
        _positive(f"model.{k}", getattr(m, k))
    if m.img_size % m.patch_size:
        raise ConfigError(
            f"model.img_size={m.img_size} is not divisible by model.patch_size={m.patch_size}; "
            f"valid image sizes are multiples of {m.patch_size}"
        )
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.decoder_embed_dim % m.decoder_num_heads:
        raise ConfigError(
            f"model.decoder_embed_dim={m.decoder_embed_dim} is not divisible by "
            f"model.decoder_num_heads={m.decoder_num_heads}"
        )
    if (m.embed_dim // 2) % 2 or (m.decoder_embed_dim // 2) % 2:
        raise ConfigError("model.embed_dim and model.decoder_embed_dim must be multiples of 4 (2-D sin-cos embedding)")
    _choice("model.attention", m.attention, ATTENTION_BACKENDS)
    _choice("model.patch_embed_order", m.patch_embed_order, PATCH_EMBED_ORDERS)


def validate_mask(k: MaskConfig, num_patches: int | None = None) -> None:
    if not 0.0 < k.ratio < 1.0:
        raise ConfigError(f"mask.ratio={k.ratio} must lie strictly between 0 and 1 (the paper uses 0.75)")
    _choice("mask.backend", k.backend, MASKING_BACKENDS)
    _choice("mask.strategy", k.strategy, MASK_STRATEGIES)
    if num_patches is not None and int(num_patches * (1 - k.ratio)) < 1:
        raise ConfigError(f"mask.ratio={k.ratio} keeps no token of {num_patches} patches")
    if k.strategy == "grid":
        side = int(round((num_patches or 4) ** 0.5))
        if k.ratio != 0.75:
            raise ConfigError(f"mask.strategy=grid keeps one of every 2x2 patches: mask.ratio must be 0.75, "
                              f"not {k.ratio}")
        if side % 2:
            raise ConfigError(f"mask.strategy=grid needs an even number of patches per side, not {side} "
                              "(model.img_size / model.patch_size)")


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` for the first impossible value in ``cfg``."""
    m = cfg.model
    validate_model(m)
    validate_mask(cfg.mask, (m.img_size // m.patch_size) ** 2)
    d = cfg.data
    try:
        check_data_section(d)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    o = cfg.optim
    _positive("optim.base_lr", o.base_lr)
    if o.lr is not None:
        _positive("optim.lr", o.lr)
    _positive("optim.min_lr", o.min_lr, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_epochs", o.warmup_epochs, allow_zero=True)
    _positive("optim.clip_grad", o.clip_grad, allow_zero=True)
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, k) < 1.0:
            raise ConfigError(f"optim.{k}={getattr(o, k)} must lie in [0, 1)")
    _choice("optim.fused", o.fused, ("auto", "on", "off"))
    t = cfg.train
    _positive("train.epochs", t.epochs)
    _positive("train.steps", t.steps, allow_zero=True)
    _positive("train.batch_size", t.batch_size)
    _positive("train.log_interval", t.log_interval)
    _positive("train.checkpoint_interval", t.checkpoint_interval, allow_zero=True)
    _positive("train.keep_last", t.keep_last)
    _positive("train.peak_tflops", t.peak_tflops, allow_zero=True)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    _choice("train.activation_checkpointing", t.activation_checkpointing, ("auto", "on", "off"))
    t.compile = {"true": "blocks", "on": "blocks", "false": "off"}.get(str(t.compile).lower(), str(t.compile).lower())
    _choice("train.compile", t.compile, COMPILE_CHOICES)
    _choice("train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    if t.compile == "cudagraphs" and t.compile_backend != "inductor":
        raise ConfigError("train.compile=cudagraphs needs train.compile_backend=inductor (CUDA graphs are inductor's)")
    _positive("train.dist_timeout_s", t.dist_timeout_s)
    from .trackers import validate_trackers

    try:
        validate_trackers(t.trackers)
    except ValueError as e:
        raise ConfigError(f"train.trackers={t.trackers!r}: {e}") from None
    for key in filter(None, (k.strip() for k in t.resume_allow_changes.split(","))):
        if key not in SCHEDULE_KEYS:
            raise ConfigError(f"train.resume_allow_changes: {key!r} is not a schedule setting; valid: "
                              f"{', '.join(SCHEDULE_KEYS)}")
    validate_cls(cfg.cls, m.depth)
    validate_knn(cfg.knn)


def validate_knn(k: KnnConfig) -> None:
    """Impossible values of the ``knn`` section."""
    _positive("knn.interval", k.interval, allow_zero=True)
    _positive("knn.k", k.k)
    _positive("knn.temperature", k.temperature)
    _positive("knn.max_images", k.max_images, allow_zero=True)
    _choice("knn.features", k.features, KNN_FEATURES)


def validate_cls(c: ClassifierConfig, depth: int | None = None) -> None:
    """Impossible values of the ``cls`` section."""
    if c.num_classes < 1:
        raise ConfigError(f"cls.num_classes={c.num_classes} must be >= 1")
    for k in ("drop_path", "smoothing"):
        if not 0.0 <= getattr(c, k) < 1.0:
            raise ConfigError(f"cls.{k}={getattr(c, k)} must lie in [0, 1)")
    for k in ("mixup_prob", "mixup_switch_prob", "reprob"):
        if not 0.0 <= getattr(c, k) <= 1.0:
            raise ConfigError(f"cls.{k}={getattr(c, k)} must lie in [0, 1]")
    for k in ("mixup", "cutmix", "head_init_std"):
        if getattr(c, k) < 0:
            raise ConfigError(f"cls.{k}={getattr(c, k)} must be >= 0")
    if not 0.0 < c.layer_decay <= 1.0:
        raise ConfigError(f"cls.layer_decay={c.layer_decay} must lie in (0, 1]")
    if c.eval_interval < 1:
        raise ConfigError(f"cls.eval_interval={c.eval_interval} must be >= 1")
    if c.finetune_blocks < -1 or (depth is not None and c.finetune_blocks > depth):
        raise ConfigError(f"cls.finetune_blocks={c.finetune_blocks}: valid are 0 (head only) to model.depth="
                          f"{depth if depth is not None else 'depth'}, or -1 (every block)")
    _choice("cls.augment_impl", c.augment_impl, AUGMENT_IMPLS)
    if c.randaug:
        from .data.randaug import parse_policy

        try:
            parse_policy(c.randaug)
        except ValueError as e:
            raise ConfigError(f"cls.{e}") from None


def build_config(preset: str, overrides: list[str] | None = None, ignored: Mapping[str, str] | None = None,
                 program: str = "this program") -> Config:
    """Preset + overrides, validated (keys in ``ignored`` refused, see :func:`refuse_ignored`)."""
    cfg = get_preset(preset)
    return apply_overrides(cfg, list(overrides or []), ignored, program)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. from a checkpoint), checking keys."""
    cfg = Config(preset=d.get("preset", "custom"))
    for section in SECTIONS:
        for k, v in (d.get(section) or {}).items():
            set_value(cfg, f"{section}.{k}", v)
    validate(cfg)
    return cfg
