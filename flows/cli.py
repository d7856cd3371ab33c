"""The ``nexus`` command.

    nexus run FLOW CONFIG [key=value ...]   run flows/<FLOW>.py on a YAML config
    nexus data ls [AREA]                    list datasets and their versions
    nexus data show NAME[@vN]               manifest, schema and sample rows of one dataset
    nexus data organize DIR [--out OUT] [--dry-run] [--move]   sort raw data files into OUT/<capability>/
    nexus doctor [CONFIG] [key=value ...]   dependencies, accelerator, disk space, configured models
    nexus serve MODEL [--port N] [--api-key-env VAR] [--engine vllm]   OpenAI-compatible server for local models
    nexus costs [--by flow_name,step,provider] [--flow NAME] [--run ID] [--json]   spend report
    nexus leaderboard [--dataset NAME] [--judge heuristic|llm] [--json]   evaluation reports ranked per dataset and judge kind
    nexus lineage MODEL[@ALIAS|/V] [--json]  a registered model (or artifact) back to its raw files

A failure prints one `error:` line and exits 1; add --debug (anywhere) for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import typing
from pathlib import Path

from nexus_core.errors import NexusError


def _flow(name: str):  # noqa: ANN202 - (prefect Flow, config model)
    """``flows/<name>.py`` defines a flow function called ``<name>`` whose first parameter is its config."""
    if not (Path(__file__).parent / f"{name}.py").is_file() or name in {"cli", "common", "report"}:
        known = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                       if p.stem not in {"__init__", "__main__", "cli", "common", "report"})
        raise NexusError(f"unknown flow {name!r} (known: {', '.join(known)})")
    module = importlib.import_module(f"flows.{name}")
    flow_fn = getattr(module, name)
    hints = typing.get_type_hints(flow_fn.fn)
    first = next(iter(hints))
    return flow_fn, hints[first]


def cmd_run(args: argparse.Namespace) -> int:
    from flows.common import load_flow_config
    from flows.report import print_result, quiet_console_tracebacks

    flow_fn, model = _flow(args.flow)
    if not args.debug:
        quiet_console_tracebacks()
    overrides = [*args.overrides, *(["dry_run=true"] if args.dry_run else [])]  # flows with a dry_run field
    cfg = load_flow_config(model, args.config, overrides)
    print_result(flow_fn(cfg))
    return 0


def cmd_data_ls(args: argparse.Namespace) -> int:
    from nexus_core.io import DataQuery

    infos = DataQuery().list(args.area)
    if not infos:
        print("no datasets yet: run `make demo` or `nexus run lifecycle configs/presets/tiny.yaml`")
        return 0
    print(f"{'area':<12} {'name':<28} {'kind':<8} {'versions':<14} rows")
    for i in infos:
        versions = ",".join(f"v{v}" for v in i.versions)
        print(f"{i.area:<12} {i.name:<28} {i.kind:<8} {versions:<14} {'' if i.rows is None else i.rows}")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from nexus_core.io import DataQuery, load_table

    query = DataQuery()
    m = query.manifest(args.spec)
    print(json.dumps(m.model_dump(mode="json", by_alias=True, exclude={"result", "config"}), indent=2))
    if m.rows is not None:
        print(load_table(m.ref()).head(args.rows))
    return 0


def cmd_data_organize(args: argparse.Namespace) -> int:
    """Copy (or move) every data file under DIR into OUT/<capability>/ and print file → capability →
    reason; unknown, unreadable and conflicting files are listed and left in place (exit 0)."""
    from nexus_core.settings import data_root
    from nexus_core.train.organize import apply, plan

    src = Path(args.dir)
    out = Path(args.out) if args.out else data_root() / "raw" / "datasets"
    placements = plan(src, out, move=args.move)
    if not args.dry_run:
        apply(placements)
    if not placements:
        print(f"no data files (.jsonl, .jsonl.gz, .jsonl.zst, .ndjson, .json, .parquet) under {src}")
        return 0
    width = max(len(str(p.source.relative_to(src))) for p in placements)
    print(f"{'file':<{width}}  {'capability':<20} {'action':<10} reason")
    for p in placements:
        print(f"{str(p.source.relative_to(src)):<{width}}  {p.capability or '-':<20} {p.status:<10} {p.reason}")
    statuses = ("copy", "move", "copied", "moved", "present", "conflict", "unknown", "unreadable")
    summary = ", ".join(f"{n} {s}" for s in statuses if (n := sum(p.status == s for p in placements)))
    print(f"{'dry run, nothing changed: ' if args.dry_run else ''}{summary} → {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve local model dirs, artifact specs (``models/tiny_base@v1``) or registry entries
    (``models:/NAME@ALIAS``) behind an OpenAI-compatible API; ``--engine vllm`` puts our front (auth,
    limits) before vLLM servers started as child processes, which stop when this server stops."""
    from nexus_core.serve.launch import ServeConfig, serve_models

    if args.engine == "vllm":  # before any model is resolved or downloaded
        from nexus_core.serve.vllm import check_vllm, vllm_python

        check_vllm(vllm_python(args.vllm_python))
    models: dict[str, str] = {}
    for spec in args.model:
        name, _, where = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if not name and where.startswith("models:/"):  # a registry entry answers as its registered name
            name = where.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
        elif not name:
            from nexus_core.models.io import resolve_model

            name = Path(where if Path(where).exists() else resolve_model(where).path).name
        models[name] = where
    drafts = {}
    for spec in args.draft or []:
        name, sep, where = spec.partition("=")
        if not sep or name not in models:
            raise NexusError(f"--draft {spec!r}: expected SERVED_NAME=DIR with SERVED_NAME one of {sorted(models)}")
        drafts[name] = where
    tts = {}
    if args.tts:  # [NAME=]DIR_OR_HUB_ID; served as the directory's (or hub id's) last name by default
        name, _, where = args.tts.rpartition("=")
        tts[name or Path(where).name] = where
    voices = {}
    for spec in args.tts_voice or []:
        name, sep, sid = spec.partition("=")
        if not sep or not (sid.isdigit() or sid == "none"):
            raise NexusError(f"--tts-voice {spec!r}: expected NAME=SPEAKER_ID (an integer, or none)")
        voices[name] = None if sid == "none" else int(sid)
    images = {}
    for spec in args.image_model or []:  # [NAME=]ARTIFACT; served as the artifact's name by default
        name, _, where = spec.rpartition("=")
        images[name or Path(where.split("@", 1)[0]).name] = where
    serve_models(ServeConfig(
        tts=tts, tts_voices=voices or None, image_models=images,
        media_root=args.media_root, allow_image_urls=args.allow_image_urls,
        allow_private_image_urls=args.allow_private_image_urls, max_image_mb=args.max_image_mb,
        image_url_timeout_s=args.image_url_timeout,
        models=models, drafts=drafts, engine=args.engine, host=args.host, port=args.port, api_key_env=args.api_key_env,
        max_batch_size=args.max_batch_size, max_body_mb=args.max_body_mb, request_timeout_s=args.request_timeout,
        max_queue=args.max_queue, max_request_rows=args.max_request_rows, timeout_keep_alive=args.timeout_keep_alive,
        header_timeout_s=args.header_timeout, limit_concurrency=args.limit_concurrency,
        vllm_python=args.vllm_python, vllm_args=args.vllm_arg or [],
        gpu_memory_utilization=args.gpu_memory_utilization, engine_startup_timeout_s=args.engine_startup_timeout))
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """Print the cost ledger grouped by flow, step and provider (or any ``--by`` keys)."""
    from nexus_core.costs import cost_report, format_report

    by = [k.strip() for k in args.by.split(",") if k.strip()]
    lines = cost_report(by=by, flow_name=args.flow, flow_run_id=args.run)
    print(json.dumps(lines, indent=2) if args.json else format_report(lines, by))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nexus_core.doctor import format_report, run_doctor

    checks = run_doctor(args.config, args.overrides, min_free_gb=args.min_free_gb)
    print(format_report(checks))
    return 1 if any(c.required and not c.ok for c in checks) else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Print evaluation reports per (dataset, judge kind), LLM judges first; ranked within each group:
    gates passed first, then coverage, then the rubric score."""
    from nexus_core.catalog import leaderboard, leaderboard_group

    rows = leaderboard(dataset_name=args.dataset, judge_kind=args.judge)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return 0
    if not rows:
        print("no evaluation reports yet: run `nexus run evaluate configs/eval/tiny.yaml`")
        return 0
    group, rank = None, 0
    for r in rows:
        if leaderboard_group(r) != group:
            group, rank = leaderboard_group(r), 0
            dataset, kind = group
            note = " (rule-based, not an LLM judge: not comparable with LLM scores)" if kind == "heuristic" else ""
            print(f"\ndataset {dataset} · judge {kind}{note}")
            print(f"{'#':<3} {'model':<28} {'judge':<20} {'score':>6} {'cover':>6} {'gates':<6} run_id")
        rank += 1
        score = "" if r.score is None else f"{r.score:.2f}"
        cover = "" if r.coverage is None else f"{r.coverage:.3f}"
        print(f"{rank:<3} {(r.model_name or '?'):<28} {(r.judge or '?')[:20]:<20} {score:>6} {cover:>6} "
              f"{'pass' if r.gate_passed else 'FAIL':<6} {r.run_id}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from nexus_core.trace import format_lineage, trace

    lin = trace(args.spec)
    print(lin.model_dump_json(indent=2) if args.json else format_lineage(lin))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nexus``."""
    parser = argparse.ArgumentParser(prog="nexus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print tracebacks (of a failure, and in the logs)")
    # `--debug` after the subcommand too; SUPPRESS keeps a subcommand from resetting `nexus --debug run`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow on a config", parents=[common])
    run.add_argument("flow", help="flow name: a module in flows/ (lifecycle, ...)")
    run.add_argument("config", help="YAML config (configs/...)")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.add_argument("--dry-run", action="store_true", help="same as dry_run=true (e.g. llm_train: plan only)")
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="datasets and versions", parents=[common]).add_subparsers(
        dest="data_command", required=True)
    ls = data.add_parser("ls", help="list datasets", parents=[common])
    ls.add_argument("area", nargs="?", help="only this area (corpus, models, distill, ...)")
    ls.set_defaults(func=cmd_data_ls)
    show = data.add_parser("show", help="show one dataset", parents=[common])
    show.add_argument("spec", help="NAME or NAME@vN or AREA/NAME@vN")
    show.add_argument("--rows", type=int, default=5, help="sample rows to print")
    show.set_defaults(func=cmd_data_show)
    org = data.add_parser("organize", help="sort raw data files into folders by detected capability",
                          parents=[common])
    org.add_argument("dir", help="folder of raw data files (searched recursively)")
    org.add_argument("--out", default=None, help="where the <capability>/ folders go (default: DATA_ROOT/raw/datasets)")
    org.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    org.add_argument("--move", action="store_true", help="move the files instead of copying them")
    org.set_defaults(func=cmd_data_organize)

    doctor = sub.add_parser("doctor", help="check dependencies, accelerator, disk and configured models",
                            parents=[common])
    doctor.add_argument("config", nargs="?", help="a flux YAML whose models should resolve")
    doctor.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    doctor.add_argument("--min-free-gb", type=float, default=5.0, help="required free disk space")
    doctor.set_defaults(func=cmd_doctor)
    serve = sub.add_parser("serve", help="OpenAI-compatible server for local models", parents=[common])
    serve.add_argument("model", nargs="+", help="model dir, artifact spec (NAME@vN), or SERVED_NAME=dir")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--api-key-env", default=None,
                       help="environment variable holding the accepted API key(s), comma-separated")
    serve.add_argument("--max-batch-size", type=int, default=16, help="most rows decoded together (continuous batching)")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies get 413")
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds a generation may take (504)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting for a batch slot before 429")
    serve.add_argument("--max-request-rows", type=int, default=256, help="most prompts x n in one request (400)")
    serve.add_argument("--timeout-keep-alive", type=int, default=5, help="idle keep-alive connections close after")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="connections without a complete request head after this many seconds are closed")
    serve.add_argument("--limit-concurrency", type=int, default=1024, help="open connections beyond this get 503")
    serve.add_argument("--draft", action="append", metavar="NAME=DIR",
                       help="speculative decoding: a smaller draft model (same tokenizer) for served model NAME")
    serve.add_argument("--image-model", action="append", metavar="[NAME=]ARTIFACT",
                       help="an image_gen projector artifact (its LLM and Klein pipeline load with it): "
                            "/v1/images/generations (repeatable)")
    serve.add_argument("--tts", default=None, metavar="[NAME=]DIR",
                       help="a VITS text-to-speech model (dir or hub id): /v1/audio/speech and chat audio out")
    serve.add_argument("--tts-voice", action="append", metavar="NAME=ID",
                       help="voice name -> speaker id of the tts model (repeatable; default: OpenAI's voice names "
                            "in speaker order)")
    serve.add_argument("--media-root", default=None, metavar="DIR",
                       help="image_url parts may name files (file:// URLs or absolute paths) under DIR")
    serve.add_argument("--allow-image-urls", action="store_true",
                       help="fetch http(s) image_url parts (public addresses only, see --allow-private-image-urls)")
    serve.add_argument("--allow-private-image-urls", action="store_true",
                       help="also fetch image URLs on loopback/private/link-local addresses (SSRF: trusted clients)")
    serve.add_argument("--max-image-mb", type=float, default=8.0, help="larger image files / fetched images get 400")
    serve.add_argument("--image-url-timeout", type=float, default=10.0, help="seconds an image URL may take to fetch")
    serve.add_argument("--engine", choices=["embedded", "vllm"], default="embedded",
                       help="embedded: this process decodes (CPU or one GPU); vllm: vLLM servers as child processes "
                            "behind this one's auth and limits (needs the vllm package)")
    serve.add_argument("--vllm-python", default=None,
                       help="interpreter with vllm installed (default: $NEXUS_VLLM_PYTHON, else this one)")
    serve.add_argument("--vllm-arg", action="append", metavar="ARGS",
                       help="extra vLLM server arguments, e.g. --vllm-arg='--tensor-parallel-size 2' (repeatable)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="vllm: share of GPU memory for all served models together")
    serve.add_argument("--engine-startup-timeout", type=float, default=900.0,
                       help="vllm: seconds each engine may take to answer /health")
    serve.set_defaults(func=cmd_serve)
    costs = sub.add_parser("costs", help="GPU and API spend by flow, step and provider", parents=[common])
    costs.add_argument("--by", default="flow_name,step,provider",
                       help="comma-separated group keys: flow_name, flow_run_id, step, provider, kind, model")
    costs.add_argument("--flow", default=None, help="only this flow name")
    costs.add_argument("--run", default=None, help="only this Prefect flow run id")
    costs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    costs.set_defaults(func=cmd_costs)
    board = sub.add_parser("leaderboard", help="evaluation reports ranked across models", parents=[common])
    board.add_argument("--dataset", default=None, help="only reports on this validation dataset name")
    board.add_argument("--judge", default=None, choices=["heuristic", "llm"], help="only this judge kind")
    board.add_argument("--json", action="store_true", help="print JSON instead of a table")
    board.set_defaults(func=cmd_leaderboard)
    lin = sub.add_parser("lineage", help="trace a registered model or an artifact back to its raw files",
                         parents=[common])
    lin.add_argument("spec", help="NAME@ALIAS or NAME/VERSION (registry), models:/..., or name@vN (artifact)")
    lin.add_argument("--json", action="store_true", help="machine-readable output")
    lin.set_defaults(func=cmd_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nexus`` console script."""
    from nexus_core.settings import configure_environment

    configure_environment()  # before anything imports prefect, litellm or mlflow
    args = build_parser().parse_args(argv)
    from flows.report import report_failure

    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        return report_failure(exc, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
