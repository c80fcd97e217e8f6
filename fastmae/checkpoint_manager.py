"""Resume and save for the training loop: which checkpoint to continue from, whether this run may use it, how
DeepSpeed loads it (resharded through a universal checkpoint on another number of ranks), and each save."""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from . import checkpoint as ckpt
from .checkpoint_universal import to_universal, universal_config
from .config import SCHEDULE_KEYS, Config
from .distributed import DistInfo
from .errors import ResumeError
from .optim import StepPlan


@dataclass
class Resume:
    """The checkpoint a run continues from: where it is, its run state, and the tag DeepSpeed loads."""

    folder: Path  # output_dir/checkpoints
    tag: str
    state: dict[str, Any]
    load_tag: str = ""
    changed: list[str] = field(default_factory=list)  # schedule changes the run allowed (for the log)

    @property
    def step(self) -> int:
        return int(self.state["step"])


class CheckpointManager:
    """Checkpoints of one run in ``output_dir/checkpoints``: :meth:`find` and :meth:`load` on start, :meth:`save`
    during the run. Every decision is rank 0's and every check is every rank's, so all ranks raise the same
    :class:`~fastmae.errors.ResumeError` together."""

    def __init__(self, cfg: Config, dist: DistInfo, log: Callable[[str], None]) -> None:
        self.cfg, self.dist, self.log = cfg, dist, log
        self.folder = Path(cfg.train.output_dir) / "checkpoints"
        self.last_saved = -1
        tag = ckpt.latest_complete(self.folder) if dist.is_main else None
        self.last_good = str(self.folder / tag) if tag else "none"

    # ------------------------------------------------------------------ on start
    def find(self, plan: StepPlan, lr: float) -> Resume | None:
        """The checkpoint ``train.resume`` names (None: start afresh), after the schedule check."""
        choice: list[Any] = [None, None]
        if self.dist.is_main:
            try:
                choice[0] = ckpt.find_resume(self.cfg.train.resume, self.folder)
            except FileNotFoundError as e:
                choice[1] = str(e)
        if self.dist.world_size > 1:
            tdist.broadcast_object_list(choice, src=0)
        found, err = choice
        if err:
            raise ResumeError(err)
        if found is None:
            return None
        folder, tag = Path(found[0]), str(found[1])
        try:
            state: dict[str, Any] | None = ckpt.read_state(folder, tag)
        except (OSError, ValueError):
            state = None
        self._all_ok(state is not None, f"cannot read {folder / tag / ckpt.STATE_FILE}: checkpoints need a "
                                        "filesystem that every node shares (train.output_dir)")
        found_ = Resume(folder, tag, state)
        found_.changed = self._check_schedule(state, plan, lr)
        return found_

    @staticmethod
    def schedule(found: Resume | None, plan: StepPlan) -> tuple[int, int]:
        """(total steps, warmup steps): the checkpoint's when the schedule is unchanged (it continues exactly as
        it was laid out), else this run's plan."""
        sched = (found.state.get("schedule") or {}) if found is not None else {}
        if found is not None and not found.changed and sched:
            return int(sched["total_steps"]), int(sched["warmup_steps"])
        return plan.total_steps, plan.warmup_steps

    def prepare(self, found: Resume, ds_config: dict[str, Any], stage: int) -> dict[str, Any]:
        """Set the tag DeepSpeed loads and return the config it loads with: the checkpoint itself on the same
        number of ranks (each rank checks its shard is there), else its universal conversion (made once, by
        rank 0)."""
        d, state = self.dist, found.state
        folder = found.folder / found.tag
        saved_stage = state.get("zero_stage", stage)
        if 0 in (saved_stage, stage) and saved_stage != stage:
            raise ResumeError(f"{folder} was written with ZeRO stage {saved_stage}, this run uses stage {stage}: "
                              f"resume it with the same stage (--ds_config zero{saved_stage}.json)")
        if saved_stage == 0 and int(state["world_size"]) != d.world_size:
            raise ResumeError(f"{folder} was written with ZeRO stage 0 by {state['world_size']} rank(s); DeepSpeed "
                              "reshards only ZeRO 1-3 checkpoints: resume it on the same number of ranks (runs "
                              "that may move to another number of ranks use zero1/zero2/zero3.json)")
        if int(state["world_size"]) == d.world_size:
            missing = [p for p in _shard_files(folder, d.rank, stage) if not glob.glob(str(folder / p))]
            self._all_ok(not missing, f"missing checkpoint shard(s) in {folder} ({', '.join(missing)}): the "
                                      "checkpoint is incomplete or not on a filesystem shared by all nodes")
            found.load_tag = found.tag
            return ds_config
        self.log(f"checkpoint {folder} was written by {state['world_size']} rank(s), this run has "
                 f"{d.world_size}: converting it to a universal checkpoint (once)")
        box: list[Any] = [None, None]
        if d.is_main:
            try:
                box[0] = to_universal(found.folder, found.tag)
            except Exception as e:  # reported on every rank below
                box[1] = f"{type(e).__name__}: {e}"
        if d.world_size > 1:
            tdist.broadcast_object_list(box, src=0)
        uni_tag, err = box
        if err:
            raise ResumeError(f"cannot reshard {folder} for {d.world_size} rank(s): {err}")
        self._all_ok((found.folder / uni_tag).is_dir(), f"cannot see {found.folder / uni_tag}: checkpoints need "
                                                        "a filesystem that every node shares")
        found.load_tag = uni_tag
        return universal_config(ds_config)

    def load(self, found: Resume, engine: Any, scheduler: Any, loader: Any, task: Any) -> int:
        """Load the engine, the schedule, the data position and the task's state; returns the step."""
        settings = _group_settings(engine.optimizer)
        base_lrs = list(scheduler.base_lrs)
        path, _ = engine.load_checkpoint(str(found.folder), tag=found.load_tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load the checkpoint {found.folder / found.load_tag}")
        scheduler.base_lrs = base_lrs  # the peak lr is the config's (an allowed lr change applies)
        _restore_group_settings(engine.optimizer, settings, scheduler)
        loader.load_state_dict(found.state["data"])
        task.load_state_dict(found.state.get("task", {}))
        how = "" if found.state["world_size"] == self.dist.world_size else \
            f" (written by {found.state['world_size']} rank(s), resharded through a universal checkpoint)"
        self.log(f"resumed from {found.folder / found.tag} at step {found.step}{how} (epoch {loader.epoch}, "
                 f"{getattr(loader, 'samples_in_epoch', '?')} samples of it done)")
        if found.changed:
            self.log(f"resumed with changed schedule settings: {'; '.join(found.changed)}")
        self.last_saved = found.step
        return found.step

    # ------------------------------------------------------------------ during the run
    def save(self, engine: Any, step: int, state: dict[str, Any]) -> None:
        """A checkpoint of ``step`` (collective: every rank calls it), unless one was just saved."""
        if self.last_saved == step:
            return
        tag = ckpt.save(engine, self.folder, step, state, self.cfg.train.keep_last, self.dist.is_main)
        self.last_saved = step
        self.last_good = str(self.folder / tag)
        self.log(f"saved checkpoint {self.last_good}")

    # ------------------------------------------------------------------ checks
    def _all_ok(self, ok: bool, problem: str) -> None:
        """Raise the same :class:`ResumeError` on every rank when ``ok`` is false on any, naming those ranks."""
        oks: list[Any] = [ok]
        if self.dist.world_size > 1:
            oks = [None] * self.dist.world_size
            tdist.all_gather_object(oks, ok)
        bad = [r for r, v in enumerate(oks) if not v]
        if bad:
            raise ResumeError(f"rank(s) {', '.join(map(str, bad))}: {problem}")

    def _check_schedule(self, state: dict[str, Any], plan: StepPlan, lr: float) -> list[str]:
        """The schedule settings that differ from the checkpoint's; refused unless train.resume_allow_changes
        names them. Returns the allowed changes."""
        saved = state.get("config") or {}
        now = self.cfg.to_dict()
        diffs: dict[str, tuple[Any, Any]] = {}
        for key in SCHEDULE_KEYS:
            section, name = key.split(".")
            if key == "train.batch_size":  # what matters is the effective batch actually used
                old = state.get("effective_batch", (saved.get("train") or {}).get("batch_size"))
                new = plan.effective_batch
            else:
                old, new = (saved.get(section) or {}).get(name), now[section][name]
            if old is not None and old != new:
                diffs[key] = (old, new)
        allowed = {k.strip() for k in self.cfg.train.resume_allow_changes.split(",") if k.strip()}
        refused = [k for k in diffs if k not in allowed]
        if refused:
            what = "; ".join(f"{k}: checkpoint {diffs[k][0]!r}, now {diffs[k][1]!r}" for k in refused)
            hint = ""
            if "train.batch_size" in refused:
                hint = (" (the effective batch is micro batch x accumulation x ranks: with "
                        f"{self.dist.world_size} rank(s) and data.batch_size={self.cfg.data.batch_size} set "
                        f"train.batch_size={diffs['train.batch_size'][0]} to keep it, if reachable)")
            raise ResumeError(f"resuming would change the schedule: {what}{hint}. Resume with the checkpoint's "
                              f"settings, or allow the change: train.resume_allow_changes={','.join(refused)}")
        return [f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in diffs]


def _group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """Each parameter group's hyper-parameters (weight decay, lr scale, betas, ...) as this run built them."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]


def _restore_group_settings(optimizer: Any, settings: list[dict[str, Any]], scheduler: Any) -> None:
    """Put back the groups' hyper-parameters after a load, and each group's lr from the restored schedule.

    They come from the config, not from training, and a ZeRO-3 universal load copies the first group's
    settings into every group (the weight-decay group would lose its decay, layer-wise lr scales would
    collapse); for the other loads this changes nothing."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        raise ResumeError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run {len(settings)}")
    for g, saved in zip(groups, settings, strict=True):
        g.update(saved)
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
        for g, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            g["lr"] = base * fn(scheduler.last_epoch)


def _shard_files(folder: Path, rank: int, stage: int) -> list[str]:
    """Glob patterns of the files rank ``rank`` loads from a DeepSpeed checkpoint folder."""
    if stage == 0:
        return ["mp_rank_00_model_states.pt"]
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    return [model, f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
