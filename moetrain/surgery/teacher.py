"""The distillation teacher's weights as a checkpoint component (per rank, safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


class TeacherState:
    """Checkpoint component: this rank's teacher weights (its expert shard under expert parallelism)."""

    def __init__(self, teacher: nn.Module, rank: int) -> None:
        self.teacher = teacher
        self.rank = rank

    def filename(self) -> str:
        return f"teacher_rank{self.rank:05d}.safetensors"

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_model

        path = directory / self.filename()
        tmp = path.with_name(path.name + ".tmp")
        save_model(self.teacher, str(tmp))  # tied weights (embedding = LM head) are stored once
        os.replace(tmp, path)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_model

        path = directory / self.filename()
        if not path.is_file():  # structure.json says this checkpoint has a teacher: its weights must be there
            raise FileNotFoundError(f"trainer.resume: {path} is missing (the distillation teacher of this rank)")
        load_model(self.teacher, str(path))
