"""Training entry point: ``accelerate launch -m jsm_dist.train [--config F] [--key value ...]``.

Also runs as a single plain process: ``python -m jsm_dist.train --corpus shards/demo/train``.
Settings: ``python -m jsm_dist.train --help`` (all of them live in jsm_dist/config.py).

The loop delegates: one ``JSMModel`` + one optimizer through ``accelerator.prepare``;
streaming loader per rank (equal steps per rank); every ``tau`` epochs a rank-synchronized
refinement pass (jsm_dist/refine/refinement.py) commits a new label-store generation; checkpoints
(jsm_dist/checkpoint.py) hold the accelerator state and the train state (epoch, data
position, label generation); telemetry on the main process (jsm_dist/telemetry.py).

Data position and resume (docs/resume.md): the position in an epoch is the number of
samples of its canonical order consumed (jsm_dist/data/order.py), the same for any world
size. A resumed job's loader starts there without reading what came before, and a job of
another size re-slices the rest: every sample of the epoch is trained on once. The
learning rate follows the samples trained on (:class:`SampleClock`), not this job's steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from jsm_dist import dist, runlock, schema
from jsm_dist.checkpoint import Checkpointer, TrainState
from jsm_dist.config import Config, help_text, parse_cli
from jsm_dist.data import remote
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.order import epoch_end, steps_between
from jsm_dist.data.stream import check_shards_cover_ranks, make_train_loader
from jsm_dist.labels import LabelStore, LabelStoreError
from jsm_dist.labels.runstore import plan_label_store, seed_run_store
from jsm_dist.models import JSMModel, save_model
from jsm_dist.refine.refinement import refine_step
from jsm_dist.sample_record import SampleRecorder
from jsm_dist.telemetry import Telemetry

log = logging.getLogger("jsm_dist.train")


def validate(cfg: Config, world_size: int | None = None):
    """Fail fast, before any process does work: corpus, label store, settings together.

    ``world_size``: the ranks the job will have (default: the launcher's WORLD_SIZE).
    """

    if not cfg.train.corpus:
        raise ValueError("train.corpus is required: --corpus <packed corpus dir> (see jsm-pack)")
    corpus = Corpus.load(cfg.train.corpus, shard_base=cfg.data.shard_base)
    if not corpus.shards or corpus.num_samples == 0:
        raise ValueError(f"corpus {corpus.root} has no samples")
    if damaged := corpus.damaged_shards(checksums=cfg.train.verify_shards):
        raise ValueError(
            f"corpus {corpus.root}: {len(damaged)} damaged shard(s):\n  "
            + "\n  ".join(damaged[:20])
            + "\nrestore them or repack the corpus (jsm-pack); nothing was started"
        )
    remote.check_remote_shards(corpus, remote.FetchPolicy.from_config(cfg.data))
    store = LabelStore.open(corpus.label_dir)
    if list(store.shard_sizes) != corpus.shard_sizes:
        raise ValueError(
            f"label store {corpus.label_dir} does not match the corpus: shard sizes "
            f"{list(store.shard_sizes)[:5]}... vs {corpus.shard_sizes[:5]}..."
        )
    if store.generation < 0:
        raise ValueError(f"label store {corpus.label_dir} has no committed generation")
    if cfg.model.mode == "full" and not corpus.has_gt:
        raise ValueError("model.mode=full needs ground-truth masks, but the corpus has none")
    if cfg.model.mode == "weak" and not corpus.has_text:
        raise ValueError("model.mode=weak needs captions; this corpus has none (use unsupervised)")
    if cfg.train.eval_corpus:
        Corpus.load(cfg.train.eval_corpus)
    # what would otherwise fail only once every rank has joined the process group

    check_shards_cover_ranks(corpus, world_size or dist.world_info().world_size)
    ckpt = Checkpointer(cfg.train.out_dir)
    if cfg.train.resume not in ("", "latest"):
        ckpt.resolve(cfg.train.resume)  # an explicit checkpoint must exist and be complete
    resuming = bool(cfg.train.resume) and (
        cfg.train.resume != "latest" or ckpt.latest() is not None
    )
    seeds_run_store = cfg.train.label_store != "corpus" and not resuming
    if seeds_run_store and not store.has_generation(cfg.train.init_generation):
        raise ValueError(
            f"corpus label store {corpus.label_dir} has no generation "
            f"{cfg.train.init_generation} (train.init_generation); it has {store.generations}"
        )
    return corpus, store


def prepare_label_store(cfg: Config, corpus, fresh: bool):
    """The store this run reads and refines, and a corpus view whose label_dir points at it.

    ``run`` (default) or a path: a store of the run's own, seeded from the corpus store's
    generation ``init_generation`` by every rank copying the shards it owns, then one
    collective commit (the same protocol as a refinement). On resume it is reused as is.
    What may be created or reused where: jsm_dist/labels/runstore.py (checked before the
    process group starts by :func:`check_label_store`, and again here).
    """

    src = LabelStore.open(corpus.label_dir)
    plan = plan_label_store(cfg.train, corpus, resuming=not fresh)
    dist.barrier()  # every rank has decided before rank 0 creates anything the plan looks at
    if plan.action == "corpus":
        return corpus, src
    view = dataclasses.replace(corpus, labels=str(plan.root.resolve()))
    if plan.action == "open":
        return view, LabelStore.open(plan.root)
    if not src.has_generation(cfg.train.init_generation):
        raise ValueError(
            f"corpus label store {corpus.label_dir} has no generation "
            f"{cfg.train.init_generation} (train.init_generation)"
        )
    return view, seed_run_store(plan, corpus, src, cfg.train)


def check_label_store(cfg: Config, corpus) -> None:
    """Refuse, before the process group starts, a start that would overwrite or misuse a
    label store (file reads only: runs on every rank)."""

    resume_from = Checkpointer(cfg.train.out_dir).resolve(cfg.train.resume)
    plan_label_store(cfg.train, corpus, resuming=resume_from is not None)


class SampleClock:
    """Samples trained on so far, over all ranks and epochs: what the learning-rate schedule
    follows, so that it continues where it was when a job resumes with another world size
    (a per-step count would run slower or faster with fewer or more ranks)."""

    def __init__(self, samples: int = 0) -> None:
        self.samples = samples


def build_optimizer(cfg: Config, model, total_samples: int, clock: SampleClock | None = None):
    """Adam + a schedule of the samples trained on (``clock``, which the train loop
    advances), in units of one batch of ``batch_size x grad_accum`` samples:
    ``total_samples`` is the run's, all epochs."""
    clock = clock or SampleClock()
    inner = getattr(model, "module", model)
    overrides = {"text": cfg.train.text_lr} if cfg.train.text_lr and inner.text is not None else {}
    opt = torch.optim.Adam(
        inner.param_groups(
            cfg.train.lr,
            None if cfg.train.decoder_lr_mult == 1 else cfg.train.lr * cfg.train.decoder_lr_mult,
            **overrides,
        ),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
    )
    warm = cfg.train.warmup_steps
    unit = cfg.data.batch_size * cfg.train.grad_accum
    steps_total = total_samples / unit

    def factor(_: int) -> float:
        # the scheduler's own count is ignored: accelerate steps a prepared scheduler once
        # per process per step, so that count depends on the world size
        step = clock.samples / unit
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.train.lr_schedule == "cosine":
            t = min(1.0, (step - warm) / max(1, steps_total - warm))
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(
    accelerator, model, optimizer, scheduler, batch, cfg: Config, weight: float = 1.0
) -> dict:
    """One (micro) step. ``weight`` 0: a padding batch (data/order.py) that joins the
    gradient all-reduce without contributing to it."""
    with accelerator.accumulate(model):
        losses = model(batch)
        accelerator.backward(losses["loss"] * weight if weight != 1.0 else losses["loss"])
        if accelerator.sync_gradients and not dist.using_deepspeed():
            # DeepSpeed clips inside its engine (ds_config gradient_clipping, by norm)
            if cfg.train.clip_value > 0:
                accelerator.clip_grad_value_(model.parameters(), cfg.train.clip_value)
            if cfg.train.clip_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {k: float(v.detach()) for k, v in losses.items()}


def run(cfg: Config) -> TrainState:

    corpus, store = validate(cfg)
    out = Path(cfg.train.out_dir)
    accelerator = dist.make_accelerator(
        force_cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,
        grad_accum=cfg.train.grad_accum,
        timeout_s=cfg.train.dist_timeout_s,
    )
    world = dist.world_info()
    _configure_deepspeed(accelerator, cfg, world.world_size)
    ckpt = Checkpointer(out, keep=cfg.train.keep_checkpoints)
    resume_from = ckpt.resolve(cfg.train.resume)
    corpus, store = prepare_label_store(cfg, corpus, fresh=resume_from is None)
    torch.manual_seed(dist.derive_seed(cfg.train.seed, schema.SEED_INIT))  # same init on every rank
    model = JSMModel(cfg.model, corpus.vocab)
    batch_size = cfg.data.batch_size
    epoch_samples = epoch_end(
        corpus.num_samples, world.world_size, batch_size, cfg.train.max_steps_per_epoch
    )
    per_epoch = steps_between(0, epoch_samples, world.world_size, batch_size)
    clock = SampleClock()
    optimizer, scheduler = build_optimizer(cfg, model, epoch_samples * cfg.train.epochs, clock)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    dist.set_phase("training")  # after prepare: DeepSpeed's own groups get the timeout too
    if world.world_size > 1:
        log.info(
            "collectives wait up to %g s (train.dist_timeout_s), %g s in refinement "
            "(train.refine_timeout_s); process group timeouts read back: %s s",
            cfg.train.dist_timeout_s,
            cfg.train.refine_timeout_s,
            dist.group_timeouts_s(),
        )
    raw_model = accelerator.unwrap_model(model)
    config_json = __import__("json").dumps(cfg.to_dict(), indent=1)
    if accelerator.is_main_process:
        cfg.save(out / "config.json")

    state = TrainState(label_generation=store.generation)
    if resume_from is not None:
        state = Checkpointer.load(accelerator, resume_from, world.world_size * batch_size)
        clock.samples = state.samples_seen
        store = _align_store(store, state, accelerator)
        log.info(
            "resumed from %s: epoch %d at sample %d of %d (%d ranks), label gen %d",
            resume_from,
            state.epoch,
            state.samples_in_epoch,
            epoch_samples,
            world.world_size,
            state.label_generation,
        )
    elif cfg.train.refine_before_training and state.refinements == 0:
        state.refine_pending = True

    record = SampleRecorder.from_env(world.rank)
    tele = Telemetry(
        out,
        enabled=accelerator.is_main_process,
        tensorboard=cfg.train.tensorboard,
        total_steps=per_epoch * cfg.train.epochs,
    )
    device = accelerator.device

    def refine_now() -> None:
        stats, fit = refine_step(
            raw_model, corpus, store, cfg, device=device, refinement=state.refinements
        )
        state.label_generation = stats.generation
        state.refinements += 1
        state.refine_pending = False
        tele.log_event(
            "refine",
            epoch=state.epoch,
            **stats.to_log(),
            text_fit=None if fit is None else dataclasses.asdict(fit),
        )
        if stats.grid:
            tele.log_images(f"labels/gen{stats.generation}", state.global_step, stats.grid)
        if accelerator.is_main_process:
            store.prune(keep=cfg.train.keep_generations)
        ckpt.save(accelerator, state, config_json)

    while True:
        if state.refine_pending:
            # text fitting runs on rank 0 alone and the pass on each rank's own shards: the
            # others wait in a collective for as long as that takes
            with dist.long_phase(
                "refinement", cfg.train.refine_timeout_s, "train.refine_timeout_s"
            ):
                refine_now()
        if state.epoch >= cfg.train.epochs:
            break
        epoch = state.epoch
        loader = make_train_loader(
            corpus,
            cfg.data,
            epoch=epoch,
            seed=cfg.train.seed,
            world=world,
            read_gt=cfg.model.mode == "full",  # only full supervision trains on GT
            start=state.samples_in_epoch,  # the data position: nothing before it is read
            end=epoch_samples,
        )
        plan = loader.plan
        batches = iter(loader)
        model.train()
        t_last = time.perf_counter()
        for k in range(len(loader)):
            batch = next(batches)
            t_data = time.perf_counter()
            lo, hi = plan.step_span(k)  # the global batch's positions (all ranks)
            padding = batch.pop("_padding", False)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step trains with
            record.step(epoch, state.global_step + 1, lo, lr, batch, padding)
            batch = to_float(batch, device, non_blocking=True)  # uint8/uint16 -> float on device
            batch = _at_least_two(batch)
            clock.samples = state.samples_seen + (hi - lo)  # the schedule's next position
            losses = train_step(
                accelerator, model, optimizer, scheduler, batch, cfg, 0.0 if padding else 1.0
            )
            state.samples_in_epoch = hi
            state.samples_seen += hi - lo
            state.step_in_epoch += 1
            state.global_step += 1
            dist.fault_point("step", state.global_step)  # crash tests: die after this step
            now = time.perf_counter()
            tele.log_step(
                state.global_step,
                losses,
                samples=hi - lo,
                step_time=now - t_last,
                data_time=t_data - t_last,
                epoch=epoch,
                lr=lr,
            )
            t_last = now
            if cfg.train.checkpoint_every and state.global_step % cfg.train.checkpoint_every == 0:
                ckpt.save(accelerator, state, config_json)
        state.epoch, state.samples_in_epoch, state.step_in_epoch = epoch + 1, 0, 0
        due = cfg.train.tau > 0 and state.epoch % cfg.train.tau == 0
        if due and (state.epoch < cfg.train.epochs or cfg.train.refine_last_epoch):
            state.refine_pending = True  # saved first: a crash in the pass redoes it on resume
        ckpt.save(accelerator, state, config_json)

    dist.set_phase("finish")
    # every rank reports its step count: equal steps per rank is what keeps DDP from hanging
    steps = dist.all_gather_object(state.global_step)
    tele.log_event(
        "done",
        steps_per_rank=steps,
        label_generation=state.label_generation,
        refinements=state.refinements,
        **tele.summary(),
    )
    if accelerator.is_main_process:
        save_model(out / "model.pt", raw_model, train_size=cfg.data.train_size)
    tele.close()
    accelerator.wait_for_everyone()
    return state


def _at_least_two(batch: dict) -> dict:
    """A batch of one sample (a rank's part of an epoch's last, partial global batch, or a
    padding batch: data/order.py) as two copies of it: the same mean loss, and batch
    norm gets more than one value per channel even where a feature map is 1x1."""
    if len(batch[schema.KEY]) != 1:
        return batch
    return {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v + v if isinstance(v, list) else v
        for k, v in batch.items()
    }


def _configure_deepspeed(accelerator, cfg: Config, world_size: int) -> None:
    """Fill ds_config's "auto" values that accelerate cannot infer from our loader.

    accelerate infers the micro-batch only from a torch DataLoader passed to prepare();
    ours is a WebLoader. DeepSpeed clips by global norm only (no value clipping): it uses
    train.clip_norm, or 1.0 when only the reference's clip_value is set.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    dsc = plugin.deepspeed_config
    dsc["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    dsc["gradient_accumulation_steps"] = cfg.train.grad_accum
    dsc["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * world_size
    if dsc.get("gradient_clipping", "auto") == "auto":
        dsc["gradient_clipping"] = cfg.train.clip_norm or (1.0 if cfg.train.clip_value else 0.0)
    if cfg.train.clip_value and not cfg.train.clip_norm:
        log.warning("DeepSpeed clips by norm (%.2f), not by value", dsc["gradient_clipping"])
    stage = dsc.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"ZeRO stage {stage} is not supported: refinement needs whole parameters")


def _align_store(store, state: TrainState, accelerator):
    """Make the store's current generation the checkpoint's (roll back a newer commit).

    A commit that happened after the checkpoint (crash between commit and checkpoint) is
    rolled back; the pending refinement then recreates it deterministically.
    """
    store.refresh()
    if store.generation != state.label_generation:
        if accelerator.is_main_process:
            log.warning(
                "label store at generation %d, checkpoint at %d: rolling back",
                store.generation,
                state.label_generation,
            )
            store.rollback(state.label_generation)
        accelerator.wait_for_everyone()
        store.refresh()
    return store


def _advise(cfg: Config, corpus) -> None:
    """Log settings that work but may not do what was meant (main rank, before any work)."""

    world = dist.world_info()
    if not world.is_main:
        return
    per_step = cfg.data.batch_size * world.world_size
    if per_step > corpus.num_samples:
        # every epoch is then one step of partial batches (data/order.py), some ranks padding
        log.warning(
            "data.batch_size=%d x %d ranks is more than the corpus' %d samples: each epoch "
            "is 1 step of smaller batches; use --data.batch_size %d or less",
            cfg.data.batch_size,
            world.world_size,
            corpus.num_samples,
            max(1, corpus.num_samples // world.world_size),
        )
    ckpt = Checkpointer(cfg.train.out_dir)
    if cfg.train.resume == "latest" and ckpt.latest() is None:
        log.info("--resume latest: no complete checkpoint in %s: starting fresh", ckpt.root)


def check_settings(argv: list[str], world_size: int | None = None):
    """(config, corpus) of a valid command line, else None after one line on stderr.

    Bad input (settings, files, corpus, label store, checkpoint to resume) is reported
    without a traceback, before any process group exists; ``jsm_dist.launching.cli`` runs this
    once before it starts the processes (``world_size``: the job's).
    """

    try:
        cfg, _ = parse_cli(argv)
        corpus, _ = validate(cfg, world_size)
    except (ValueError, OSError, LabelStoreError) as e:
        print(f"jsm_dist.train: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return None
    return cfg, corpus


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {dist.world_info().rank}] %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file
    checked = check_settings(argv)
    if checked is None:
        return 2
    cfg, corpus = checked
    lock = None
    try:
        # one job per run directory: the main process holds the lock before anything is
        # written and until it exits (jsm_dist/runlock.py)
        if dist.world_info().is_main:
            lock = runlock.acquire(cfg.train.out_dir)
        check_label_store(cfg, corpus)
    except (ValueError, FileNotFoundError, runlock.RunLockedError) as e:
        if lock is not None:
            lock.release()
        print(f"jsm_dist.train: error: {e}", file=sys.stderr)
        return 2
    _advise(cfg, corpus)
    try:
        run(cfg)
    except RuntimeError as e:
        msg = dist.describe_collective_failure(e)
        if msg is None:
            raise
        # a hung or lost peer: the phase and the setting say it all, a traceback would not
        from tqdm.auto import tqdm

        with tqdm.external_write_mode(file=sys.stderr):  # not glued to a progress bar
            print(f"jsm_dist.train: error: {msg}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


def _exit_cleanly(code: int) -> None:
    """Leave without gloo's occasional abort at interpreter shutdown (docs/platform.md)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        rc = main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        logging.getLogger("jsm_dist.train").exception("training failed")
        rc = 1
    _exit_cleanly(rc)
