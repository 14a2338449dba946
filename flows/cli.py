"""``mdpipe``: run the whole pipeline (a Prefect flow), one stage (what dvc.yaml calls), or show params.

    mdpipe run [--data PATH|digits|glyphs] [--holdout DOMAIN ...] [--unlabelled PATH] [-S finetune.epochs=3 ...] [--force]
    mdpipe stage NAME [-S STAGE.KEY=VALUE ...]
    mdpipe params [STAGE | STAGE.KEY]
    mdpipe retrain [--tolerance 0.01] [--force] [--accept-domain DOMAIN ...] [--no-warm-start]
    mdpipe serve [--cron "0 3 * * *"]
    mdpipe deploy --pool NAME [--cron "0 3 * * *"] [--ray-address ADDR]
    mdpipe experiment synthetic|ablation [--seeds 0 1 2] [-S finetune.epochs=8]
    mdpipe experiment lodo [--data digits|glyphs|PATH] [--methods erm multidomain+randconv+linedraw+swad] [--seeds 0 1 2]
    mdpipe experiment continual [--data digits|glyphs|PATH] [--order A B C] [--replay-fraction 0.05] [--seeds 0 1 2]
    mdpipe champion list|show [ID]|rollback ID
    mdpipe predict PATH [--domain D] [--out predictions.csv] [--model DIR|FILE.onnx] [--int8]
    mdpipe export [--int8] [--out models/export] [--model DIR]
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
    from tasks.params import merged_params, params_kept_on_failure, parse_overrides, write_params
    from tasks.paths import load_paths
    from tasks.stage import PARAMS_OF, STAGES, execute

    if args.name not in (*PARAMS_OF, *STAGES):
        print(f"mdpipe: error: unknown stage {args.name!r}; stages: {', '.join([*PARAMS_OF, *STAGES])}",
              file=sys.stderr)
        return 2
    paths = load_paths(args.root)
    params_dir = paths.root / "params"
    overrides = parse_overrides(args.set, default_stage=PARAMS_OF.get(args.name, args.name))
    if not overrides:
        execute(args.name, paths.root)
        return 0
    from flows.pipeline import PipelineParams
    from tasks.preflight import check_run

    changed = merged_params(params_dir, overrides)
    whole = PipelineParams.from_files(params_dir)
    for stage, value in changed.items():
        setattr(whole, "validate_" if stage == "validate" else stage, value)
    check_run(whole, paths.root, pipeline=False)
    with params_kept_on_failure(params_dir, log=logging.getLogger("mdpipe").warning):
        for stage, value in changed.items():
            write_params(stage, value, params_dir)  # where DVC sees what ran
        execute(args.name, paths.root)
    return 0


def cmd_params(args) -> int:
    """A stage's validated params, or one parameter with its value, description and file."""
    import yaml

    from tasks.params import load_params
    from tasks.paths import load_paths
    from tasks.stage import STAGES

    paths = load_paths(args.root)
    if args.stage and ("." in args.stage or ":" in args.stage):  # one parameter: finetune.epochs
        return _show_param(args.stage, paths.root / "params")
    for name in [args.stage] if args.stage else STAGES:
        print(yaml.safe_dump({name: load_params(name, paths.root / "params").model_dump(mode="json")},
                             sort_keys=False), end="")
    return 0


def _show_param(key: str, params_dir: Path) -> int:
    import json

    from tasks.params import SCHEMAS, ParamsError, load_params, override_key

    stage, field, _ = override_key(key + "=")
    top, *inner = field.split(".")
    schema = SCHEMAS[stage]
    if top not in schema.model_fields:
        raise ParamsError(f"{key}: {stage} has no parameter {top!r}; its parameters: {list(schema.model_fields)}")
    value = load_params(stage, params_dir).model_dump(mode="json")[top]
    for part in inner:
        if not isinstance(value, dict) or part not in value:
            raise ParamsError(f"{key}: {'.'.join([stage, top])} has no key {part!r}")
        value = value[part]
    info = schema.model_fields[top]
    print(f"{stage}.{field} = {json.dumps(value)}")
    print(f"  file:    {params_dir / (stage + '.yaml')}")
    print(f"  default: {json.dumps(info.get_default(call_default_factory=True), default=str)}")
    print(f"  {info.description or '(no description)'}")
    return 0


def cmd_run(args) -> int:
    from flows.pipeline import PipelineParams, pipeline
    from flows.summary import print_summary
    from tasks.params import merge_fields, parse_overrides, validate_params, with_profile
    from tasks.paths import load_paths
    from tasks.preflight import check_run, data_choice

    paths = load_paths(args.root)
    params = PipelineParams.from_files(paths.root / "params")
    overrides = with_profile(paths.root / "params", args.profile, parse_overrides(args.set))
    if args.data is not None:
        overrides["ingest"] = merge_fields(overrides.get("ingest", {}), data_choice(args.data, paths.root))
    if args.holdout is not None:
        overrides.setdefault("ingest", {})["holdout_domains"] = args.holdout
    if args.unlabelled:  # images without labels are only worth their copy if pretraining runs
        overrides.setdefault("ingest", {})["unlabelled_root"] = str(Path(args.unlabelled).expanduser().resolve())
        overrides.setdefault("pretrain", {})["enabled"] = True
    for stage, fields in overrides.items():
        current = params.stage(stage).model_dump()
        new = validate_params(stage, merge_fields(current, fields), f"override of params/{stage}.yaml")
        setattr(params, "validate_" if stage == "validate" else stage, new)
    check_run(params, paths.root, warn=False)  # fails in seconds, before Prefect starts (the flow checks again: the UI's door)
    t0 = time.perf_counter()
    report = pipeline(params=params, root=str(paths.root), force=args.force, wait_if_busy=not args.no_wait)
    print_summary(report, paths, time.perf_counter() - t0)
    return 0


def cmd_retrain(args) -> int:
    from flows.retrain import accept_domains, retrain
    from tasks.paths import load_paths

    if args.accept_domain:
        print(f"validation accepts domains {accept_domains(str(load_paths(args.root).root), args.accept_domain)}")
    result = retrain(root=str(load_paths(args.root).root), tolerance=args.tolerance, force=args.force,
                     warm_start=args.warm_start)
    if not result["retrained"]:
        print(f"data unchanged (fingerprint {result['fingerprint']}): nothing retrained")
    else:
        decision = result["promotion"]
        warm = result.get("warm_start") or {}
        if warm.get("mode"):
            print(f"warm start, {warm['mode']} step: {warm.get('mode_reason', '')} ({warm.get('new_images')} new "
                  f"training images, {warm.get('replay_images')} replayed, {warm.get('train_s')} s)")
        verdict = "promoted to champion" if decision["promote"] else "NOT promoted; the champion stays"
        print(f"new model {verdict}: {decision['reason']}")
        for domain, delta in decision["deltas"].items():
            print(f"  {domain:<16} {delta:+.3f}")
        if decision.get("forgetting"):
            f = decision["forgetting"]
            print(f"forgetting on the gate split: BWT {f['BWT']:+.3f} over {sorted(f['per_domain'])}; new domains "
                  f"{f['new_domains']}; model {decision['id']} ({result.get('run_record') or 'see mdpipe champion show'})")
    return 0


def cmd_experiment(args) -> int:
    """Experiments outside the demo's budget: each trains several models and writes reports/experiments/."""
    from tasks.paths import load_paths

    root = str(load_paths(args.root).root)
    if args.name == "continual":
        from flows.continual import continual_flow
        from tasks.params import load_params, parse_overrides

        overrides = parse_overrides(args.set, default_stage="finetune")

        cont = load_params("continual", Path(root) / "params")  # what the CLI leaves out
        pick = lambda value, default: default if value is None else value  # noqa: E731
        add_mode = args.add_mode  # joint by default: the forgetting experiment (parts cannot forget by design)
        add_lr = pick(args.add_lr, cont.lr)
        parts = add_mode == "parts"
        continual_flow(data=args.data, order=args.order, seeds=args.seeds, method=args.method, epochs=args.epochs,
                       add_epochs=pick(args.add_epochs, cont.parts_epochs if parts else cont.epochs),
                       batch_size=args.batch_size,
                       replay_fraction=pick(args.replay_fraction, cont.replay_fraction),
                       replay_strategy=pick(args.replay_strategy, cont.replay_strategy),
                       replay_per_batch=cont.replay_per_batch, few_shot_k=pick(args.few_shot_k, cont.few_shot_k),
                       few_shot_epochs=cont.few_shot_epochs, threads=args.threads, add_mode=add_mode,
                       add_warmup_epochs=pick(args.add_warmup_epochs, cont.warmup_epochs),
                       replay_kd_weight=pick(args.replay_kd_weight, cont.replay_kd_weight),
                       add_lr=add_lr, joint_lr_scale=args.joint_lr_scale,
                       parts_lr_scale=pick(args.parts_lr_scale, round(cont.parts_lr / add_lr, 6) if parts else 1.0),
                       joint_epochs=args.joint_epochs,
                       merge_alphas=args.merge_alphas, known_stats=args.known_stats,
                       finetune_overrides=overrides.get("finetune"), root=root)
        return 0
    if args.name == "lodo":
        from flows.lodo import DEFAULT_METHODS, lodo_flow
        from tasks.params import parse_overrides

        overrides = parse_overrides(args.set, default_stage="finetune")
        lodo_flow(data=args.data, methods=args.methods or DEFAULT_METHODS, seeds=args.seeds, epochs=args.epochs,
                  batch_size=args.batch_size, heldout=args.heldout, threads=args.threads, workers=args.workers,
                  root=root, finetune_overrides=overrides.get("finetune"))
        return 0
    from tasks.params import parse_overrides

    overrides = parse_overrides(args.set, default_stage="finetune").get("finetune", {})
    if args.name == "synthetic":
        from flows.experiments import compare_synthetic_flow

        summary = compare_synthetic_flow(root=root, seeds=args.seeds, overrides=overrides or None)
        print((load_paths(root).experiments / "synthetic.md").read_text())
        return 0 if summary else 1
    from flows.ablation import ablation_flow

    ablation_flow(root=root, seeds=args.seeds, overrides=overrides or None)
    print((load_paths(root).experiments / "ablation.md").read_text())
    return 0


def cmd_champion(args) -> int:
    """The champion's lineage: every scored challenger (promoted or rejected, with its reason), one record
    in full, or putting an earlier champion back."""
    import json

    from flows.champion import RegistryError, format_list, list_models, rollback, show
    from tasks.paths import load_paths

    registry = load_paths(args.root).registry
    try:
        if args.action == "list":
            records = list_models(registry)
            print(format_list(records) if records else f"no model scored yet in {registry / 'models'}")
        elif args.action == "show":
            print(json.dumps(show(registry, args.id), indent=2, sort_keys=True))
        else:
            if not args.id:
                raise RegistryError("rollback needs the id of an earlier champion (see `mdpipe champion list`)")
            rec = rollback(registry, args.id, reason=args.reason)
            print(f"champion is now {rec['id']} (was {rec['rolled_back_from']})")
    except RegistryError as e:
        print(f"mdpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    """The champion (or --model) as a self-describing ONNX file with its config and model card."""
    from flows.model_use import export
    from tasks.paths import load_paths

    paths = load_paths(args.root)
    out = Path(args.out) if args.out else paths.root / "models" / "export"
    info = export(paths, args.model, "int8" if args.int8 else "fp32", out)
    print(f"exported {info['model']} ({info['precision']}, {info['bytes'] / 1e6:.2f} MB) to {info['out']}/model.onnx"
          + (f" (champion {info['champion']})" if info["champion"] else ""))
    return 0


def cmd_predict(args) -> int:
    """Classes and probabilities for new images, written to a CSV or JSON file, with a summary."""
    import json

    from flows.model_use import predict
    from mdcore.data.io import atomic_write_text
    from mdcore.deploy.predict import PredictInputError
    from tasks.paths import load_paths

    paths = load_paths(args.root)
    try:
        frame, summary = predict(paths, args.path, model=args.model, domain=args.domain,
                                 precision="int8" if args.int8 else "fp32", batch_size=args.batch_size,
                                 threads=args.threads)
    except PredictInputError as e:
        print(f"mdpipe: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix == ".json":
        atomic_write_text(out, frame.to_json(orient="records", indent=1))
    else:
        atomic_write_text(out, frame.to_csv(index=False))
    print(f"{summary['images']} images -> {out} ({summary['images_per_s']} images/s with decoding; model "
          f"{summary['model']}, {summary['precision']}, {'calibrated' if summary['calibrated'] else 'uncalibrated'} "
          f"probabilities)")
    if summary["failed"]:
        print(f"  {summary['failed']} could not be read (their 'error' column says why)")
    if "accuracy" in summary:
        print(f"  accuracy on the {summary['labelled']} labelled images: {summary['accuracy']:.4f}")
    print("  per class: " + json.dumps(summary["per_class"]))
    return 0


def cmd_deploy(args) -> int:
    """Register the pipeline and retrain deployments on a Prefect process work pool: any machine with the
    project installed runs them with ``prefect worker start --pool NAME`` (``serve`` is the one-machine door)."""
    from flows.deploy import deploy_to_pool
    from tasks.paths import load_paths

    ids = deploy_to_pool(load_paths(args.root).root, args.pool, cron=args.cron, ray_address=args.ray_address)
    for name, dep_id in ids.items():
        print(f"deployment {name} ({dep_id}) on work pool {args.pool!r}")
    print(f"start a worker where the project is installed: prefect worker start --pool {args.pool}")
    return 0


def stop_within_after_interrupt(seconds: float) -> None:
    """Ctrl-C stops the process within ``seconds`` even when shutdown work hangs (Prefect's serve pauses its
    deployments through the API on the way out, and retries for minutes when the server is gone); a second
    Ctrl-C stops it at once."""
    import signal
    import threading

    def now(*_):
        os._exit(130)

    def first(signum, frame):
        timer = threading.Timer(seconds, now)
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGINT, now)
        print(f"mdpipe: stopping (at most {seconds:.0f} s; Ctrl-C again to stop now)", file=sys.stderr, flush=True)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, first)


def cmd_serve(args) -> int:
    """Serve the pipeline (run on demand from the UI) and the retraining loop (on a cron schedule)."""
    from prefect import serve

    from flows.pipeline import form_parameters, pipeline
    from flows.retrain import retrain
    from tasks.paths import load_paths

    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    root = str(load_paths(args.root).root)
    stop_within_after_interrupt(8)
    # one run per deployment at a time (a second waits, shown as AwaitingConcurrencySlot in the UI); runs of
    # different deployments, or from the shell, wait on the workspace lock with a message in their logs
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE")
    serve(
        # the form opens on params/*.yaml as they are now; a run applies only the fields changed in it, onto
        # the files as they are when it starts
        pipeline.to_deployment(name="mdpipe", parameters=form_parameters(root), concurrency_limit=one_at_a_time,
                               description="The whole DAG; params/*.yaml unless the run form sets parameters"),
        retrain.to_deployment(name="mdpipe-retrain", cron=args.cron, parameters={"root": root},
                              concurrency_limit=one_at_a_time,
                              description="Retrain when the data changed; promote only if no domain gets worse"),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="workspace root (holds paths.yaml, params/, dvc.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    run.add_argument("--data", help="image tree ROOT/DOMAIN/CLASS/IMAGE, or a built-in dataset (digits, glyphs; "
                                    "when no folder has that name); '' = built-in digits")
    run.add_argument("--holdout", nargs="*", metavar="DOMAIN",
                     help="domains to hold out of training (ingest.holdout_domains; with --data PATH and no --holdout: none)")
    run.add_argument("--unlabelled", metavar="PATH",
                     help="images without labels, ROOT/DOMAIN/IMAGE: self-supervised pretraining also learns from "
                          "them (sets ingest.unlabelled_root and pretrain.enabled: true); pays when labels are few")
    run.add_argument("-S", "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="override a parameter (also params/STAGE.yaml:KEY=VALUE); checked with the whole "
                          "run before anything is written, then written to params/STAGE.yaml so DVC sees it")
    run.add_argument("--profile", metavar="NAME",
                     help="lay params/profiles/NAME.yaml over the params files first (-S still wins), written "
                          "like -S; 'demo' = the faster scratch profile `make demo` runs")
    run.add_argument("--force", action="store_true", help="rerun stages even when DVC says they are up to date")
    run.add_argument("--no-wait", action="store_true",
                     help="when another run holds this workspace, stop at once instead of waiting for it")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", help="source, ingest, validate, synthesize, pretrain, label_issues, finetune, evaluate or compress")
    stage.add_argument("-S", "--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                       help="override a parameter of this stage (STAGE.KEY=VALUE, params/STAGE.yaml:KEY=VALUE or "
                            "KEY=VALUE; checked, then written to params/STAGE.yaml so DVC sees it)")
    stage.set_defaults(func=cmd_stage)

    again = sub.add_parser("retrain", help="continuous learning: retrain if the data changed, promote if no domain is worse")
    again.add_argument("--tolerance", type=float, default=0.0, help="accuracy drop allowed per domain")
    again.add_argument("--force", action="store_true", help="retrain even if the data did not change")
    again.add_argument("--accept-domain", nargs="+", default=[], metavar="DOMAIN",
                       help="new domain folders validation should accept (added to validate.known_domains)")
    again.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                       help="fine-tune the champion on new data + replay (default: params/continual.yaml)")
    again.set_defaults(func=cmd_retrain)

    exp = sub.add_parser("experiment", help="leave-one-domain-out protocol, with/without synthetic data, or the "
                                            "component ablation (several trainings each)")
    exp.add_argument("name", choices=["lodo", "synthetic", "ablation", "continual"])
    exp.add_argument("--data", default="digits", help="lodo: digits, glyphs, or ROOT/<domain>/<class>/<image> tree")
    exp.add_argument("--methods", nargs="+", metavar="METHOD", help="lodo: methods (default: erm, randconv, "
                                                                    "multidomain+randconv+swad, "
                                                                    "multidomain+randconv+linedraw+swad)")
    exp.add_argument("--holdout", "--heldout", dest="heldout", nargs="+", metavar="DOMAIN",
                     help="lodo: hold out only these domains (one at a time)")
    exp.add_argument("--epochs", type=int, default=8, help="lodo: epochs per cell")
    exp.add_argument("--batch-size", type=int, default=32, help="lodo: batch per step")
    exp.add_argument("--threads", type=int, default=2, help="lodo: torch threads per cell")
    exp.add_argument("--workers", type=int, default=0, help="lodo: cells at once (0 = cores // threads, or a Ray cluster)")
    exp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="claims rest on at least 3 seeds")
    exp.add_argument("-S", "--set", action="append", default=[], metavar="finetune.KEY=VALUE",
                     help="lodo, continual: finetune parameters for every training of the experiment (e.g. "
                          "finetune.stage_adapters=[-3,-2])")
    exp.add_argument("--order", nargs="+", metavar="DOMAIN", help="continual: domains in arrival order")
    exp.add_argument("--method", default="multidomain", help="continual: the method every training uses")
    exp.add_argument("--add-epochs", type=int, help="continual: epochs per domain arrival (default: params/continual.yaml)")
    exp.add_argument("--add-mode", choices=["joint", "parts_first", "parts"], default="joint",
                     help="continual: each arrival trains every weight (with replay or without), the new domain's "
                          "parts first, or its parts only (the warm start's new_domain: parts; the known domains "
                          "compute as before, so nothing is forgotten and replay plays no part)")
    exp.add_argument("--joint-lr-scale", type=float, default=0.1, help="continual, parts_first: the joint "
                     "epochs' learning rate as a multiple of the arrival's")
    exp.add_argument("--parts-lr-scale", type=float, help="continual, parts_first and parts: the new domain's "
                     "parts-only epochs' learning rate as a multiple of the arrival's (default: 1 for parts_first, "
                     "params' parts_lr / lr for parts)")
    exp.add_argument("--joint-epochs", type=int, default=1, help="continual, parts_first: joint epochs that end "
                     "each arrival (the rest of --add-epochs train the new domain's parts alone)")
    exp.add_argument("--merge-alphas", type=float, nargs="+", metavar="ALPHA", help="continual, joint: after each "
                     "arrival move the weights back toward the model as grown by the alpha best on validation "
                     "(e.g. 0 0.25 0.5; the new domain's own parts stay as trained)")
    exp.add_argument("--add-warmup-epochs", type=int, help="continual: epochs at 0.1 x lr that start each joint "
                                                           "arrival (params)")
    exp.add_argument("--add-lr", type=float, help="continual: learning rate of each arrival (params)")
    exp.add_argument("--known-stats", choices=["frozen", "updated"], default="updated", help="continual: the known "
                     "domains' normalization statistics during a joint arrival: updated by the replayed images of "
                     "each batch, or frozen (measured worse on the gate split: BENCHMARKS.md)")
    exp.add_argument("--replay-kd-weight", type=float, help="continual: each joint arrival also distils the "
                     "model before it on the replayed images (0 = off; params)")
    exp.add_argument("--replay-fraction", type=float, help="continual: share of past training images replayed (params)")
    exp.add_argument("--replay-strategy", choices=["random", "reservoir", "hardest"], help="continual: buffer (params)")
    exp.add_argument("--few-shot-k", type=int, help="continual: labelled images per class of the last domain (params)")
    exp.set_defaults(func=cmd_experiment)

    champ = sub.add_parser("champion", help="the champion's lineage: list, show one, roll back to an earlier one")
    champ.add_argument("action", choices=["list", "show", "rollback"])
    champ.add_argument("id", nargs="?", help="a model id from `mdpipe champion list` (show: default the champion)")
    champ.add_argument("--reason", default="manual rollback", help="rollback: recorded in registry/decisions/")
    champ.set_defaults(func=cmd_champion)

    pred = sub.add_parser("predict", help="classes and probabilities for new images, with the champion")
    pred.add_argument("path", help="a folder of images, one image, a text file of paths, or a CSV with a 'path' "
                                   "column (optional 'domain' and 'label' columns)")
    pred.add_argument("--model", help="a model folder (model.safetensors + config.json) or an exported .onnx file "
                                      "(default: the champion; before any promotion, models/finetuned)")
    pred.add_argument("--domain", help="the images' domain (one the model knows); default: routed on their features")
    pred.add_argument("--out", default="predictions.csv", help="where to write them (.csv or .json)")
    pred.add_argument("--int8", action="store_true", help="score with the int8 model (calibrated on training images)")
    pred.add_argument("--batch-size", type=int, default=256)
    pred.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoding and ONNX Runtime threads")
    pred.set_defaults(func=cmd_predict)

    exp_model = sub.add_parser("export", help="write the champion as ONNX with its metadata and a model card")
    exp_model.add_argument("--model", help="a model folder (default: the champion; before any promotion, "
                                           "models/finetuned)")
    exp_model.add_argument("--int8", action="store_true", help="static int8 (calibrated on training images)")
    exp_model.add_argument("--out", help="output folder (default: models/export)")
    exp_model.set_defaults(func=cmd_export)

    dep = sub.add_parser("deploy", help="register the deployments on a Prefect process work pool (for teams)")
    dep.add_argument("--pool", required=True, help="work pool name (created as a process pool if missing)")
    dep.add_argument("--cron", default="0 3 * * *", help="schedule of the retraining deployment")
    dep.add_argument("--ray-address", help="RAY_ADDRESS for the runs' Ray Train jobs (default: the worker's "
                                           "environment, else a local Ray)")
    dep.set_defaults(func=cmd_deploy)

    serve = sub.add_parser("serve", help="serve the Prefect deployments (needs PREFECT_API_URL or a local server)")
    serve.add_argument("--cron", default="0 3 * * *", help="schedule of the retraining deployment")
    serve.set_defaults(func=cmd_serve)

    show = sub.add_parser("params", help="print the validated parameters, or one with its description and file")
    show.add_argument("stage", nargs="?", metavar="STAGE|STAGE.KEY", help="e.g. finetune, or finetune.epochs")
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
        from mdcore.data.manifest import DataLayoutError
        from mdcore.data.workspace_lock import WorkspaceBusy
        from tasks.validate import DataValidationError

        if isinstance(e, WorkspaceBusy):
            print(f"mdpipe: {e}", file=sys.stderr)
            return 3
        if isinstance(e, (DataLayoutError, DataValidationError)):
            print(f"mdpipe: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
