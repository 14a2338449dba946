"""``mdpipe``: run the whole pipeline (a Prefect flow), one stage (what dvc.yaml calls), or show params.

    mdpipe run [--data PATH] [--holdout DOMAIN ...] [-S finetune.epochs=3 ...] [--force]
    mdpipe stage NAME [-S KEY=VALUE ...]
    mdpipe params [STAGE]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mdpipe",
    "TQDM_DISABLE": "1",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def _setup_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])
    for noisy in ("great_expectations", "dvc", "ray", "urllib3", "httpx", "matplotlib", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_stage(args) -> int:
    from tasks.params import apply_overrides, parse_overrides
    from tasks.paths import load_paths
    from tasks.stage import execute

    paths = load_paths(args.root)
    overrides = parse_overrides([f"{args.name}.{s}" for s in args.set])
    if overrides:
        apply_overrides(paths.root / "params", overrides)
    execute(args.name, paths.root)
    return 0


def cmd_params(args) -> int:
    import yaml

    from tasks.params import load_params
    from tasks.paths import load_paths
    from tasks.stage import STAGES

    paths = load_paths(args.root)
    for name in [args.stage] if args.stage else STAGES:
        print(yaml.safe_dump({name: load_params(name, paths.root / "params").model_dump(mode="json")},
                             sort_keys=False), end="")
    return 0


def cmd_run(args) -> int:
    from flows.pipeline import PipelineParams, pipeline
    from flows.summary import print_summary
    from tasks.params import parse_overrides, validate_params
    from tasks.paths import load_paths

    paths = load_paths(args.root)
    params = PipelineParams.from_files(paths.root / "params")
    overrides = parse_overrides(args.set)
    if args.data is not None:
        overrides.setdefault("ingest", {})["data_root"] = str(Path(args.data).expanduser().resolve()) if args.data else None
    if args.holdout is not None:
        overrides.setdefault("ingest", {})["holdout_domains"] = args.holdout
    for stage, fields in overrides.items():
        current = params.stage(stage).model_dump()
        new = validate_params(stage, current | fields, f"override of params/{stage}.yaml")
        setattr(params, "validate_" if stage == "validate" else stage, new)
    t0 = time.perf_counter()
    report = pipeline(params=params, root=str(paths.root), force=args.force)
    print_summary(report, paths, time.perf_counter() - t0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="workspace root (holds paths.yaml, params/, dvc.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    run.add_argument("--data", help="image tree ROOT/<domain>/<class>/<image>; '' = built-in digits")
    run.add_argument("--holdout", nargs="*", metavar="DOMAIN", help="domains to hold out of training")
    run.add_argument("-S", "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="override a parameter (written to params/STAGE.yaml so DVC sees it)")
    run.add_argument("--force", action="store_true", help="rerun stages even when DVC says they are up to date")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", help="ingest, validate, synthesize, pretrain, finetune, evaluate or compress")
    stage.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    stage.set_defaults(func=cmd_stage)

    show = sub.add_parser("params", help="print the validated parameters")
    show.add_argument("stage", nargs="?")
    show.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    _setup_logging()
    from tasks.params import ParamsError

    try:
        return args.func(args)
    except (ParamsError, FileNotFoundError) as e:
        print(f"mdpipe: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a clear one-line cause, not only a traceback
        from mdcore.manifest import DataLayoutError
        from tasks.validate import DataValidationError

        if isinstance(e, (DataLayoutError, DataValidationError)):
            print(f"mdpipe: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
