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
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsm_dist.data.stream import DataConfig
from jsm_dist.models import ModelConfig
from jsm_dist.settings import (
    above,
    at_least,
    check_fields,
    choices_of,
    default_of,
    field_types,
    help_of,
    setting,
)


@dataclass
class TrainConfig:
    """Run-level settings of ``jsm_dist.train``."""

    corpus: str = setting("", "packed corpus directory (holds corpus.json and labels/)")
    eval_corpus: str = setting(
        "",
        "held-out packed corpus: checked at start; the run report (jsm_dist.eval.runreport) "
        "evaluates the final RGB-only model on it (read from the run's config.json)",
    )
    out_dir: str = setting("runs/default", "run directory: config, checkpoints, logs, report")
    epochs: int = setting(6, "training epochs", check=at_least(1))
    tau: int = setting(2, "refine labels after every tau-th epoch (0 = never)", check=at_least(0))
    refine_before_training: bool = setting(False, "one refinement pass before epoch 1")
    refine_last_epoch: bool = setting(
        True, "refine after the final epoch when it is a tau-th epoch"
    )
    lr: float = setting(
        1e-4, "Adam learning rate for every sub-network (reference: 1e-4)", check=above(0)
    )
    text_lr: float = setting(
        0.0,
        "the text network's own learning rate; 0 = lr (a short CPU run gives the text "
        "network a few hundred steps, the reference about 13k: docs/experiments.md)",
        check=at_least(0),
    )
    weight_decay: float = setting(0.0, "Adam weight decay", check=at_least(0))
    decoder_lr_mult: float = setting(
        1.0,
        "learning rate of the saliency/depth decoders (all but the shared stem and the "
        "attention branch's encoder stages) = lr x this; 1 = the reference's single rate "
        "(configs/demo.yaml: 10)",
        check=above(0),
    )
    text_fit_epochs: int = setting(
        0,
        "> 0: before each refinement, fit a copy of the text network this many epochs on "
        "cached pooled features and score the candidates with it (jsm_dist/refine/textfit.py); "
        "0 = the reference: score with the jointly trained text network as it is",
        check=at_least(0),
    )
    text_fit_lr: float = setting(1e-3, "Adam learning rate of the text fitting", check=above(0))
    text_fit_negatives: int = setting(
        0,
        "text fitting: up to this many other objects per sample (regions away from the "
        "salient one, refine/regions.py) trained as 'negative' besides the background; "
        "0 = the reference pair only",
        check=at_least(0),
    )
    text_fit_max_samples: int = setting(
        20000,
        "cap on the samples cached for the text fitting (all ranks; whole shards; 0 = all)",
        check=at_least(0),
    )
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant", "learning-rate schedule (cosine: with linear warm-up)"
    )
    warmup_steps: int = setting(
        0,
        "linear warm-up, in batches of batch_size x grad_accum samples (the schedule follows "
        "the samples trained on: a job of W ranks covers W of them per optimizer step)",
        check=at_least(0),
    )
    grad_accum: int = setting(1, "gradient accumulation steps", check=at_least(1))
    clip_value: float = setting(
        0.5,
        "clip gradients to [-v, v] by value, in training and text fitting (reference 0.5); 0 = off",
        check=at_least(0),
    )
    clip_norm: float = setting(
        0.0, "clip by global norm instead (DeepSpeed uses this); 0 = off", check=at_least(0)
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = setting(
        "no", "mixed precision (GPU); CPU runs in fp32"
    )
    seed: int = setting(0, "seed of initialisation, data order and augmentation")
    checkpoint_every: int = setting(
        0, "also checkpoint every N optimizer steps (0 = epoch ends only)", check=at_least(0)
    )
    keep_checkpoints: int = setting(2, "newest complete checkpoints kept", check=at_least(1))
    resume: str = setting("", '"" (fresh) | "latest" | path of a checkpoint directory')
    keep_generations: int = setting(
        4,
        "label-store generations kept on disk (>= 2: resume may roll back one generation)",
        check=at_least(2),
    )
    label_store: str = setting(
        "run",
        '"run": <out_dir>/labels seeded from the corpus store\'s generation init_generation '
        "(runs never touch each other's labels) | \"corpus\": refine the corpus's own store in "
        "place | a directory path (seeded like run when new or empty; a start refuses an "
        "existing store unless it resumes the run it belongs to)",
    )
    init_generation: int = setting(
        0, "corpus-store generation a run's labels start from", check=at_least(0)
    )
    verify_shards: bool = setting(
        False,
        "at start, also check every shard's sha256 against corpus.json (reads the whole "
        "corpus); sizes are always checked",
    )
    label_eval_max: int = setting(
        2000, "samples used to score each label generation against GT", check=at_least(0)
    )
    tensorboard: bool = setting(True, "write TensorBoard scalars and image grids")
    image_grid_samples: int = setting(
        6, "rows of the image grid logged per refinement (0 = off)", check=at_least(0)
    )
    max_steps_per_epoch: int = setting(
        0,
        "cap on steps per epoch: the epoch ends after this many global batches of the "
        "current world size (0 = all samples; for smoke tests)",
        check=at_least(0),
    )
    cpu: bool = setting(False, "force CPU even when CUDA exists")
    dist_timeout_s: float = setting(
        600.0,
        "seconds a collective waits for the other ranks, then fails the job (a stopped or "
        "hung peer; torch's default would be 30 min); docs/faults.md",
        check=(lambda v: math.isfinite(v) and v >= 1, "must be >= 1 second"),
    )
    refine_timeout_s: float = setting(
        3600.0,
        "the same during a refinement pass (text fitting, each rank's label pass, the "
        "commit): grows with the corpus",
        check=(lambda v: math.isfinite(v) and v >= 1, "must be >= 1 second"),
    )

    def __post_init__(self) -> None:
        check_fields(self, "train")


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


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    """Turn a CLI string / file value into ``typ`` (bool, int, float, str, Optional, tuple, list)."""
    origin = typing.get_origin(typ)
    if origin is Literal:  # choices are checked by the dataclass (settings.check_fields)
        return _coerce(key, raw, type(typing.get_args(typ)[0]))
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
        # a user's file with the wrong content: reported like every other bad setting
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
    fields = {s: field_types(t) for s, t in sec_types.items()}
    values: dict[str, dict[str, Any]] = {s: {} for s in sec_types}
    for sec, body in (file_values or {}).items():
        if sec not in sec_types:
            raise ValueError(f"unknown config section {sec!r}; sections: {sorted(sec_types)}")
        if not isinstance(body, dict):
            raise ValueError(f"config section {sec!r} must be a mapping")  # noqa: TRY004
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
    """Every setting with its default and help, grouped by section (for ``--help``)."""
    lines = [
        "usage: python -m jsm_dist.train [--config FILE.{json,yaml}] [--section.key VALUE ...]",
        "",
        "Settings (a bare --key works when the name is unique; --flag alone sets a bool):",
    ]
    for sec, typ in _section_types().items():
        lines.append(f"\n[{sec}]  ({typ.__name__})")
        hints = field_types(typ)
        for f in dataclasses.fields(typ):
            choices = choices_of(hints[f.name])
            allowed = f"  {{{' | '.join(map(str, choices))}}}" if choices else ""
            lines.append(f"  --{sec}.{f.name} = {default_of(f)!r}{allowed}")
            lines.extend(
                textwrap.wrap(help_of(f), 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)
