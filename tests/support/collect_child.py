"""Run the real teacher-collection step in this process, for tests that must kill it mid-run.

    NEXUS_HOME=... NEXUS_DATA=... python -m tests.support.collect_child INPUTS_DIR OUT_DIR API_BASE \
        [--batch-size 32] [--concurrency 4]

The response cache lives under ``NEXUS_HOME`` (``llm_cache.sqlite``), as in a real run. On success
the step's result is printed as one JSON line on stdout.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", help="directory holding the teacher inputs' data.parquet")
    ap.add_argument("out", help="output directory (data.parquet is written there)")
    ap.add_argument("api_base", help="OpenAI-compatible base URL ending in /v1")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)

    from nexus_core.settings import configure_environment

    configure_environment()  # before litellm is imported
    from nexus_core.artifacts import raw_ref
    from nexus_core.context import StepContext
    from nexus_core.distill.collect import CollectConfig, run_teacher_collect
    from nexus_core.distill.prompts import TeacherConfig

    cfg = CollectConfig(batch_size=args.batch_size,
                        teacher=TeacherConfig(model="openai/stub", api_base=args.api_base,
                                              max_concurrency=args.concurrency, max_retries=0))
    result = run_teacher_collect(cfg, inputs={"teacher_inputs": raw_ref(args.inputs)}, out_uri=args.out,
                                 ctx=StepContext.detached())
    print(result.model_dump_json(), flush=True)


if __name__ == "__main__":
    main()
