"""Experiment trackers behind :class:`fastmae.metrics.MetricsLogger`: TensorBoard, CSV, Weights & Biases, MLflow.

``train.trackers`` names them (comma-separated); ``metrics.jsonl`` is written regardless. Each tracker's library is
imported only when the tracker is opened, so config validation (:func:`validate_trackers`) and runs that do not use a
tracker never need its package. W&B and MLflow keep their run id in ``<out_dir>/trackers.json`` so that a resumed
training run (same out_dir, new process) continues the same tracked run instead of starting a new one.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
import sys
from collections.abc import Iterator, Mapping
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

TRACKERS: tuple[str, ...] = ("tensorboard", "csv", "wandb", "mlflow")
STATE_FILE = "trackers.json"
# keys of a record that are not metrics: the x-axis and the wall clock
NON_METRIC_KEYS = frozenset({"step", "time"})

# package that provides each tracker, for the "pip install ..." hint
_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
_MLFLOW_PARAM_MAX = 6000  # MLflow's limit on one param value, in characters
_MLFLOW_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch call
_notified: set[str] = set()  # one-time notices already printed in this process


def validate_trackers(text: str) -> list[str]:
    """Tracker names of a comma-separated ``train.trackers`` value, lower-cased and de-duplicated in order.

    Only parses: no tracker library is imported, so config validation stays cheap. Raises ValueError on an
    unknown name, listing the valid ones. An empty value means no tracker (``metrics.jsonl`` only).
    """
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {raw.strip()!r}; valid: {', '.join(TRACKERS)} "
                             "(comma-separated, empty for none)")
        if name not in names:
            names.append(name)
    return names


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``: the flat ``section.key`` form MLflow params need."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a record: numeric values other than step/time; None and non-numbers are skipped."""
    return {k: float(v) for k, v in record.items()
            if k not in NON_METRIC_KEYS and isinstance(v, Real) and not isinstance(v, bool)}


def _notify(key: str, message: str) -> None:
    """Print a notice to stderr once per process, so repeated loggers (resume, tests) do not repeat it."""
    if key not in _notified:
        _notified.add(key)
        print(f"fastmae: {message}", file=sys.stderr, flush=True)


def _import_error(tracker: str, err: ImportError) -> ImportError:
    """The start-up error of a tracker whose library does not import, naming the package to install."""
    pkg = _PACKAGES[tracker]
    return ImportError(f"train.trackers includes {tracker!r} but its library does not import ({err}); "
                       f"install it with `pip install {pkg}` (or `pip install 'fastmae[track]'`), "
                       f"or drop {tracker!r} from train.trackers", name=pkg)


# ----------------------------------------------------------------------------- run-id state


def load_state(out_dir: Path) -> dict[str, Any]:
    """The persisted tracker state of a run directory (``{}`` when none or unreadable)."""
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def save_state(out_dir: Path, tracker: str, entry: dict[str, Any]) -> None:
    """Record one tracker's run identity in ``trackers.json``, atomically (a crash never leaves half a file)."""
    state = load_state(out_dir)
    state[tracker] = entry
    path = out_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- trackers


class Tracker(Protocol):
    """What MetricsLogger needs of a tracker: log one record (with "step" and "time"), close once."""

    name: str

    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars under ``<out_dir>/tb`` through ``torch.utils.tensorboard.SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, out_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _import_error(self.name, e) from e
        self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in numeric_metrics(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # one flush per log interval keeps dashboards current at negligible cost

    def close(self) -> None:
        self.writer.close()


class CsvTracker:
    """``<out_dir>/metrics.csv``: one row per record, the header the union of all keys seen (first-seen order).

    A record with a key the header lacks rewrites the file with the wider header (rare: keys settle after the
    first records), so every row always lines up with the header. A resumed run appends to the existing file.
    """

    name = "csv"

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.csv"
        self.fields: list[str] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                self.fields = next(csv.reader(f), [])

    def _rows(self) -> Iterator[dict[str, str]]:
        with self.path.open(newline="") as f:
            yield from csv.DictReader(f)

    def _rewrite(self, fields: list[str]) -> None:
        rows = list(self._rows()) if self.path.exists() and self.fields else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.fields = fields

    def log(self, record: Mapping[str, Any]) -> None:
        new = [k for k in record if k not in self.fields]
        if new or not self.path.exists():
            self._rewrite(self.fields + new)
        row = {k: "" if v is None else v for k, v in record.items()}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)

    def close(self) -> None:
        pass


def _wandb_has_credentials() -> bool:
    """Whether W&B could log in without a prompt: WANDB_API_KEY, an identity token, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1].split("/", 1)[0]
    host = host.split(":", 1)[0]
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [os.path.expanduser(p)
                                                                       for p in ("~/.netrc", "~/_netrc")]
    for path in candidates:
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def wandb_mode() -> str | None:
    """The mode to pass to ``wandb.init``: None lets W&B decide (WANDB_MODE set, or credentials present);
    "offline" when there are no credentials, so that an unattended run never blocks on a login prompt."""
    if os.environ.get("WANDB_MODE"):
        return None
    if _wandb_has_credentials():
        return None
    return "offline"


class WandbTracker:
    """A Weights & Biases run with its files under ``<out_dir>/wandb``; offline when no credentials are present.

    The run id is kept in ``trackers.json`` and passed with ``resume="allow"``, so a resumed training run logs into
    the same W&B run (offline, each process writes its own ``offline-run-*-<id>`` folder; ``wandb sync`` merges them).
    """

    name = "wandb"

    def __init__(self, out_dir: Path, config: Mapping[str, Any] | None, run_name: str | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _import_error(self.name, e) from e
        previous = load_state(out_dir).get(self.name) or {}
        run_id = previous.get("run_id")  # None: W&B makes a new id, persisted below
        mode = wandb_mode()
        if mode == "offline":
            where = out_dir / "wandb"
            _notify("wandb-offline", f"wandb: no WANDB_API_KEY or `wandb login` found, logging offline under {where}; "
                                     f"upload later with `wandb sync {where}/offline-run-*` (WANDB_MODE chooses)")
            # process-wide too: W&B's own usage analytics read the global settings, not wandb.init's mode
            wandb.setup(settings=wandb.Settings(mode="offline"))
        project = os.environ.get("WANDB_PROJECT") or "fastmae"
        self.run = wandb.init(dir=str(out_dir), project=project, name=run_name,
                              config=dict(config) if config is not None else None,
                              id=run_id, resume="allow", mode=mode)
        save_state(out_dir, self.name, {"run_id": self.run.id, "project": project})

    def log(self, record: Mapping[str, Any]) -> None:
        # W&B needs increasing steps within a run: steps re-logged after a resume rewound to an earlier
        # checkpoint may be dropped by W&B (online it warns); metrics.jsonl and the other trackers keep them
        self.run.log(numeric_metrics(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run, through ``MlflowClient`` (no process-global active run or tracking URI is touched).

    Tracking URI from MLFLOW_TRACKING_URI, else the file store ``<out_dir>/mlruns``; experiment from
    MLFLOW_EXPERIMENT_NAME, else "fastmae". The flattened config goes in as params (``section.key``). The run id is
    kept in ``trackers.json``; a resumed run logs into it again, adding params that are new (MLflow params are
    immutable, so a changed value is reported, not logged).
    """

    name = "mlflow"

    def __init__(self, out_dir: Path, config: Mapping[str, Any] | None, run_name: str | None) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless opted in; it is the self-contained local default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _import_error(self.name, e) from e
        self._metric, self._param = Metric, Param
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fastmae"
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)

        run = None
        previous = load_state(out_dir).get(self.name) or {}
        if previous.get("run_id") and previous.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(previous["run_id"])
            except MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage != "active":
                run = None  # deleted in the UI: start afresh rather than log into the trash
            if run is None:
                _notify(f"mlflow-missing-{previous['run_id']}", f"mlflow: run {previous['run_id']} from "
                        f"{out_dir / STATE_FILE} is not in {uri}; starting a new run")
        if run is None:
            run = self.client.create_run(exp_id, run_name=run_name)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id: str = run.info.run_id
        save_state(out_dir, self.name, {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": exp_id})
        if config:
            self._log_params(flatten_config(config), dict(run.data.params))

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        values = {k: str(v)[:_MLFLOW_PARAM_MAX] for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            _notify(f"mlflow-changed-{self.run_id}", f"mlflow: run {self.run_id} keeps its first values of "
                    f"{', '.join(changed)}: MLflow params cannot change once logged")
        todo = [self._param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(todo), _MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=todo[i:i + _MLFLOW_BATCH_PARAMS])

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", 0))
        ts_ms = int(1000 * float(record.get("time") or 0.0))
        metrics = [self._metric(k, v, ts_ms, step) for k, v in numeric_metrics(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def open_trackers(names: list[str], out_dir: Path, config: Mapping[str, Any] | None = None,
                  run_name: str | None = None) -> list[Tracker]:
    """Open the named trackers (see :func:`validate_trackers`); a missing library raises ImportError naming it.

    On failure the trackers already opened are closed again, so no half-started W&B or MLflow run lingers.
    """
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(out_dir))
            elif name == "csv":
                opened.append(CsvTracker(out_dir))
            elif name == "wandb":
                opened.append(WandbTracker(out_dir, config, run_name))
            elif name == "mlflow":
                opened.append(MlflowTracker(out_dir, config, run_name))
            else:
                raise ValueError(f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
    except BaseException:
        for tracker in opened:
            try:
                tracker.close()
            except Exception:
                pass
        raise
    return opened
