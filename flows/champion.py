"""The champion's lineage, and rollback: every challenger the gate scored is kept in the registry with the
record of where it came from, so any champion can be traced to its run, data, code and params, and an
earlier one can be put back.

Layout under ``registry/`` (outside the DVC graph; every write goes to a temporary folder, then a rename):

- ``champion/``         the model users rely on (weights, config, ``model.onnx`` exported from them,
                        ``champion.json`` = its lineage record)
- ``models/<id>/``      every challenger the gate scored: its files and ``lineage.json``, whose ``status``
                        is ``promoted`` or ``rejected`` (with the gate's reason)
- ``decisions/<id>.json`` one line of history per gate decision or rollback
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from mdcore.data.io import atomic_dir, atomic_write_json

LINEAGE = "lineage.json"
CHAMPION_RECORD = "champion.json"


class RegistryError(ValueError):
    """A champion id that does not exist, or a registry entry that cannot serve as champion."""


def new_id() -> str:
    """Sortable by time, unique even for two decisions in the same second."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1e6) % 1_000_000:06d}{uuid.uuid4().hex[:3]}"


def _copy_model(src: Path, dst: Path) -> None:
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in (LINEAGE, CHAMPION_RECORD):
            shutil.copyfile(f, dst / f.name)


def record_challenger(registry: Path, candidate: Path, record: dict, extra_json: dict | None = None) -> dict:
    """Keep the scored ``candidate`` folder under ``models/<id>/`` with ``record`` (its lineage and the gate's
    decision) and ``extra_json`` (file name -> object); if ``record['promote']``, it also becomes
    ``champion/``. Returns the record with its id."""
    record = dict(record)
    record.setdefault("id", new_id())
    record["status"] = "promoted" if record.get("promote") else "rejected"
    champ = registry / "champion"
    if champ.joinpath(CHAMPION_RECORD).is_file():
        record.setdefault("parent", json.loads(champ.joinpath(CHAMPION_RECORD).read_text()).get("id"))
    with atomic_dir(registry / "models" / record["id"]) as tmp:
        _copy_model(candidate, tmp)
        for name, obj in (extra_json or {}).items():
            atomic_write_json(tmp / name, obj)
        atomic_write_json(tmp / LINEAGE, record)
    if record["promote"]:
        _install(registry, registry / "models" / record["id"], record)
    atomic_write_json(registry / "decisions" / f"{record['id']}.json", record)
    return record


def _install(registry: Path, source: Path, record: dict) -> None:
    """``source`` becomes ``champion/`` in one rename, with its ONNX file (what deployments read)."""
    from flows.model_use import install_champion_onnx

    with atomic_dir(registry / "champion") as tmp:
        _copy_model(source, tmp)
        install_champion_onnx(tmp)
        atomic_write_json(tmp / CHAMPION_RECORD, record)


def list_models(registry: Path) -> list[dict]:
    """Every scored challenger, oldest first, with ``current`` marking the champion."""
    current = show(registry).get("id") if (registry / "champion" / CHAMPION_RECORD).is_file() else None
    out = []
    for f in sorted((registry / "models").glob(f"*/{LINEAGE}")):
        rec = json.loads(f.read_text())
        out.append(rec | {"current": rec.get("id") == current})
    return out


def show(registry: Path, model_id: str | None = None) -> dict:
    """The lineage record of ``model_id``, or of the current champion."""
    if model_id is None:
        f = registry / "champion" / CHAMPION_RECORD
        if not f.is_file():
            raise RegistryError(f"{registry / 'champion'}: there is no champion yet (run `mdpipe retrain`)")
        return json.loads(f.read_text())
    f = registry / "models" / model_id / LINEAGE
    if not f.is_file():
        known = [r["id"] for r in list_models(registry)]
        raise RegistryError(f"no model {model_id!r} in {registry / 'models'}; known: {known}")
    return json.loads(f.read_text())


def parts_steps_in_a_row(registry: Path) -> int:
    """How many champions in a row, back from the current one, were made by a warm start's parts step
    (a new domain added by its own parts: the shared backbone learned nothing from it)."""
    if not (registry / "champion" / CHAMPION_RECORD).is_file():
        return 0
    record, count, seen = show(registry), 0, set()
    while (record.get("trained_by") == "warm start" and (record.get("warm_start") or {}).get("mode") == "parts"
           and record.get("id") not in seen):
        count += 1
        seen.add(record.get("id"))
        parent = record.get("parent")
        if not parent or not (registry / "models" / parent / LINEAGE).is_file():
            break
        record = show(registry, parent)
    return count


def rollback(registry: Path, model_id: str, reason: str = "rollback") -> dict:
    """Make the earlier champion ``model_id`` the champion again (a rejected challenger never becomes one);
    the rollback is recorded in ``decisions/``."""
    rec = show(registry, model_id)
    if rec.get("status") != "promoted":
        raise RegistryError(f"model {model_id} was {rec.get('status')} ({rec.get('reason')}): only a model that "
                            f"was champion can be rolled back to")
    previous = show(registry).get("id") if (registry / "champion" / CHAMPION_RECORD).is_file() else None
    installed = rec | {"rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rolled_back_from": previous}
    _install(registry, registry / "models" / model_id, installed)
    atomic_write_json(registry / "decisions" / f"{new_id()}.json",
                      {"action": "rollback", "to": model_id, "from": previous, "reason": reason})
    return installed


def format_list(records: list[dict]) -> str:
    lines = [f"{'':2}{'id':<27} {'status':<9} {'dataset':<17} {'code':<13} {'gate mean':>9}  reason"]
    for r in records:
        gate = r.get("candidate") or {}
        mean = sum(gate.values()) / len(gate) if gate else float("nan")
        lines.append(f"{'*' if r['current'] else ' ':2}{r['id']:<27} {r['status']:<9} "
                     f"{str(r.get('dataset_version'))[:16]:<17} {str(r.get('code_version'))[:12]:<13} "
                     f"{mean:>9.3f}  {r.get('reason', '')}")
    return "\n".join(lines)
