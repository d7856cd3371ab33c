"""A flow's budget_usd stops its steps from starting once the run's ledger reaches it."""

import pytest
from prefect import flow

from flows.common import flow_lineage
from nexus_core import catalog
from nexus_core.artifacts import raw_ref
from nexus_core.config import FlowConfig
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.costs import BudgetExceededError
from tasks.ingest import ingest


class BudgetFlowConfig(FlowConfig):
    corpus: IngestConfig


@flow
def budgeted(cfg: BudgetFlowConfig, spend_first: float = 0.0) -> int:
    from prefect.runtime import flow_run

    with flow_lineage(cfg):
        if spend_first:  # what an earlier paid step of this run would have written to the ledger
            catalog.add(catalog.CostRow(flow_run_id=flow_run.get_id(), step="earlier", usd=spend_first))
        src = raw_ref(cfg.corpus.sources[0])
        return ingest(cfg.corpus, {"s": src}, name="budget").rows


def test_budget_refuses_the_next_step_once_spent(prefect_harness, data_root, tmp_path):
    raw = tmp_path / "c.jsonl"
    raw.write_text('{"text": "a"}\n')
    cfg = BudgetFlowConfig(corpus=IngestConfig(sources=[str(raw)]), budget_usd=1.0)
    assert budgeted(cfg, spend_first=0.5) == 1
    raw.write_text('{"text": "b"}\n')  # new input: the step would have to run again
    with pytest.raises(BudgetExceededError, match=r"budget is left"):
        budgeted(cfg, spend_first=1.0)
    assert not (data_root / "processed" / "corpus" / "budget_v2").exists()
