"""Image-check throughput: a 70,000-image tree (32x32 PNGs: the built-in digits copied with a distinct
PNG text chunk each, so every file is unique content with the same pixels), then

1. ingest's manifest build (scan + hash + decode of every file, ``mdcore.data.manifest.build_manifest``),
2. the validate stage's image checks (read + hash + full decode + pixel mean/std of every file,
   ``mdcore.data.imagecheck.check_images``),
3. the whole validate stage (image checks + Great Expectations suite + Data Docs + drift profile).

    python -m bench.bench_validate [--images 70000] [--workers 0] [--keep DIR] [--no-stage]

Prints images/s for each part and writes bench/results/validate.json. Tree generation is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def png_text_chunk(text: str) -> bytes:
    body = b"tEXt" + b"copy\x00" + text.encode()
    return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


def make_tree(dest: Path, n_images: int, seed: int = 0) -> int:
    """``dest/<domain>/<class>/*.png``: ``n_images`` unique files made from the built-in digits."""
    from mdcore.data.builtin import materialize

    source = dest.parent / f".{dest.name}-source"
    shutil.rmtree(source, ignore_errors=True)
    materialize(source, seed=seed)
    originals = sorted(source.rglob("*.png"))
    blobs = [(p.relative_to(source), p.read_bytes()) for p in originals]
    for rel, _ in blobs:
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        rel, data = blobs[i % len(blobs)]
        copy = i // len(blobs)
        # a text chunk before IEND: new bytes (a new hash), the same pixels, still a complete PNG
        out = data[:-12] + png_text_chunk(f"{copy}") + data[-12:]
        (dest / rel.parent / f"{rel.stem}_{copy:03d}.png").write_bytes(out)
    shutil.rmtree(source, ignore_errors=True)
    return n_images


def workspace_for(tree: Path, where: Path) -> Path:
    """A minimal workspace whose ``data/raw`` is the tree (paths.yaml + params/), for the whole stage."""
    ws = where / "ws"
    (ws / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "paths.yaml", ws / "paths.yaml")
    shutil.copytree(REPO / "params", ws / "params")
    os.symlink(tree, ws / "data" / "raw")  # the stage reads files through the manifest's paths only
    return ws


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=70_000)
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = every core this process may use)")
    parser.add_argument("--keep", type=Path, help="make (or reuse) the tree here instead of a temporary folder")
    parser.add_argument("--no-stage", action="store_true", help="skip timing the whole validate stage")
    args = parser.parse_args(argv)

    from mdcore.data.imagecheck import check_images
    from mdcore.data.manifest import build_manifest, manifest_csv
    from mdcore.data.pool import resolve_workers

    tmp = Path(tempfile.mkdtemp(prefix="mdpipe-bench-validate-"))
    try:
        tree = args.keep or tmp / "tree"
        if not (tree.is_dir() and sum(1 for _ in tree.rglob("*.png")) == args.images):
            shutil.rmtree(tree, ignore_errors=True)
            t0 = time.perf_counter()
            make_tree(tree, args.images)
            print(f"made {args.images} images in {time.perf_counter() - t0:.1f} s (not timed)")
        workers = resolve_workers(args.workers)
        # warm the process pool's fork server (a one-off per process) and the page cache alike
        check_images(tree, [p.relative_to(tree).as_posix() for p in sorted(tree.rglob("*.png"))[:64]],
                     workers=workers, min_parallel=0)

        t0 = time.perf_counter()
        frame = build_manifest(tree, holdout_domains=["lowlight"], workers=workers)
        t_manifest = time.perf_counter() - t0

        t0 = time.perf_counter()
        checks = check_images(tree, frame["path"], workers=workers)
        t_checks = time.perf_counter() - t0
        assert len(checks) == len(frame) == args.images and checks["decoded"].all()
        assert (checks["file_sha256"].values == frame["sha256"].values).all()

        result = {
            "images": args.images,
            "workers": workers,
            "cpu_count": os.cpu_count(),
            "load_avg_1min_before": round(os.getloadavg()[0], 2),
            "manifest_build_s": round(t_manifest, 2),
            "manifest_build_img_s": round(args.images / t_manifest),
            "image_checks_s": round(t_checks, 2),
            "image_checks_img_s": round(args.images / t_checks),
            "manifest_plus_checks_img_s": round(args.images / (t_manifest + t_checks)),
        }
        if not args.no_stage:
            from tasks.params import ValidateParams
            from tasks.paths import load_paths
            from tasks.validate import run as validate

            ws = workspace_for(tree, tmp)
            paths = load_paths(ws)
            paths.manifest.write_text(manifest_csv(frame))
            params = ValidateParams(workers=workers, update_profile=False)
            t0 = time.perf_counter()
            import great_expectations  # noqa: F401 -- a fixed cost of every run, timed on its own

            result["ge_import_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            out = validate(params, paths)
            t_stage = time.perf_counter() - t0
            result.update({
                "validate_stage_s": round(t_stage, 2),
                "validate_stage_img_s": round(args.images / t_stage),
                "validate_stage_image_checks_s": out.metrics["timings_s"]["image_checks"],
                "validate_stage_suite_s": out.metrics["timings_s"]["suite"],
                "validate_rows": out.metrics["rows"],
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("| part | seconds | images/s |\n|---|---:|---:|")
    print(f"| ingest manifest build (scan, hash, decode) | {result['manifest_build_s']} | {result['manifest_build_img_s']} |")
    print(f"| validate image checks (hash, decode, pixel stats) | {result['image_checks_s']} | {result['image_checks_img_s']} |")
    print(f"| both | {round(result['manifest_build_s'] + result['image_checks_s'], 2)} | {result['manifest_plus_checks_img_s']} |")
    if "validate_stage_s" in result:
        print(f"| whole validate stage (checks + GE suite + Data Docs; GE imported before) | {result['validate_stage_s']} | {result['validate_stage_img_s']} |")
        print(f"(inside the stage: image checks {result['validate_stage_image_checks_s']} s, suite + reports "
              f"{result['validate_stage_suite_s']} s; importing great_expectations took {result['ge_import_s']} s)")
    print(f"workers={workers}, os.cpu_count()={os.cpu_count()}, 1-min load before: {result['load_avg_1min_before']}")
    out_file = REPO / "bench" / "results" / "validate.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
