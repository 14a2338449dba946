"""The workspace's paths, read from ``paths.yaml`` (the same file dvc.yaml reads through ``vars``)."""
from __future__ import annotations

import functools
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
    """The workspace's paths (``paths.yaml``, the file dvc.yaml reads too): parsed once per file version,
    however many stages and flows of a run ask."""
    root = Path(root).resolve()
    file = root / PATHS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: run mdpipe from the project root (or pass --root)")
    stat = file.stat()
    return Paths(root, _read_paths(str(file), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _read_paths(file: str, mtime_ns: int, size: int) -> dict:
    return yaml.safe_load(Path(file).read_text())["paths"]
