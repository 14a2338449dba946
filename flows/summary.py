"""The table printed at the end of ``mdpipe run``: accuracy per domain, model sizes, stage times, artifacts."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mdcore.data.io import dir_size_bytes


def print_summary(report: dict, paths, wall_s: float, console: Console | None = None) -> None:
    console = console or Console()
    st = report["stages"]
    ev, comp = st["evaluate"]["metrics"], st["compress"]["metrics"]

    acc = Table(title="Accuracy per domain (seen: test split; held-out: every image)")
    for col in ("domain", "kind", "images", "accuracy", "unknown-domain routing", "compressed"):
        acc.add_column(col, justify="left" if col in ("domain", "kind") else "right")
    for d, row in ev["per_domain"].items():
        acc.add_row(d, row["kind"], str(row["images"]), f"{row['acc']:.3f}", f"{row['acc_unknown_domain']:.3f}",
                    f"{comp['per_domain'][d]['acc']:.3f}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    acc.add_row("mean seen", "", "", fmt(ev["mean_seen_acc"]), "", fmt(comp["mean_seen_acc"]), style="bold")
    acc.add_row("mean held-out", "", "", fmt(ev["mean_heldout_acc"]), "", fmt(comp["mean_heldout_acc"]), style="bold")
    console.print(acc)

    sizes = Table(title="Models")
    for col in ("model", "path", "size"):
        sizes.add_column(col)
    for name, path in (("pretrained backbone", paths.pretrained), ("fine-tuned", paths.finetuned),
                       (f"compressed (shipped: {comp.get('shipped', '?')}, ONNX)", paths.compressed / "model.onnx")):
        sizes.add_row(name, str(path.relative_to(paths.root)), f"{dir_size_bytes(path) / 1e6:.2f} MB")
    console.print(sizes)

    times = Table(title=f"Stages (total wall time {wall_s:.0f} s)")
    for col in ("stage", "status", "wall s", "outputs"):
        times.add_column(col)
    for name, s in st.items():
        outs = ", ".join(s["metrics"].get("outputs", {}).values())
        times.add_row(name, "ran" if s["ran"] else "up to date", f"{s['wall_s']:.1f}", outs)
    console.print(times)
    console.print(f"dataset version {report.get('dataset_version')}, code {report.get('code_version')}; "
                  f"run record: {report.get('run_record')}; metrics: reports/metrics/; plots: reports/evaluate/")
