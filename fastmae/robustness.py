"""Robustness scores as the ImageNet variants' authors define them (the MAE paper's Table 13): ImageNet-A and
ImageNet-R on their 200-class subsets of ImageNet-1k (the 1000-class logits restricted to those columns), and
ImageNet-C as top-1 errors per corruption and severity, normalised by AlexNet's into the corruption error (CE)
and its mean over the 15 benchmark corruptions (mCE). The class lists and AlexNet's errors are package data
(``fastmae/robustness_data/``, each file naming its source). Running a model over a shard set is
:mod:`fastmae.evaluation`'s; the scoring of ImageNet-C takes it as a callable. See docs/evaluation.md.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .data import PAD_LABEL  # label of padding samples (never scored)

SUBSET_FILES = {"imagenet-a": "imagenet_a.txt", "imagenet-r": "imagenet_r.txt"}
# label spaces of subset shards: the dataset's own folders (0..199, sorted) or ImageNet-1k indices (0..999)
LABEL_SPACES = ("subset", "1k")
IMAGENET_CLASSES = 1000
ALEXNET_FILE = "alexnet_imagenet_c.txt"
# ImageNet-C's folder names: the 15 corruptions of the benchmark (in mCE), in the paper's order, and the 4 extra
# ones released with it (reported, not in mCE)
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
CLASS_MAP = "classes.json"  # written beside the shards by ``python -m fastmae.data.shards write``
_WNID = re.compile(r"^n\d{8}$")


def _data_rows(name: str) -> list[list[str]]:
    """The rows of a file of ``fastmae/robustness_data`` (``#`` lines are comments), split on whitespace."""
    text = resources.files("fastmae").joinpath("robustness_data", name).read_text()
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ----------------------------------------------------------------------------- ImageNet-A / ImageNet-R


@dataclass(frozen=True)
class ClassSubset:
    """The classes of an ImageNet variant, as ascending ImageNet-1k indices and their WordNet ids."""

    name: str
    indices: tuple[int, ...]
    wnids: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"fastmae/robustness_data/{SUBSET_FILES[self.name]}"

    def __len__(self) -> int:
        return len(self.indices)


@functools.cache
def class_subset(name: str) -> ClassSubset:
    """``imagenet-a`` or ``imagenet-r``: the 200 ImageNet-1k classes the dataset's authors score it on."""
    if name not in SUBSET_FILES:
        raise ValueError(f"subset {name!r} is not known; valid subsets: {', '.join(SUBSET_FILES)}")
    rows = _data_rows(SUBSET_FILES[name])
    indices = tuple(int(r[0]) for r in rows)
    wnids = tuple(r[1] for r in rows)
    ok = (len(indices) == 200 and list(indices) == sorted(set(indices)) and 0 <= indices[0]
          and indices[-1] < IMAGENET_CLASSES and list(wnids) == sorted(set(wnids)))
    if not ok:
        raise RuntimeError(f"fastmae/robustness_data/{SUBSET_FILES[name]} is damaged: expected 200 distinct, "
                           "ascending ImageNet-1k indices with their WordNet ids")
    return ClassSubset(name, indices, wnids)


class SubsetLogits:
    """Scores a 1000-class ImageNet model on a class subset: ``(logits, labels) -> (logits, labels)`` with the
    logits restricted to the subset's columns (B, 200) and the labels in subset space.

    ``labels="subset"``: the shards' labels are 0..199, the dataset's own class folders in sorted order (what
    ``python -m fastmae.data.shards write`` gives for ImageNet-A/R's 200 folders: WordNet ids sort like their
    ImageNet-1k indices). ``labels="1k"``: the shards carry ImageNet-1k indices (written with a 1000-class
    ``--classes`` map). A label outside the subset stops the evaluation, naming it (one host sync per batch).
    """

    def __init__(self, subset: ClassSubset, labels: str = "subset") -> None:
        if labels not in LABEL_SPACES:
            raise ValueError(f"labels={labels!r} is not valid; valid label spaces: {', '.join(LABEL_SPACES)}")
        self.subset, self.labels = subset, labels
        self.columns = torch.tensor(subset.indices, dtype=torch.long)
        self.lookup = torch.full((IMAGENET_CLASSES,), -1, dtype=torch.long)  # 1k index -> subset position
        self.lookup[self.columns] = torch.arange(len(subset))

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.shape[1] != IMAGENET_CLASSES:
            raise ValueError(f"{self.subset.name} is scored on the logits of a {IMAGENET_CLASSES}-class ImageNet "
                             f"model; this model has {logits.shape[1]} classes")
        valid = labels != PAD_LABEL
        n = len(self.subset)
        if self.labels == "1k":
            mapped = self.lookup.to(labels.device)[labels.clamp(0, IMAGENET_CLASSES - 1)]
            bad = valid & ((labels < 0) | (labels >= IMAGENET_CLASSES) | (mapped < 0))
            out = torch.where(valid, mapped, labels)
        else:
            bad = valid & ((labels < 0) | (labels >= n))
            out = labels
        if bool(bad.any()):
            raise ValueError(self._bad_label(int(labels[bad][0])))
        return logits.index_select(1, self.columns.to(logits.device)), out

    def _bad_label(self, value: int) -> str:
        name, n = self.subset.name, len(self.subset)
        if self.labels == "subset":
            return (f"label {value} is outside the {n} classes of {name} (labels 0..{n - 1}: the dataset's own "
                    f"{n} class folders, sorted); for shards labelled with ImageNet-1k indices use labels='1k' "
                    "(--labels 1k)")
        return (f"label {value} is not one of the {n} ImageNet-1k classes of {name} ({self.subset.file}); for "
                f"shards labelled 0..{n - 1} from the dataset's own folders use labels='subset' (--labels subset)")


def check_class_map(shards: str, subset: ClassSubset, labels: str) -> None:
    """When ``shards`` is a local folder with the shard writer's ``classes.json`` of WordNet ids, check that its
    labels are the ones ``subset`` and ``labels`` assume (another subset's or another label space's shards would
    otherwise give a wrong score without an error)."""
    path = Path(shards) / CLASS_MAP
    if not path.is_file():
        return
    cmap = json.loads(path.read_text())
    if not cmap or not all(isinstance(k, str) and _WNID.match(k) for k in cmap):
        return  # not WordNet ids: nothing to compare
    if labels == "subset":
        expected = {w: i for i, w in enumerate(subset.wnids)}
        wrong = [w for w in sorted(set(cmap) | set(expected)) if cmap.get(w) != expected.get(w)]
        hint = "labels='1k' (--labels 1k) if the shards carry ImageNet-1k indices, or the other subset"
    else:  # a 1000-class map holds other classes too: only the subset's are compared
        expected = dict(zip(subset.wnids, subset.indices, strict=True))
        wrong = [w for w in expected if w in cmap and cmap[w] != expected[w]]
        hint = "labels='subset' (--labels subset) if the shards were written from the dataset's own folders"
    if wrong:
        w = wrong[0]
        raise ValueError(f"{path} does not match {subset.name} with labels={labels!r}: class {w} has label "
                         f"{cmap.get(w, '(none: no such folder)')} there, {expected.get(w, '(none: not a class)')} "
                         f"in {subset.file} ({len(wrong)} such classes); use {hint}")


# ----------------------------------------------------------------------------- ImageNet-C


@functools.cache
def alexnet_errors() -> dict[str, tuple[float, ...]]:
    """AlexNet's top-1 error (fraction) at severities 1..5 of every ImageNet-C corruption (19: the 15 of the
    benchmark, then the 4 extra)."""
    out: dict[str, tuple[float, ...]] = {}
    for row in _data_rows(ALEXNET_FILE):
        name, average, errors = row[0], float(row[1]), tuple(float(v) for v in row[2:])
        if len(errors) != len(SEVERITIES) or abs(sum(errors) / len(errors) - average) > 1e-6:
            raise RuntimeError(f"fastmae/robustness_data/{ALEXNET_FILE} is damaged at {name}: expected an average "
                               "and 5 severities whose mean it is")
        out[name] = errors
    if tuple(out) != BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise RuntimeError(f"fastmae/robustness_data/{ALEXNET_FILE} lists {list(out)}, not ImageNet-C's corruptions")
    return out


def find_imagenet_c(root: str | Path) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """``ROOT/<corruption>/<severity 1..5>/`` (each a folder of shards) -> ({corruption: {severity: folder}},
    folders of ROOT that are not ImageNet-C corruptions, left out). A corruption needs all five severities."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C root {root} is not a folder (expected {root}/gaussian_noise/1/ ...)")
    known = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    found: dict[str, dict[int, Path]] = {}
    for name in known:
        folder = root / name
        if not folder.is_dir():
            continue
        missing = [s for s in SEVERITIES if not (folder / str(s)).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks severities {missing}: each corruption needs the sub-folders "
                                    "1, 2, 3, 4, 5 of shards (its error is averaged over all five)")
        found[name] = {s: folder / str(s) for s in SEVERITIES}
    other = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in known and not d.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"no ImageNet-C corruption folder in {root} (e.g. {root}/gaussian_noise/1/); "
                                f"known corruptions: {', '.join(known)}" + (f"; found {other}" if other else ""))
    return found, other


def imagenet_c_errors(sets: dict[str, dict[int, Path]], score: Callable[[str], dict[str, Any]],
                      progress: bool = True) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, int]]]:
    """Top-1 error (%) and image count of every (corruption, severity) set; ``score(shards)`` returns the
    evaluation's stats of one set (``acc1`` in %, ``count``). A progress bar runs over the sets."""
    from tqdm import tqdm

    jobs = [(c, s, str(p)) for c, by_sev in sets.items() for s, p in sorted(by_sev.items())]
    errors: dict[str, dict[int, float]] = {c: {} for c in sets}
    counts: dict[str, dict[int, int]] = {c: {} for c in sets}
    with tqdm(jobs, unit="set", desc="ImageNet-C", disable=not progress, dynamic_ncols=True) as bar:
        for corruption, severity, shards in bar:
            bar.set_postfix_str(f"{corruption}/{severity}")
            stats = score(shards)
            errors[corruption][severity] = 100.0 - float(stats["acc1"])
            counts[corruption][severity] = int(stats["count"])
    return errors, counts


def corruption_errors(errors: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Per corruption: the errors (%), their mean over severities and CE (%) = 100 * (sum over severities of
    the model's error) / (sum of AlexNet's error); mCE (%) = the mean CE over the benchmark corruptions found.
    With some of the 15 missing the mCE is partial: ``mce_complete`` is false and ``missing`` names them (such an
    mCE is not comparable to published ones). The extra corruptions get a CE but are not in mCE."""
    alex = alexnet_errors()
    corruptions: dict[str, Any] = {}
    for name in [c for c in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS if c in errors]:
        errs = errors[name]
        if sorted(errs) != list(SEVERITIES):
            raise ValueError(f"{name}: errors for severities {sorted(errs)}, need {list(SEVERITIES)}")
        model_sum = sum(errs[s] / 100.0 for s in SEVERITIES)
        corruptions[name] = {
            "errors": {str(s): errs[s] for s in SEVERITIES},
            "mean_error": sum(errs.values()) / len(SEVERITIES),
            "alexnet_mean_error": 100.0 * sum(alex[name]) / len(SEVERITIES),
            "ce": 100.0 * model_sum / sum(alex[name]),
            "in_mce": name in BENCHMARK_CORRUPTIONS,
        }
    unknown = sorted(set(errors) - set(corruptions))
    if unknown:
        raise ValueError(f"not ImageNet-C corruptions: {unknown}")
    bench = [c for c in BENCHMARK_CORRUPTIONS if c in corruptions]
    mce = sum(corruptions[c]["ce"] for c in bench) / len(bench) if bench else None
    return {"corruptions": corruptions, "mce": mce, "mce_corruptions": len(bench),
            "mce_complete": len(bench) == len(BENCHMARK_CORRUPTIONS),
            "missing": [c for c in BENCHMARK_CORRUPTIONS if c not in corruptions]}


def format_imagenet_c(report: dict[str, Any]) -> str:
    """The report of :func:`corruption_errors` as a table (errors, CE and mCE in %)."""
    head = f"{'corruption':<18}" + "".join(f"{'sev ' + str(s):>8}" for s in SEVERITIES) + \
        f"{'mean':>8}{'AlexNet':>9}{'CE':>8}"
    lines = [head, "-" * len(head)]
    for name, r in report["corruptions"].items():
        mark = "" if r["in_mce"] else " (extra: not in mCE)"
        lines.append(f"{name:<18}" + "".join(f"{r['errors'][str(s)]:>8.2f}" for s in SEVERITIES)
                     + f"{r['mean_error']:>8.2f}{r['alexnet_mean_error']:>9.2f}{r['ce']:>8.2f}{mark}")
    lines.append("-" * len(head))
    n, total = report["mce_corruptions"], len(BENCHMARK_CORRUPTIONS)
    if report["mce"] is None:
        lines.append(f"mCE: none of the {total} benchmark corruptions found")
    elif report["mce_complete"]:
        lines.append(f"mCE ({total} corruptions, AlexNet-normalised): {report['mce']:.2f}")
    else:
        lines.append(f"mCE PARTIAL over {n} of {total} corruptions (not comparable to published mCE; missing: "
                     f"{', '.join(report['missing'])}): {report['mce']:.2f}")
    return "\n".join(lines)

