"""Every setting of a training run, in one place: typed dataclasses, file + CLI loading.

Each component owns its dataclass (``DataConfig`` in data/stream.py, ``ModelConfig`` in
models/); this module owns the run-level ``TrainConfig`` and composes all of them into
``Config``. A run's settings come from, in order of precedence:

1. ``--section.key value`` (or ``--key value`` when ``key`` names one field only) on the CLI;
2. a JSON or YAML file given with ``--config`` (``{"train": {...}, "data": {...}, ...}``);
3. the dataclass defaults.

Unknown keys, bad values and inconsistent settings fail here, before any process starts
work, with the offending key and value in the message. The resolved config is written as
``config.json`` into the run directory and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsm_dist.data.stream import DataConfig
from jsm_dist.models import ModelConfig

LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Run-level settings of ``jsm_dist.train``."""

    corpus: str = ""  # packed corpus directory (holds corpus.json and labels/)
    eval_corpus: str = ""  # optional held-out packed corpus, evaluated at the end
    out_dir: str = "runs/default"  # run directory: config, checkpoints, logs, report
    epochs: int = 6  # training epochs
    tau: int = 2  # refine labels after every tau-th epoch (0 = never)
    refine_before_training: bool = False  # one refinement pass before epoch 1
    refine_last_epoch: bool = True  # refine after the final epoch when it is a tau-th epoch
    lr: float = 1e-4  # Adam learning rate for every sub-network (reference: 1e-4)
    text_lr: float = 0.0  # the text network's own learning rate; 0 = lr (see README: a short
    # CPU run gives the text network a few hundred steps, the reference ~13k)
    weight_decay: float = 0.0
    text_fit_epochs: int = 0  # > 0: before each refinement, fit a copy of the text network
    # this many epochs on cached pooled features, and score with it (jsm_dist/textfit.py;
    # 0 = the reference: score with the jointly trained text network as it is)
    text_fit_lr: float = 1e-3  # Adam learning rate of that fitting
    text_fit_max_samples: int = 20000  # cap on the samples cached for it (all ranks; whole shards)
    lr_schedule: str = "constant"  # constant | cosine (with linear warm-up)
    warmup_steps: int = 0
    grad_accum: int = 1  # gradient accumulation steps
    clip_value: float = 0.5  # clip gradients to [-v, v] by value (reference 0.5); 0 = off
    clip_norm: float = 0.0  # clip by global norm instead (DeepSpeed uses this); 0 = off
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU); CPU runs in fp32
    seed: int = 0
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends only)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str = ""  # "" | "latest" | path of a checkpoint directory
    keep_generations: int = 4  # label-store generations kept on disk
    label_store: str = "run"  # "run": <out_dir>/labels seeded from the corpus store's
    # generation init_generation (runs never touch each other's labels) | "corpus": refine the
    # corpus's own store in place | a directory path (seeded like "run" when empty)
    init_generation: int = 0  # corpus-store generation a run's labels start from
    label_eval_max: int = 2000  # samples used to score each label generation vs GT
    tensorboard: bool = True
    image_grid_samples: int = 6  # rows of the image grid logged per refinement (0 = off)
    max_steps_per_epoch: int = 0  # cap steps per epoch (0 = all; for smoke tests)
    cpu: bool = False  # force CPU even when CUDA exists
    dist_timeout_s: float = 600.0  # seconds a collective waits for the other ranks, then fails
    # the job (a stopped or hung peer; torch's default would be 30 min); docs/faults.md
    refine_timeout_s: float = 3600.0  # the same during a refinement pass (text fitting on
    # rank 0 while the others wait, each rank's label pass, the commit): grows with the corpus

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(self.tau >= 0, "train.tau", self.tau, "must be >= 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(self.text_lr >= 0, "train.text_lr", self.text_lr, "must be >= 0 (0 = lr)")
        _check(self.text_fit_epochs >= 0, "train.text_fit_epochs", self.text_fit_epochs, ">= 0")
        _check(self.text_fit_lr > 0, "train.text_fit_lr", self.text_fit_lr, "must be > 0")
        _check(
            self.text_fit_max_samples >= 0,
            "train.text_fit_max_samples",
            self.text_fit_max_samples,
            ">= 0 (0 = all)",
        )
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.clip_value >= 0, "train.clip_value", self.clip_value, "must be >= 0")
        _check(self.clip_norm >= 0, "train.clip_norm", self.clip_norm, "must be >= 0")
        _check(
            self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule, LR_SCHEDULES
        )
        _check(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            self.mixed_precision,
            MIXED_PRECISION,
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, ">= 1")
        _check(
            self.keep_generations >= 2,
            "train.keep_generations",
            self.keep_generations,
            "must be >= 2 (resume may need to roll back one generation)",
        )
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, ">= 0")
        for key in ("dist_timeout_s", "refine_timeout_s"):
            value = getattr(self, key)
            _check(
                math.isfinite(value) and value >= 1,
                f"train.{key}",
                value,
                "must be >= 1 second (a collective waits this long for the other ranks)",
            )


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _check(ok: bool, key: str, value: Any, what: Any) -> None:
    if not ok:
        hint = f"one of {what}" if isinstance(what, tuple) else what
        raise ValueError(f"invalid setting {key}={value!r}: {hint}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    """Turn a CLI string / file value into ``typ`` (bool, int, float, str, Optional, tuple, list)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return _coerce(key, raw, args[0])
    if isinstance(raw, str) and (origin in (tuple, list) or typ in (tuple, list)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = [p for p in raw.split(",") if p]
    if origin in (tuple, list):
        args = typing.get_args(typ)
        inner = args[0] if args else str
        vals = [_coerce(key, v, inner) for v in raw]
        return tuple(vals) if origin is tuple else vals
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"invalid setting {key}={raw!r}: expected true/false")
    if typ in (int, float, str):
        try:
            if typ is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return typ(raw)
        except (TypeError, ValueError):
            raise ValueError(f"invalid setting {key}={raw!r}: expected {typ.__name__}") from None
    return raw


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML{_yaml_where(e)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
    if not isinstance(data, dict):
        # ValueError like every bad input: the entry point reports those in one line
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")  # noqa: TRY004
    return data


def _yaml_where(e) -> str:
    """`` at line L, column C: problem (context started at line L, column C)`` in one line
    (PyYAML's own text spans several lines and quotes the source)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return ": " + " ".join(str(e).split())
    out = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, where = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and where is not None:
        out += f" ({context} started at line {where.line + 1}, column {where.column + 1})"
    return out


def _resolve_key(key: str, sections: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """``section.name`` or a bare ``name`` that exists in exactly one section."""
    if "." in key:
        sec, name = key.split(".", 1)
        if sec in sections and name in sections[sec]:
            return sec, name
    else:
        owners = [s for s, flds in sections.items() if key in flds]
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            raise ValueError(
                f"setting {key!r} is ambiguous: use one of "
                + ", ".join(f"--{s}.{key}" for s in owners)
            )
    every = [f"{s}.{n}" for s, flds in sections.items() for n in flds]
    close = difflib.get_close_matches(key, every + [n for f in sections.values() for n in f], 3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown setting {key!r}{hint}")


def build_config(
    file_values: dict | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Merge file values and ``key -> value`` overrides over the defaults; validate."""
    sec_types = _section_types()
    fields = {s: _field_types(t) for s, t in sec_types.items()}
    values: dict[str, dict[str, Any]] = {s: {} for s in sec_types}
    for sec, body in (file_values or {}).items():
        if sec not in sec_types:
            raise ValueError(f"unknown config section {sec!r}; sections: {sorted(sec_types)}")
        if not isinstance(body, dict):
            raise ValueError(f"config section {sec!r} must be a mapping")  # noqa: TRY004 (bad input)
        for name, raw in body.items():
            s, n = _resolve_key(f"{sec}.{name}", fields)
            values[s][n] = _coerce(f"{s}.{n}", raw, fields[s][n])
    for key, raw in (overrides or {}).items():
        s, n = _resolve_key(key, fields)
        values[s][n] = _coerce(f"{s}.{n}", raw, fields[s][n])
    return Config(**{s: sec_types[s](**values[s]) for s in sec_types})


def parse_cli(argv: list[str]) -> tuple[Config, dict[str, Any]]:
    """``[--config FILE] [--key value | --key=value | --flag] ...`` -> (Config, overrides).

    A bare ``--flag`` with no value sets a bool setting to true.
    """
    file_path = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: settings are --key value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val = argv[i + 1]
            i += 2
        else:
            val = "true"
            i += 1
        key = key.replace("-", "_")
        if key == "config":
            file_path = val
        else:
            overrides[key] = val
    file_values = _load_file(file_path) if file_path else {}
    return build_config(file_values, overrides), overrides


def help_text() -> str:
    """Every setting with its default, grouped by section (for ``--help``)."""
    lines = [
        "usage: python -m jsm_dist.train [--config FILE.{json,yaml}] [--section.key VALUE ...]",
        "",
        "Settings (a bare --key works when the name is unique; --flag alone sets a bool):",
    ]
    for sec, typ in _section_types().items():
        lines.append(f"\n[{sec}]  ({typ.__name__})")
        doc_comments = _field_comments(typ)
        for f in dataclasses.fields(typ):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            )
            note = doc_comments.get(f.name, "")
            lines.append(f"  --{sec}.{f.name} = {default!r}" + (f"    # {note}" if note else ""))
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source, as its help text."""
    import inspect

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith("#"):
            name = s.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = s.split("#", 1)[1].strip()
    return out
