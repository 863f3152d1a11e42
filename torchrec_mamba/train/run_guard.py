"""Checks made before a run touches its folders: resume only the same run, never clobber results.

Pure functions (no torch, no process group) that the CLI calls before any weight is loaded or
any file is written:

* :func:`resolve_resume`: ``--resume`` with no checkpoint is an error (a misspelled
  ``--checkpoint-dir`` must not silently start a new run); ``--resume-if-exists`` starts fresh;
* :func:`compare_run_configs` / :func:`check_resume_config`: the saved ``run_config.json`` and
  the new run must agree on the data (path and :func:`data_fingerprint`), the item count and
  every key that shapes the model, or the resume is refused with each difference named;
* :func:`check_output_dir`: a folder that already holds results is refused unless
  ``overwrite`` is given (as HF Trainer's ``overwrite_output_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DATA_KEYS",
    "MODEL_SHAPE_KEYS",
    "RESULT_FILES",
    "RUN_CONFIG",
    "check_output_dir",
    "check_resume_config",
    "compare_run_configs",
    "data_fingerprint",
    "resolve_resume",
]

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
DATA_INFO = "data_info.json"
#: Keys of the run config that name the data a run was trained on.
DATA_KEYS = ("data", "data_fingerprint", "num_items", "num_users")
#: Keys that decide the shape (or layout) of the model's parameters and of its checkpoint.
MODEL_SHAPE_KEYS = (
    "model", "d_model", "embedding_dim", "num_layers", "d_state", "d_conv", "expand",
    "num_heads", "max_len", "num_categories", "category_loss_weight", "sampled_softmax",
    "sharding", "world_size",
)
#: Files whose presence means a folder holds a finished (or running) run.
RESULT_FILES = ("metrics.json", "eval_metrics.json", RUN_CONFIG, "checkpoint.pt", "latest")
_MIB = 1 << 20
_CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "latest")


def data_fingerprint(path: str | Path) -> str:
    """A cheap identity of a data file: its size and a SHA-256 of its first and last MiB.

    It does not read the whole file (cheap for multi-GB inputs) and ignores the modification
    time (a copy or a ``touch`` keeps it), but any change of length and any edit within the
    first or last MiB changes it. An edit in the middle of a file larger than 2 MiB that keeps
    its size is not detected.

    Args:
        path (str | Path): the data file (for a ``FORMAT:PATH`` spec pass ``PATH``).

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> _ = open(p, "w").write("1 2 3\\n")
        >>> data_fingerprint(p)
        '6:ba53153a27ea1454'

    Returns:
        str: ``"SIZE:HEX16"``.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot fingerprint {p}: not a file")
    size = p.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(p, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(size - _MIB, _MIB))
            h.update(f.read(_MIB))
    return f"{size}:{h.hexdigest()[:16]}"


def compare_run_configs(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The differences between two run configs that forbid resuming one as the other.

    Only :data:`DATA_KEYS` and :data:`MODEL_SHAPE_KEYS` are compared (learning rate, epochs,
    patience and the like may change on resume). A key missing from either config (e.g. a
    config written by an older version) is not compared; ``None`` against a value is a
    difference. Compare configs with their defaults filled in.

    Args:
        saved (Mapping[str, Any]): the ``run_config.json`` of the checkpoint.
        new (Mapping[str, Any]): the config of the run that wants to resume.

    Example::

        >>> compare_run_configs({"d_model": 64, "num_items": 12101, "lr": 1e-3},
        ...                     {"d_model": 32, "num_items": 12101, "lr": 5e-4})
        ['d_model: 64 in the checkpoint, 32 now']

    Returns:
        list[str]: one human-readable line per difference, empty when the resume is allowed.
    """
    out = []
    for key in DATA_KEYS + MODEL_SHAPE_KEYS:
        if key in saved and key in new and saved[key] != new[key]:
            out.append(f"{key}: {saved[key]!r} in the checkpoint, {new[key]!r} now")
    return out


def check_resume_config(checkpoint_dir: str | Path, new: Mapping[str, Any]) -> None:
    """Refuse to resume from ``checkpoint_dir`` when its saved config is another run.

    The saved config is ``run_config.json`` merged with ``data_info.json`` (item count, data
    fingerprint) when that file is there too.

    Args:
        checkpoint_dir (str | Path): the checkpoint folder.
        new (Mapping[str, Any]): the new run's config, defaults filled in.

    Raises:
        ValueError: naming the file and every difference; or when the file is missing or not
            JSON (a checkpoint without it cannot be checked, so it is not resumed).
    """
    path = Path(checkpoint_dir) / RUN_CONFIG
    if not path.is_file():
        raise ValueError(
            f"{path} not found: cannot check that the checkpoint belongs to this run "
            "(it is written by `train --checkpoint-dir`)"
        )
    saved: dict[str, Any] = {}
    for part in (path, Path(checkpoint_dir) / DATA_INFO):  # data_info.json is optional
        if part is not path and not part.is_file():
            continue
        try:
            values = json.loads(part.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{part}: not a readable run config ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{part}: not a run config (a JSON object expected)")
        saved.update(values)
    diffs = compare_run_configs(saved, new)
    if diffs:
        raise ValueError(
            f"cannot resume from {checkpoint_dir}: it was trained with other settings ("
            + "; ".join(diffs)
            + "); use another --checkpoint-dir to start a new run"
        )


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds results, unless ``overwrite``.

    Args:
        path (str | Path): the ``--output`` folder (it need not exist yet).
        overwrite (bool): allow replacing earlier results (logged as a warning).

    Example::

        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "metrics.json"), "w").write("{}")
        >>> check_output_dir(d, overwrite=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: output folder ... already holds results (metrics.json); pass --overwrite to replace them, or choose another --output

    Raises:
        ValueError: when ``path`` is a file, or holds any of :data:`RESULT_FILES` (or ``*.pt``
            weights) and ``overwrite`` is False.
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise ValueError(f"output {d} exists and is not a folder")
    if not d.is_dir():
        return
    found = [name for name in RESULT_FILES if (d / name).exists()]
    found += sorted(p.name for p in d.glob("*.pt") if p.name not in found)
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"output folder {d} already holds results ({', '.join(found)}); pass --overwrite "
            "to replace them, or choose another --output"
        )
    logger.warning("--overwrite: replacing the results in %s (%s)", d, ", ".join(found))


def resolve_resume(
    checkpoint_dir: str | Path | None, resume: bool, resume_if_exists: bool
) -> Literal["resume", "fresh"]:
    """Decide whether a run resumes, before anything is loaded.

    Args:
        checkpoint_dir (str | Path | None): ``--checkpoint-dir``.
        resume (bool): ``--resume``: a checkpoint must be there.
        resume_if_exists (bool): ``--resume-if-exists``: resume when there is one, else start
            fresh.

    Example::

        >>> resolve_resume("/no/such/dir", resume=False, resume_if_exists=True)
        'fresh'
        >>> resolve_resume("/no/such/dir", resume=True, resume_if_exists=False)
        Traceback (most recent call last):
        ...
        ValueError: --resume: no checkpoint in /no/such/dir (the folder does not exist); check the path, or pass --resume-if-exists to start from scratch when there is none

    Returns:
        str: ``"resume"`` or ``"fresh"``.
    """
    if not resume and not resume_if_exists:
        return "fresh"
    flag = "--resume-if-exists" if resume_if_exists and not resume else "--resume"
    if checkpoint_dir is None:
        raise ValueError(f"{flag} needs --checkpoint-dir")
    d = Path(checkpoint_dir)
    if any((d / name).is_file() for name in _CHECKPOINT_FILES):
        return "resume"
    if resume_if_exists:
        logger.info("no checkpoint in %s: starting from scratch (--resume-if-exists)", d)
        return "fresh"
    why = (
        "the folder does not exist"
        if not d.exists()
        else "not a folder" if not d.is_dir()
        else "no checkpoint.pt or latest in it"
    )
    raise ValueError(
        f"--resume: no checkpoint in {d} ({why}); check the path, or pass --resume-if-exists "
        "to start from scratch when there is none"
    )
