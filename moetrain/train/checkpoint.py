"""Checkpoints in DeepSpeed's layout, committed atomically, with the loop state needed for exact resume.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed's files (model states, optimizer shards, one file per expert for
                              DeepSpeed MoE layers) + client state (step, data position, config)
    step_00000100/rank_state_00001.pt   per-rank RNG state
    step_00000100/files.json  every file of the checkpoint and its size, written once all ranks are done
    latest                    the tag of the newest *complete* checkpoint

``latest`` is written (temp file + rename) only after every rank has finished writing, so a crash during a
save leaves the previous checkpoint as the one resume picks. Per-rank files are loaded with
``weights_only=True``.

Before anything loads a checkpoint, :func:`check_checkpoint` checks it cheaply and names the file at fault
in one line (a :class:`ConfigError` on ``trainer.resume``): files missing against ``files.json`` (an
incomplete copy), another size (truncated), an archive, header or JSON that does not parse (corrupt). It
unpickles nothing: torch files are checked as zip archives whose pickle matches its CRC.
:func:`check_same_structure` compares the architecture the checkpoint was saved with to the run's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import zipfile
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ConfigError, error_line, plain
from moetrain.runtime.distributed import LaunchEnv, barrier

TAG_RE = re.compile(r"^step_(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's weights + client state (model-parallel size 1)
MANIFEST = "files.json"
RUN_CONFIG = "run_config.json"  # the client state's run config as JSON: read at the entry without unpickling
RESUME_ALLOWED = (
    "allowed: none, auto, a run folder, its checkpoints/ folder or one complete step_* folder (written by moetrain)"
)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fault_point(name: str, step: int) -> None:
    """Crash-test hook: ``MOETRAIN_FAULT=kill-during-save:<step>`` SIGKILLs rank 0 at this point of that
    step's save (all files written, checkpoint not yet committed). Used by the tests that prove a crash
    during a checkpoint write leaves the previous checkpoint as the one ``trainer.resume=auto`` picks."""
    if fault_requested(name, step) and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_requested(name: str, arg: int) -> bool:
    """Crash and damage tests: ``MOETRAIN_FAULT=<name>:<arg>`` asks for the fault ``name`` at ``arg``."""
    return os.environ.get("MOETRAIN_FAULT") == f"{name}:{arg}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(resume: str, default_root: Path) -> tuple[Path, str] | None:
    """``trainer.resume`` -> (checkpoint root, tag) or None to start fresh.

    ``none``: fresh. ``auto``: the latest complete checkpoint under this run's folder, fresh if there is
    none. A path: a checkpoint root holding ``latest``, a run folder holding ``checkpoints/latest``, or one
    ``step_*`` folder.
    """
    if resume == "none":
        return None
    if resume == "auto":
        latest = default_root / "latest"
        return _latest(default_root, resume) if latest.is_file() else None
    path = Path(resume).expanduser()
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return _latest(root, resume)
    if path.is_dir() and TAG_RE.match(path.name):
        return path.parent, path.name
    problem = (
        "does not exist"
        if not path.exists()
        else "is not a checkpoint folder (no latest or checkpoints/latest in it, and not named step_*)"
    )
    raise ConfigError(f"trainer.resume={resume} {problem}; {RESUME_ALLOWED}")


def _latest(root: Path, resume: str) -> tuple[Path, str]:
    """(root, the tag ``root/latest`` names), which must be a step_* folder of ``root``."""
    tag = (root / "latest").read_text(errors="replace").strip()
    if not TAG_RE.match(tag) or not (root / tag).is_dir():
        raise ConfigError(
            f"trainer.resume={resume}: {root / 'latest'} names {tag[:40]!r}, which is not a step_* folder "
            f"beside it; {RESUME_ALLOWED}"
        )
    return root, tag


# ---------------------------------------------------------------------------------------------- checks
def _torch_file_problem(f: Path) -> str | None:
    """Why ``f`` is no torch.save archive (None: it is one), found without unpickling it: its zip directory
    reads and its pickle matches its CRC (reading the pickle alone is cheap; the tensors are not read)."""
    try:
        with zipfile.ZipFile(f) as z:
            pickles = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pickles:
                return "a zip archive without data.pkl"
            z.read(pickles[0])
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, RuntimeError) as e:
        return f"not a readable torch file: {error_line(e)}"
    return None


def _safetensors_problem(f: Path) -> str | None:
    """Why ``f`` is no safetensors file (None: it is one): its header parses and its tensors fit the file."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 100 << 20:
                return f"not a safetensors file (header length {n})"
            header = json.loads(fh.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"not a readable safetensors file: {error_line(e)}"
    size = f.stat().st_size
    return f"truncated: {size} of {8 + n + end} bytes" if size < 8 + n + end else None


def _json_problem(f: Path) -> str | None:
    try:
        value = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"not readable JSON: {error_line(e)}"
    return None if isinstance(value, dict) else f"JSON {type(value).__name__}, not an object"


def file_problem(f: Path) -> str | None:
    """Why the checkpoint-like file ``f`` (torch, safetensors or JSON, by suffix) cannot be read; None: it can
    (or its type is not one of these). Cheap: headers and pickles only, never the tensors."""
    check = {".pt": _torch_file_problem, ".safetensors": _safetensors_problem, ".json": _json_problem}
    return check[f.suffix](f) if f.suffix in check else None


def check_checkpoint(folder: Path) -> None:
    """``folder`` (a step_* checkpoint) is complete and readable, else ConfigError naming the file: every file
    of its manifest is there with its size, and no torch, safetensors or JSON file in it is corrupt.
    Checkpoints written before the manifest need what every checkpoint has: DeepSpeed's model states and
    one RNG file per rank of the world size in layout.json."""
    kv = f"trainer.resume={folder}"
    if not folder.is_dir():
        raise ConfigError(f"{kv} does not exist; {RESUME_ALLOWED}")
    manifest = folder / MANIFEST
    if manifest.is_file():
        problem = _json_problem(manifest)
        expected = json.loads(manifest.read_text()) if problem is None else {}
        if problem or not all(isinstance(v, int) for v in expected.values()):
            raise ConfigError(
                f"{kv} has a corrupt {MANIFEST} ({problem or 'sizes are not integers'}); {RESUME_ALLOWED}"
            )
    else:
        world_size = (_read_json(folder / "layout.json") or {}).get("world_size")
        world_size = world_size if isinstance(world_size, int) and world_size > 0 else 1
        expected = {MODEL_STATES: None, **{f"rank_state_{r:05d}.pt": None for r in range(world_size)}}
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"{kv} is incomplete: {len(missing)} of its {len(expected)} files are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {RESUME_ALLOWED}"
        )
    for name, size in expected.items():
        if size is not None and (folder / name).stat().st_size != size:
            raise ConfigError(
                f"{kv} has {name} of {(folder / name).stat().st_size} bytes, saved with {size} "
                f"(truncated or overwritten); {RESUME_ALLOWED}"
            )
    for f in sorted(folder.rglob("*")):
        problem = file_problem(f) if f.is_file() else None
        if problem:
            raise ConfigError(f"{kv} has a corrupt {f.relative_to(folder)} ({problem}); {RESUME_ALLOWED}")


def saved_config(folder: Path) -> dict[str, Any] | None:
    """The run config a checkpoint was saved with: its run_config.json, or for a checkpoint written before
    that file, the client state in DeepSpeed's model states read with the safe loader (``weights_only=True``;
    ``mmap``: the tensors are mapped, not read). None when there is none, or when the file holds objects the
    safe loader refuses (then nothing here unpickles it)."""
    if (folder / RUN_CONFIG).is_file():
        return _read_json(folder / RUN_CONFIG)
    try:
        state = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, RuntimeError) as e:
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            return None  # objects beyond tensors and plain containers: not inspected, and not unpickled here
        raise ConfigError(
            f"trainer.resume={folder} has a corrupt {MODEL_STATES} ({error_line(e)}); {RESUME_ALLOWED}"
        ) from e
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


# the keys that fix the shapes of the model's parameters: a checkpoint loads only into the same values
# (moe.expert_ids, LoRA adapters and a teacher come from structure.json and are rebuilt before the load)
MODEL_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "moe_every",
                    "tie_embeddings", "head_dim", "dense_d_ff", "first_dense_layers", "dense_layers", "shared_d_ff",
                    "shared_expert_gate", "attention", "qkv_bias", "out_bias", "qk_norm")  # fmt: skip


def check_same_structure(folder: Path, saved: dict[str, Any], model: dict[str, Any], moe: dict[str, Any]) -> None:
    """The run's architecture (``model`` / ``moe`` as dicts) is the one ``saved`` (the checkpoint's config)
    has, else ConfigError naming the first key that differs. Keys an older config lacks are not compared."""
    was_model, was_moe = saved.get("model") or {}, saved.get("moe") or {}
    pairs = [(f"model.{k}", was_model.get(k, model[k]), model[k]) for k in MODEL_SHAPE_KEYS]
    if model["attention"] == "mla":
        was_mla = was_model.get("mla") or {}
        pairs += [(f"model.mla.{k}", was_mla.get(k, v), v) for k, v in model["mla"].items()]
    pairs.append(("moe.num_experts", was_moe.get("num_experts", moe["num_experts"]), moe["num_experts"]))
    for key, was, now in pairs:
        if was != now:
            raise ConfigError(
                f"trainer.resume={folder} was saved with {key}={was} and this run has {key}={now}; "
                f"allowed: {key}={was} (the checkpoint's model), or another trainer.resume"
            )


def check_weights_portable(folder: Path, saved: dict[str, Any], backend: str, ep_size: int) -> None:
    """Weights load across layouts except across backends, or across expert-parallel sizes with the native
    backend (its expert shards are not re-split)."""
    if saved.get("backend", backend) != backend:
        raise ConfigError(
            f"trainer.resume={folder} was written with moe.backend={saved['backend']} and this run has "
            f"moe.backend={backend}; allowed: moe.backend={saved['backend']}"
        )
    if backend == "native" and saved.get("ep_size", ep_size) != ep_size:
        raise ConfigError(
            f"trainer.resume={folder} has parallel.ep_size={saved['ep_size']} expert shards; moe.backend=native "
            f"resumes only with parallel.ep_size={saved['ep_size']} and this run has parallel.ep_size={ep_size}; "
            f"allowed: parallel.ep_size={saved['ep_size']} (moe.backend=deepspeed stores one file per expert and "
            "loads at any ep_size)"
        )


def _read_json(f: Path) -> dict[str, Any] | None:
    """A checkpoint's JSON file as a dict (None when absent); ConfigError naming it when it does not parse."""
    if not f.is_file():
        return None
    problem = _json_problem(f)
    if problem:
        raise ConfigError(f"trainer.resume={f.parent} has a corrupt {f.name} ({problem}); {RESUME_ALLOWED}")
    return json.loads(f.read_text())


class CheckpointManager:
    def __init__(
        self, root: Path, env: LaunchEnv, keep: int, layout: dict[str, Any], extra_state=(), structure=None
    ) -> None:
        """``layout``: what decides whether optimizer state can be restored (backend, ep_size, zero_stage,
        world size); saved as ``layout.json`` beside each checkpoint. ``extra_state``: components with
        ``save(dir)`` / ``load(dir)`` for state DeepSpeed does not keep per rank (native expert-parallel shards,
        a distillation teacher); they run after DeepSpeed's own save/load. ``structure``: the model's shape
        beyond the config (pruned experts, adapters), saved as ``structure.json``: a resume rebuilds it first."""
        self.root = root
        self.env = env
        self.keep = keep
        self.layout = layout
        self.extra_state = [c for c in extra_state if c is not None]
        self.structure = structure or {}

    def save(self, engine, step: int, client_state: dict[str, Any], tag: str | None = None) -> Path:
        """Write a checkpoint. With the default ``step_*`` tag it becomes ``latest`` once every rank is done;
        a named ``tag`` (a rollback snapshot) is written the same way but never becomes ``latest``."""
        commit = tag is None
        tag = tag or tag_for(step)
        client_state = plain(client_state)  # choices (str Enums) as strings: weights_only loads it
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        rank_file = self.root / tag / f"rank_state_{self.env.rank:05d}.pt"
        tmp = rank_file.with_name(rank_file.name + ".tmp")
        torch.save({"rng": rng_state()}, tmp)
        os.replace(tmp, rank_file)
        for component in self.extra_state:
            component.save(self.root / tag)
        fault_point("kill-during-save", step)
        if self.env.is_main:
            atomic_write_text(self.root / tag / "layout.json", json.dumps(self.layout, sort_keys=True))
            atomic_write_text(self.root / tag / "structure.json", json.dumps(self.structure, sort_keys=True))
            if isinstance(client_state.get("config"), dict):  # str-valued choices serialise as their values
                config = json.dumps(client_state["config"], sort_keys=True, default=str)
                atomic_write_text(self.root / tag / RUN_CONFIG, config)
        barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.env.is_main:
            self._write_manifest(self.root / tag)
            if commit:
                atomic_write_text(self.root / "latest", tag)
                self._prune(keep_tag=tag)
        barrier()
        return self.root / tag

    @staticmethod
    def _write_manifest(folder: Path) -> None:
        """files.json: every file of the checkpoint (all ranks') and its size, so a resume tells a complete copy
        from one that lost or cut a file. Leftover temp files of an earlier crashed save are not part of it."""
        files = {
            str(f.relative_to(folder)): f.stat().st_size
            for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MANIFEST and not f.name.startswith(".") and ".tmp" not in f.name
        }
        atomic_write_text(folder / MANIFEST, json.dumps(files, indent=1, sort_keys=True))

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest ``keep`` committed checkpoints up to ``keep_tag``. Folders after it (left by a crash
        mid-save, before a resume from an earlier checkpoint) are neither counted nor deleted."""
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and p.name <= keep_tag)
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, engine, root: Path, tag: str) -> tuple[dict[str, Any], bool]:
        """Restore model, optimizer and LR schedule (DeepSpeed) and this rank's RNG.

        Returns (client state, whether optimizer state was restored). When the checkpoint was written with
        another world size, ``parallel.ep_size``, ZeRO stage or backend, only the weights are loaded (where
        the layout allows it) and the optimizer starts afresh: DeepSpeed does not reshard optimizer state.

        A step_* checkpoint (what ``trainer.resume`` picks) is checked first (:func:`check_checkpoint`), and
        whatever the libraries still raise while loading it (a size mismatch, a damaged tensor) becomes one
        ConfigError line naming ``trainer.resume`` and the folder. A rollback snapshot is this run's own
        file: its failures stay what they are.
        """
        if not TAG_RE.match(tag):
            return self._load(engine, root, tag)
        check_checkpoint(root / tag)
        try:
            return self._load(engine, root, tag)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - named in one line at the entry point, not as a traceback
            raise ConfigError(
                f"trainer.resume={root / tag} cannot be loaded into this run ({error_line(e)}); "
                "allowed: a checkpoint of this model (same architecture and backend), or trainer.resume=none"
            ) from e

    def _load(self, engine, root: Path, tag: str) -> tuple[dict[str, Any], bool]:
        saved = self.saved_layout(root / tag)
        same = saved is None or saved == self.layout
        if not same:
            self._check_weights_portable(saved, root / tag)
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=same, load_lr_scheduler_states=same, load_module_only=not same
        )
        if path is None:
            raise ConfigError(f"trainer.resume={root / tag}: DeepSpeed found no checkpoint in it; {RESUME_ALLOWED}")
        for component in self.extra_state:
            component.load(root / tag)
        rank_file = root / tag / f"rank_state_{self.env.rank:05d}.pt"
        if same and rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        return client_state or {}, same

    def _check_weights_portable(self, saved: dict[str, Any], folder: Path | None = None) -> None:
        check_weights_portable(folder or self.root, saved, self.layout["backend"], self.layout["ep_size"])

    @staticmethod
    def saved_layout(directory: Path) -> dict[str, Any] | None:
        return _read_json(directory / "layout.json")

    @staticmethod
    def saved_structure(directory: Path) -> dict[str, Any]:
        return _read_json(directory / "structure.json") or {}
