"""The trained base model the project makes itself: ``+recipe=pretrain`` trained once through the real launcher,
exported as a Hugging Face family's directory and cached by a hash of the config that determines its weights.
The compression demo and benchmark start from it (``model.init_from=hf:<path>``).

Cache layout, under ``<cache_root>/base/`` (``cache_root``: ``data.cache_dir``, else ``$MOETRAIN_CACHE``, else
``~/.cache/moetrain``, as the data pipeline picks it)::

    <family>-<key>/            the Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it)
        config.json  model.safetensors
        base_model.json        metadata: key, overrides, hashed and resolved config, tokens, val curve,
                               flatness check, FLOPs breakdown, build seconds (:func:`build_metadata`)
        run/                   the pretraining run folder (metrics.jsonl, summary.json, report.md, .hydra/,
                               export/); its checkpoints are deleted (optimizer state, not needed to reuse it)
    <family>-<key>.failed.log  the launcher's output of the last failed build of that key, if any

An entry is built in ``.tmp-<family>-<key>-<pid>/`` beside it and renamed into place (``os.replace``): a
crashed or failed build leaves no entry, and a reader never sees a half-written one.

Flatness criterion (:func:`check_flatness`): over the last ``FLAT_WINDOW`` (20 %) of the steps the validation
loss improves by less than ``FLAT_TOLERANCE`` (1 %) relative, ``(L(s0) - L(N)) / L(s0) < 0.01`` with ``L(N)``
the loss at the final step N and ``L(s0)`` the loss at the last evaluation at or before ``s0 = 0.8 N``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrain.config import ConfigError, TrainConfig, plain
from moetrain.interop.entry import resolve_config
from moetrain.metrics.flops import forward_flops_per_token
from moetrain.runtime.distributed import free_port, shm_buffer_paths
from moetrain.train.data import default_cache_dir, local_files, stdlib_files

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "pretrain"
FAMILY = "mixtral"
FORMAT = "moetrain-base-model-v1"
# Part of every key: raise it when what the hash covers changes meaning, so old entries are not reused.
HASH_VERSION = 1
FLAT_WINDOW = 0.2
FLAT_TOLERANCE = 0.01
# The demo's shorter-trained base (docs/compression.md): the recipe's schedule cut to 250 steps (1 M tokens, about
# 4 minutes on 2 CPU ranks), evaluated every 50 so that its curve has points for the flatness check.
DEMO_OVERRIDES = ("trainer.max_steps=250", "trainer.eval_every=50")
# trainer keys that set what is trained on and how long; the rest (evaluation, saving, logging, threads,
# resume) change what is measured or written, never the weights
TRAINER_WEIGHT_KEYS = ("max_steps", "micro_batch_size", "grad_accum_steps", "seed")

Log = Callable[[str], None]


@dataclass
class BaseModel:
    """A cached base model: ``path`` the Hugging Face directory, ``key`` its config hash, ``meta`` its
    ``base_model.json``."""

    path: Path
    key: str
    meta: dict[str, Any]

    @property
    def init_from(self) -> str:
        """The override that starts a run from this model."""
        return f"model.init_from=hf:{self.path}"


class BaseModelError(RuntimeError):
    """A build that failed: the message names the problem (the launcher's config error, or its exit status) and
    the log kept beside the cache."""


# ---------------------------------------------------------------------------------------------- config and key
def compose_pretrain(overrides: list[str], ranks: int) -> TrainConfig:
    """The resolved config ``launch/train.py +recipe=pretrain <overrides>`` trains with on ``ranks`` ranks
    (Hydra's compose API over recipes/; the same checks as the entry). Raises ConfigError or Hydra's error."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moetrain.config import register_configs

    bad = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/", "recipe="))]
    if bad:
        raise ConfigError(f"override {bad[0]} is set by the base-model builder; allowed: model, moe, data... keys")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        composed = compose(config_name="train", overrides=[f"+recipe={RECIPE}", *overrides])
    import torch

    return resolve_config(composed, world_size=ranks, cuda=torch.cuda.is_available())


def corpus_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What the data source holds, cheaply: the names and sizes of its local files (the stdlib corpus differs
    between Python versions), or the hub dataset's name. A changed corpus is a different model."""
    d = cfg.data
    if d.hf_name:
        return {"hf_name": d.hf_name, "hf_config": d.hf_config}
    files = [Path(f) for f in (local_files(d.path) if d.path else stdlib_files(d.stdlib_glob))]
    listing = "\n".join(f"{f.name}\t{f.stat().st_size}" for f in files)
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "sha256": _sha256(listing)}


def hashed_config(cfg: TrainConfig, ranks: int) -> dict[str, Any]:
    """The part of the config the weights are a function of, which the key hashes:

    - ``model``, ``moe``, ``optim``, ``parallel`` and ``schedule`` whole (``moe.backend`` and ``expert_impl``
      change the arithmetic, so they count too);
    - ``data`` without ``cache_dir``, plus the corpus fingerprint (:func:`corpus_fingerprint`);
    - ``trainer.max_steps``, ``micro_batch_size``, ``grad_accum_steps`` and ``seed`` (the data order is a function
      of the seed and the global batch);
    - ``ranks``: the data-parallel world size sets the global batch and which sequences each rank reads;
    - ``prune``, ``lora`` and ``distill`` only when a stage prunes or trains adapters or distillation is on
      (otherwise they are inert, and their many keys would re-key the base model for nothing);
    - ``HASH_VERSION``.

    Left out: ``logging`` (W&B, progress bar, baseline run), evaluation and checkpoint cadence
    (``eval_every``, ``eval_batches``, ``save_every``, ``keep_checkpoints``, ``log_every``,
    ``expert_stats_every``), ``num_threads`` and ``resume``: they change what is measured or written, not the
    weights. A key a newer schema adds to a hashed section changes every key: that rebuilds, never reuses a
    stale model.
    """
    c = plain(cfg)
    out: dict[str, Any] = {"version": HASH_VERSION, "ranks": ranks}
    for section in ("model", "moe", "optim", "parallel", "schedule"):
        out[section] = c[section]
    out["data"] = {k: v for k, v in c["data"].items() if k != "cache_dir"}
    out["corpus"] = corpus_fingerprint(cfg)
    out["trainer"] = {k: c["trainer"][k] for k in TRAINER_WEIGHT_KEYS}
    if any(s.prune or s.lora for s in cfg.schedule.stages) or cfg.distill.enabled:
        for section in ("prune", "lora", "distill"):
            out[section] = c[section]
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_key(cfg: TrainConfig, ranks: int) -> str:
    """12 hex digits of the SHA-256 of :func:`hashed_config` as canonical JSON (sorted keys)."""
    return _sha256(json.dumps(hashed_config(cfg, ranks), sort_keys=True, separators=(",", ":")))[:12]


def cache_root_of(cfg: TrainConfig) -> Path:
    """The data pipeline's cache folder: ``data.cache_dir``, else ``$MOETRAIN_CACHE`` or ``~/.cache/moetrain``."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


# ---------------------------------------------------------------------------------------------- flatness
def val_curve(metrics_jsonl: Path) -> list[tuple[int, float]]:
    """``(step, val/loss)`` of every evaluation in a run's ``metrics.jsonl``, by step."""
    by_step: dict[int, float] = {}
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if "val/loss" in row:
            by_step[int(row["step"])] = float(row["val/loss"])
    return sorted(by_step.items())


def check_flatness(
    curve: list[tuple[int, float]], max_steps: int, window: float = FLAT_WINDOW, tolerance: float = FLAT_TOLERANCE
) -> dict[str, Any]:
    """Whether the validation loss has flattened: ``rel = (L(s0) - L(N)) / L(s0) < tolerance``, where ``L(N)`` is
    the loss at the final step ``N = max_steps``, ``s0 = N - window * N`` and ``L(s0)`` the loss at the last
    evaluation at or before ``s0``. A run without an evaluation at N or at or before ``s0`` cannot pass
    (``reason`` says which). Returns the numbers and ``passed``."""
    s0 = max_steps - window * max_steps
    result: dict[str, Any] = {
        "criterion": f"(L(s0) - L(N)) / L(s0) < {tolerance} with s0 = {1 - window:g} N",
        "window": window,
        "tolerance": tolerance,
        "max_steps": max_steps,
    }
    before = [(s, v) for s, v in curve if s <= s0]
    end = [(s, v) for s, v in curve if s == max_steps]
    if not before or not end:
        missing = f"no evaluation at or before step {s0:g}" if not before else f"no evaluation at step {max_steps}"
        return {**result, "passed": False, "reason": missing}
    (start_step, start_loss), (_, end_loss) = before[-1], end[0]
    rel = (start_loss - end_loss) / start_loss
    return {
        **result,
        "start_step": start_step,
        "start_loss": start_loss,
        "end_step": max_steps,
        "end_loss": end_loss,
        "rel_improvement": rel,
        "passed": rel < tolerance,
    }


def flatness_line(check: dict[str, Any], flat_expected: bool = True) -> str:
    """The check as one line, loud when it fails where a flat curve is expected (a full-length base); a short
    base (the demo's) is expected to be still improving, and the line says so."""
    if "rel_improvement" not in check:
        return f"FLATNESS CHECK FAILED: {check['reason']} ({check['criterion']})"
    verdict = "passed" if check["passed"] else "FLATNESS CHECK FAILED: the validation loss has not flattened"
    if not check["passed"] and not flat_expected:
        verdict = "still improving, as a short-trained base does (not flat)"
    return (
        f"{verdict}: val loss {check['start_loss']:.4f} at step {check['start_step']} -> {check['end_loss']:.4f} at "
        f"step {check['end_step']}, {100 * check['rel_improvement']:.2f} % better over the last "
        f"{100 * check['window']:.0f} % (must be < {100 * check['tolerance']:g} %)"
    )


# ---------------------------------------------------------------------------------------------- build
def ensure_base_model(
    overrides: list[str],
    ranks: int = 2,
    cache_root: Path | None = None,
    log: Log = print,
    family: str = FAMILY,
    flat_expected: bool = True,
) -> BaseModel:
    """The cached base model of ``+recipe=pretrain <overrides>`` trained on ``ranks`` ranks, built first if
    missing: ``deepspeed --num_gpus <ranks> launch/train.py +recipe=pretrain <overrides>``, exported as
    ``family``, flatness checked (a failure is logged loudly and recorded, the model is still cached), moved
    into place atomically. Raises ConfigError for a bad override (before anything runs) and
    :class:`BaseModelError` when the build fails (no cache entry is left)."""
    if ranks < 1:
        raise ConfigError(f"ranks={ranks} is not a rank count; allowed: an integer >= 1")
    overrides = list(overrides)
    cfg = compose_pretrain(overrides, ranks)
    precheck_export(cfg, family)
    key = config_key(cfg, ranks)
    base = Path(cache_root).expanduser() if cache_root is not None else cache_root_of(cfg)
    entry = base / "base" / f"{family}-{key}"
    if (entry / "base_model.json").is_file():
        meta = json.loads((entry / "base_model.json").read_text())
        log(f"base model {entry.name}: cached ({meta['steps']} steps, val loss {meta['final_val_loss']:.4f})")
        return BaseModel(entry, key, meta)
    log(f"base model {entry.name}: not cached, building it ({cfg.trainer.max_steps} steps on {ranks} ranks)")
    built = _build(cfg, overrides, ranks, key, entry, family, log)
    log(flatness_line(built.meta["flatness"], flat_expected))
    return built


def precheck_export(cfg: TrainConfig, family: str) -> None:
    """Fail before training when ``family`` cannot express the model the recipe trains."""
    from moetrain.interop.hf.api import family_of

    spec = family_of(family)
    spec.to_hf(cfg.model, cfg.moe)
    if cfg.moe.bias_update_rate > 0 and spec.layout.router_bias is None:
        raise ConfigError(
            f"moe.bias_update_rate={cfg.moe.bias_update_rate} trains a router selection bias that {family} cannot "
            "express; allowed: 0, or a family with a router bias (deepseek_v3)"
        )


def launch_command(overrides: list[str], ranks: int, run_dir: Path, port: int) -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        str(deepspeed),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        str(ROOT / "launch" / "train.py"),
        f"+recipe={RECIPE}",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def _build(
    cfg: TrainConfig, overrides: list[str], ranks: int, key: str, entry: Path, family: str, log: Log
) -> BaseModel:
    from moetrain.interop.hf.from_run import export_run

    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    failed_log = entry.parent / f"{entry.name}.failed.log"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        run_dir = tmp / "run"
        _launch(overrides, ranks, run_dir, tmp / "launch.log", failed_log, log)
        export_run(run_dir, tmp, family=family)
        shutil.move(str(tmp / "launch.log"), run_dir / "launch.log")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        meta = build_metadata(cfg, overrides, ranks, key, family, run_dir, entry, time.monotonic() - t0)
        text = json.dumps(meta, indent=2) + "\n"
        (tmp / "base_model.json").write_text(text)
        meta = json.loads(text)  # what a later call reads back (tuples become lists)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process put the same key in place first: the same weights, keep theirs
            if not (entry / "base_model.json").is_file():
                raise
            meta = json.loads((entry / "base_model.json").read_text())
    finally:  # a failed build leaves nothing; after the rename nothing is left here
        shutil.rmtree(tmp, ignore_errors=True)
    failed_log.unlink(missing_ok=True)
    log(f"base model {entry.name}: built in {meta['build_seconds']:.0f} s, val loss {meta['final_val_loss']:.4f}")
    return BaseModel(entry, key, meta)


def _launch(overrides: list[str], ranks: int, run_dir: Path, log_file: Path, failed_log: Path, log: Log) -> None:
    """Run the launcher, its output to ``log_file`` (moetrain's own log lines also to ``log``); on failure keep
    the output as ``failed_log`` and raise naming the launcher's config error, or its exit status."""
    port = free_port()
    cmd = launch_command(overrides, ranks, run_dir, port)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    log("$ " + " ".join(cmd))
    lines: deque[str] = deque(maxlen=200)
    try:
        with log_file.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                lines.append(line.rstrip("\n"))
                if "[moetrain][" in line:
                    log(line.rstrip("\n"))
            rc = proc.wait()
    finally:
        for path in shm_buffer_paths("127.0.0.1", str(port)):  # a killed rank cannot release its buffer
            path.unlink(missing_ok=True)
    if rc != 0 or not (run_dir / "summary.json").is_file():
        shutil.copyfile(log_file, failed_log)
        errors = [ln.split("config error: ", 1)[1] for ln in lines if "config error: " in ln]
        why = errors[-1] if errors else f"the launcher exited with status {rc}"
        raise BaseModelError(f"base model build failed: {why} (launcher output: {failed_log})")


def build_metadata(
    cfg: TrainConfig,
    overrides: list[str],
    ranks: int,
    key: str,
    family: str,
    run_dir: Path,
    entry: Path,
    seconds: float,
) -> dict[str, Any]:
    """``base_model.json``: what was built from what, and how well it trained."""
    import torch

    summary = json.loads((run_dir / "summary.json").read_text())
    t = cfg.trainer
    tokens_per_step = ranks * t.micro_batch_size * t.grad_accum_steps * cfg.model.seq_len
    curve = val_curve(run_dir / "metrics.jsonl")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r and r["step"] > 10]
    flops = {f"top_k={k}": forward_flops_per_token(cfg.model, cfg.moe, top_k=k).as_dict() for k in (cfg.moe.top_k, 1)}
    return {
        "format": FORMAT,
        "key": key,
        "family": family,
        "path": str(entry),
        "init_from": f"model.init_from=hf:{entry}",
        "recipe": RECIPE,
        "overrides": overrides,
        "ranks": ranks,
        "steps": int(summary["step"]),
        "tokens_per_step": tokens_per_step,
        "pretraining_tokens": int(summary["step"]) * tokens_per_step,
        "final_val_loss": summary["val_loss"],
        "unigram_baseline": summary["unigram_baseline"],
        "params": summary["params"],
        "val_curve": curve,
        "flatness": check_flatness(curve, t.max_steps),
        "flops_per_token": flops,
        "median_train_tokens_per_s": statistics.median(speeds) if speeds else None,
        "run_dir": str(entry / "run"),
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "hashed_config": hashed_config(cfg, ranks),
        "config": plain(cfg),
    }
