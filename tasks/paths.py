"""The workspace's paths, read from ``paths.yaml`` (the same file dvc.yaml reads through ``vars``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

PATHS_FILE = "paths.yaml"


@dataclass(frozen=True)
class Paths:
    root: Path
    entries: dict

    def __getattr__(self, name: str) -> Path:
        try:
            return self.root / self.entries[name]
        except KeyError:
            raise AttributeError(f"{PATHS_FILE} has no path {name!r}; known: {sorted(self.entries)}") from None

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def params_file(self, stage: str) -> Path:
        return self.root / "params" / f"{stage}.yaml"


def load_paths(root: str | Path = ".") -> Paths:
    root = Path(root).resolve()
    file = root / PATHS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: run mdpipe from the project root (or pass --root)")
    return Paths(root, yaml.safe_load(file.read_text())["paths"])
