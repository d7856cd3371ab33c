"""Run by tests/e2e/test_deployments.py against the server `make up` started (its env sourced):
start the `distill/distill` deployment (human review), answer both review gates the way the review
app does, and print the final state. A suspended run's process exits; each resume makes the worker
run it again from the top, its finished tasks served from the cache.
"""

from __future__ import annotations

import time

from nexus_core.settings import configure_environment

configure_environment()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.flow_runs import resume_flow_run  # noqa: E402

from nexus_core.distill import review_store  # noqa: E402


def main() -> None:
    run = run_deployment("distill/distill", timeout=0)
    with get_client(sync_client=True) as client:
        def state():  # noqa: ANN202
            return client.read_flow_run(run.id).state

        for gate in ("_filtered", "_recheck"):
            deadline = time.monotonic() + 300
            while True:
                reqs = [r for r in review_store.requests("waiting") if r.flow_run_id == str(run.id) and gate in r.dataset_uri]
                current = state()
                if reqs and current.is_paused():
                    break
                assert not current.is_final(), f"run ended before the {gate} gate: {current.name} {current.message}"
                assert time.monotonic() < deadline, f"never suspended at the {gate} gate (state {current.name})"
                time.sleep(1)
            print(f"GATE {gate} {current.name}", flush=True)
            resume_flow_run(run.id, run_input={"reviewer": "e2e", "labels": 0,
                                               "labels_digest": review_store.labels_digest(reqs[0].dataset_uri)})
            review_store.mark_submitted(reqs[0].id, "e2e")
        deadline = time.monotonic() + 300
        while not (current := state()).is_final():
            assert time.monotonic() < deadline, f"never finished (state {current.name})"
            time.sleep(1)
    stale = [r for r in review_store.requests("waiting") if r.flow_run_id == str(run.id)]
    print(f"FINAL {current.name} waiting-requests={len(stale)}", flush=True)


if __name__ == "__main__":
    main()
