"""Experiment trackers of MetricsLogger: each writes a few records for real, then the test reads back what the
tracker's own library wrote (event files, CSV, the W&B offline transaction log, the MLflow store).

A tracker whose library is not installed is skipped with the package to install (``pip install -e '.[track]'``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmae.metrics import MetricsLogger
from fastmae.trackers import TRACKERS, flatten_config, load_state, validate_trackers, wandb_mode

CONFIG = {"model": {"arch": "debug", "depth": 4}, "train": {"batch_size": 8, "lr": 1.5e-4}, "preset": "custom"}
RECORDS = [
    {"step": 10, "epoch": 0.1, "loss": 0.9, "lr": 1e-4, "grad_norm": None},
    {"step": 20, "epoch": 0.2, "loss": 0.7, "lr": 2e-4, "grad_norm": 1.5},
    {"step": 30, "epoch": 0.3, "loss": 0.5, "lr": 3e-4, "grad_norm": 1.25},
]
MORE = [{"step": 40, "epoch": 0.4, "loss": 0.4, "lr": 3e-4}, {"step": 50, "epoch": 0.5, "loss": 0.3, "lr": 3e-4}]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs(module: str, package: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` imports; the reason names the package (CI installs the ``track`` extra)."""
    return pytest.mark.skipif(not _installed(module), reason=f"{package} not installed: pip install {package} "
                                                             "(or pip install -e '.[track]')")


@pytest.fixture(autouse=True)
def tracker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, quiet and local: no tracker may reach a server or read the developer's settings."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for var in ("WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def run_logger(out: Path, trackers: str, records: list[dict], **kw: object) -> None:
    """A full MetricsLogger lifetime: open, log ``records``, close."""
    with MetricsLogger(out, enabled=True, trackers=trackers, config=CONFIG, run_name="t", **kw) as logger:
        for rec in records:
            logger.log(dict(rec))


# ----------------------------------------------------------------------------- names


def test_validate_trackers_parses_and_rejects() -> None:
    assert validate_trackers("") == []
    assert validate_trackers(" TensorBoard, csv,,wandb , mlflow,csv") == ["tensorboard", "csv", "wandb", "mlflow"]
    with pytest.raises(ValueError, match="unknown tracker 'comet'; valid: tensorboard, csv, wandb, mlflow"):
        validate_trackers("csv,comet")


def test_unknown_tracker_fails_listing_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=", ".join(TRACKERS)):
        MetricsLogger(tmp_path, trackers="tensorboard,neptune")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_library_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"pip install wandb"):
        MetricsLogger(tmp_path, trackers="csv,wandb")


def test_missing_tensorboard_default_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that do not choose trackers keep the old JSONL-only fallback; an explicit choice fails early."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        MetricsLogger(tmp_path / "explicit", trackers="tensorboard")
    logger = MetricsLogger(tmp_path / "default", True)
    assert logger.tracker_names == []
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert json.loads((tmp_path / "default" / "metrics.jsonl").read_text())["loss"] == 1.0


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    logger = MetricsLogger(out, enabled=False, trackers="tensorboard,csv,wandb,mlflow", config=CONFIG)
    for rec in RECORDS:
        logger.log(dict(rec), line="not printed")
    logger.close()
    assert not out.exists()
    assert logger.tracker_names == []


def test_flatten_config() -> None:
    assert flatten_config(CONFIG) == {"model.arch": "debug", "model.depth": 4, "train.batch_size": 8,
                                      "train.lr": 1.5e-4, "preset": "custom"}


def test_wandb_mode_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode() is None  # WANDB_MODE is set: W&B decides
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() is None
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() is None


# ----------------------------------------------------------------------------- csv + jsonl


def test_csv_header_widens_and_resume_appends(tmp_path: Path) -> None:
    run_logger(tmp_path, "csv", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "lr": 0.1, "mfu": None}])
    run_logger(tmp_path, "csv", [{"step": 3, "loss": 1.0, "lr": 0.2}])
    with (tmp_path / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["time", "step", "loss", "lr", "mfu"]
    assert [(r["step"], r["loss"], r["lr"], r["mfu"]) for r in rows] == [
        ("1", "2.0", "", ""), ("2", "1.5", "0.1", ""), ("3", "1.0", "0.2", "")]
    assert all(float(r["time"]) > 0 for r in rows)
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3]


# ----------------------------------------------------------------------------- tensorboard


@needs("tensorboard", "tensorboard")
def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_logger(tmp_path, "tensorboard", RECORDS)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "step" not in acc.Tags()["scalars"] and "time" not in acc.Tags()["scalars"]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(10, 0.9), (20, 0.7), (30, 0.5)]
    assert [e.step for e in acc.Scalars("grad_norm")] == [20, 30]  # the None value is skipped


@needs("tensorboard", "tensorboard")
def test_default_keeps_tensorboard(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, True)
    assert logger.tracker_names == ["tensorboard"]
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- wandb


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of chunks).

    W&B writes no ``wandb-summary.json`` offline, and ships no reader in Python, so the log is read directly.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "unexpected .wandb header"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def wandb_history(out: Path, steps: set[int], wait_s: float = 15.0) -> tuple[set[str], dict[int, dict[str, float]],
                                                                             list[dict]]:
    """Run ids, step -> metrics and configs of every offline run folder under ``out/wandb``, once ``steps`` are
    all there: W&B's writer process may still be flushing a run's log when ``finish`` has returned."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ids, history, configs = _wandb_history(out)
        except Exception:  # a record cut where the writer has not flushed yet
            if time.monotonic() > deadline:
                raise
        else:
            if steps <= set(history) or time.monotonic() > deadline:
                return ids, history, configs
        time.sleep(0.1)


def _wandb_history(out: Path) -> tuple[set[str], dict[int, dict[str, float]], list[dict]]:
    ids: set[str] = set()
    history: dict[int, dict[str, float]] = {}
    configs: list[dict] = []
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline run under {out / 'wandb'}"
    for path in files:
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                configs.append({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                history[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return ids, history, configs


@needs("wandb", "wandb")
def test_wandb_offline_run_and_resume(tmp_path: Path) -> None:
    run_logger(tmp_path, "wandb", RECORDS)
    run_id = load_state(tmp_path)["wandb"]["run_id"]
    ids, history, configs = wandb_history(tmp_path, {10, 20, 30})
    assert ids == {run_id}
    assert configs[0]["model"] == {"arch": "debug", "depth": 4} and configs[0]["train"]["lr"] == 1.5e-4
    assert {s: m["loss"] for s, m in history.items()} == {10: 0.9, 20: 0.7, 30: 0.5}
    assert "grad_norm" not in history[10] and history[20]["grad_norm"] == 1.5

    # W&B names an offline run's folder after the second it started and the run id: a resumed process, seconds
    # later in real use, gets a folder of its own; here, within the same second, it would reuse the first one's
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    run_logger(tmp_path, "wandb", MORE)  # a resumed process: same out_dir, same W&B run
    assert load_state(tmp_path)["wandb"]["run_id"] == run_id
    ids, history, _ = wandb_history(tmp_path, {10, 20, 30, 40, 50})
    assert ids == {run_id}
    assert {s: m["loss"] for s, m in history.items()} == {10: 0.9, 20: 0.7, 30: 0.5, 40: 0.4, 50: 0.3}
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)


# ----------------------------------------------------------------------------- mlflow


@needs("mlflow", "mlflow-skinny")
def test_mlflow_file_store_and_resume(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_logger(tmp_path, "mlflow", RECORDS)
    state = load_state(tmp_path)["mlflow"]
    assert state["tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["model.arch"] == "debug" and run.data.params["train.lr"] == "0.00015"
    loss = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "loss")]
    assert loss == [(10, 0.9), (20, 0.7), (30, 0.5)]
    assert [m.step for m in client.get_metric_history(state["run_id"], "grad_norm")] == [20, 30]

    resumed = {**CONFIG, "train": {**CONFIG["train"], "lr": 3e-4, "steps": 50}}  # one changed, one new param
    with MetricsLogger(tmp_path, enabled=True, trackers="mlflow", config=resumed, run_name="t") as logger:
        for rec in MORE:
            logger.log(dict(rec))
    assert load_state(tmp_path)["mlflow"]["run_id"] == state["run_id"]
    exp = client.get_experiment_by_name("fastmae")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [state["run_id"]]
    loss = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "loss")]
    assert loss == [(10, 0.9), (20, 0.7), (30, 0.5), (40, 0.4), (50, 0.3)]
    params = client.get_run(state["run_id"]).data.params
    assert params["train.lr"] == "0.00015" and params["train.steps"] == "50"


@needs("mlflow", "mlflow-skinny")
def test_mlflow_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "shared-store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mae-ablation")
    run_logger(tmp_path / "run", "mlflow", RECORDS[:1])
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("mae-ablation")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["loss"] == 0.9


def test_tracker_failure_does_not_stop_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        name = "broken"

        def log(self, record: object) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            pass

    logger = MetricsLogger(tmp_path, trackers="csv")
    logger.trackers.insert(0, Broken())  # type: ignore[arg-type]
    for rec in RECORDS:
        logger.log(dict(rec))
    logger.close()
    assert capsys.readouterr().err.count("tracker broken failed") == 1
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + len(RECORDS)
