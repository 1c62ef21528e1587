"""Checkpoints in DeepSpeed's layout, committed atomically, with the loop state needed for exact resume.

Layout under ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed's files (model states, optimizer shards, one file per expert for
                              DeepSpeed MoE layers) + client state (step, data position, config)
    step_00000100/rank_state_00001.pt   per-rank RNG state
    latest                    the tag of the newest *complete* checkpoint

``latest`` is written (temp file + rename) only after every rank has finished writing, so a crash during a
save leaves the previous checkpoint as the one resume picks. Per-rank files are loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from moetrain.runtime.distributed import LaunchEnv, barrier

TAG_RE = re.compile(r"^step_(\d{8})$")


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
        root = default_root
        latest = root / "latest"
        return (root, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume).expanduser()
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return root, (root / "latest").read_text().strip()
    if path.is_dir() and TAG_RE.match(path.name):
        return path.parent, path.name
    raise FileNotFoundError(f"trainer.resume={resume} is not a checkpoint folder (no 'latest' file or step_* dir)")


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
        barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.env.is_main and commit:
            atomic_write_text(self.root / "latest", tag)
            self._prune(keep_tag=tag)
        barrier()
        return self.root / tag

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
        """
        saved = self.saved_layout(root / tag)
        same = saved is None or saved == self.layout
        if not same:
            self._check_weights_portable(saved)
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=same, load_lr_scheduler_states=same, load_module_only=not same
        )
        if path is None:
            raise FileNotFoundError(f"trainer.resume: DeepSpeed found no checkpoint {tag} under {root}")
        for component in self.extra_state:
            component.load(root / tag)
        rank_file = root / tag / f"rank_state_{self.env.rank:05d}.pt"
        if same and rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        return client_state or {}, same

    @staticmethod
    def saved_layout(directory: Path) -> dict[str, Any] | None:
        f = directory / "layout.json"
        return json.loads(f.read_text()) if f.is_file() else None

    @staticmethod
    def saved_structure(directory: Path) -> dict[str, Any]:
        f = directory / "structure.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def _check_weights_portable(self, saved: dict[str, Any]) -> None:
        if saved["backend"] != self.layout["backend"]:
            raise ValueError(
                f"trainer.resume: the checkpoint was written with moe.backend={saved['backend']}; "
                f"resume with moe.backend={saved['backend']}"
            )
        if saved["backend"] == "native" and saved["ep_size"] != self.layout["ep_size"]:
            raise ValueError(
                f"trainer.resume: the checkpoint has parallel.ep_size={saved['ep_size']} expert shards; "
                f"moe.backend=native resumes only with parallel.ep_size={saved['ep_size']} "
                "(moe.backend=deepspeed stores one file per expert and loads at any ep_size)"
            )
