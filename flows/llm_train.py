"""The llm_train flow: a queue of training stages on a base model, each consuming the previous stage's
model and producing a registered model artifact.

    nexus run llm_train configs/train/tiny.yaml                    # tiny base + SFT(LoRA) → DPO → KD, offline
    nexus run llm_train configs/train/sft_lora.yaml base_model=models/my_base@v1 datasets.sft=distill/sft@v2
    nexus run llm_train configs/train/tiny.yaml --dry-run          # modalities + stage queue, no training

In the lifecycle it takes the base model and the distilled dataset(s) as refs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field, model_validator

from flows.common import flow_lineage, main
from flows.report import FlowResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import FlowConfig, NexusModel
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.errors import ConfigError
from nexus_core.train.base_model import BaseModelConfig
from nexus_core.train.cpt import CPTConfig
from nexus_core.train.dpo import DPOConfig
from nexus_core.train.grpo import GRPOConfig
from nexus_core.train.kd import KDConfig
from nexus_core.train.orpo import ORPOConfig
from nexus_core.train.registry import describe_model
from nexus_core.train.reward import RewardConfig
from nexus_core.train.sft import SFTConfig
from tasks.base_model import base_model as base_model_task
from tasks.ingest import ingest
from tasks.train_cpt import train_cpt
from tasks.train_dpo import train_dpo
from tasks.train_grpo import train_grpo
from tasks.train_kd import train_kd
from tasks.train_orpo import train_orpo
from tasks.train_register import train_register
from tasks.train_reward import train_reward
from tasks.train_sft import train_sft

AnyStage = Annotated[SFTConfig | CPTConfig | DPOConfig | ORPOConfig | GRPOConfig | RewardConfig | KDConfig,
                     Field(discriminator="method")]


class Stage(NexusModel):
    """One stage of the queue: a method config plus where its inputs come from."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Stage name (artifact train/<run>_<name>_vN)")
    dataset: str = Field(description="Key in `datasets` (or the flow's datasets parameter) to train on")
    model: str | None = Field(None, description="Input model: an earlier stage's name or a path/spec "
                                                "(default: the previous causal-LM stage, else the base)")
    teacher: str | None = Field(None, description="kd source=model: an earlier stage, 'base', or a path/spec")
    reward_model: str | None = Field(None, description="grpo: an earlier reward stage, or a path/spec")
    train: AnyStage = Field(description="The method and its hyper-parameters (method: sft|cpt|dpo|orpo|grpo|"
                                        "reward|kd)")


class LLMTrainConfig(FlowConfig):
    """Config of the llm_train flow."""

    name: str = Field("train", pattern=r"^[a-z0-9_]+$", description="Run name; artifact names derive from it")
    base_model: str | None = Field(None, description="Base model dir or artifact spec (NAME@vN); unused when the "
                                                     "flow gets a base_model ref; else a tiny base is built")
    corpus: IngestConfig | None = Field(None, description="Raw corpus the tiny base's tokenizer is trained on")
    tiny_base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Tiny base built when no model")
    datasets: dict[str, str] = Field(default_factory=dict, description="Dataset key → file, dir or spec")
    stages: list[Stage] = Field(default_factory=list, description="The stage queue, run in order")
    dry_run: bool = Field(False, description="Print the base model's modalities and the queue; train nothing")
    quick: bool = Field(False, description="Run every stage for `quick_steps` steps (smoke test of a recipe)")
    quick_steps: int = Field(3, ge=1, description="Steps per stage when quick")
    register_models: bool = Field(True, description="Register every stage's model in the MLflow model registry")
    registry_prefix: str = Field("nexus", description="Registered model name = <prefix>-<run name>-<stage>")

    @model_validator(mode="after")
    def _queue(self) -> LLMTrainConfig:
        seen: list[str] = []
        for i, s in enumerate(self.stages):
            if s.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage {s.name!r}")
            if s.train.method == "kd" and s.train.source == "model" and not s.teacher:
                raise ValueError(f"stages[{i}].teacher: kd with source=model needs a teacher")
            seen.append(s.name)
        return self


def _resolve(spec: str) -> ArtifactRef:
    """A path (raw ref, digest-keyed) or a dataset/model spec known to DataQuery."""
    from nexus_core.io import DataQuery

    if Path(spec).exists():
        p = Path(spec)
        if (p / "manifest.json").is_file():
            from nexus_core.artifacts import read_manifest

            return read_manifest(p).ref()
        return raw_ref(p)
    return DataQuery().ref(spec)


def _quick(stage: AnyStage, steps: int) -> AnyStage:
    return stage.model_copy(update={"max_steps": steps, "checkpoint": stage.checkpoint.model_copy(
        update={"save_steps": steps})})


def plan(cfg: LLMTrainConfig, base: ArtifactRef | None) -> dict:
    """What would run: base model description and the stage queue (for dry runs and the summary)."""
    described = describe_model(base.uri) if base else {"modalities": ["text"], "architecture": "tiny (built at run)"}
    queue = [f"{i + 1}. {s.name}: {s.train.method} ({s.train.finetune}) on {s.dataset}"
             + (f", teacher={s.teacher}" if s.teacher else "") + (f", reward_model={s.reward_model}" if s.reward_model else "")
             + f", max_steps={cfg.quick_steps if cfg.quick else s.train.max_steps}" for i, s in enumerate(cfg.stages)]
    return {"base_model": described, "queue": queue}


@flow(name="llm_train", log_prints=True)
def llm_train(cfg: LLMTrainConfig, base_model: ArtifactRef | None = None,
              datasets: dict[str, ArtifactRef] | None = None) -> FlowResult:
    """Run the stage queue on ``base_model`` (or ``cfg.base_model``, or a tiny base), registering each model."""
    with flow_lineage(cfg) as mlflow_run_id:
        steps: dict = {}
        data = {k: _resolve(v) for k, v in cfg.datasets.items()} | dict(datasets or {})
        missing = sorted({s.dataset for s in cfg.stages} - set(data))
        if missing:
            raise ConfigError([f"stages: dataset(s) {', '.join(missing)} not in datasets ({', '.join(data)})"])
        base = base_model or (_resolve(cfg.base_model) if cfg.base_model else None)
        if cfg.dry_run:
            p = plan(cfg, base)
            print(f"base model: {p['base_model']}\nstage queue:\n  " + "\n  ".join(p["queue"]))
            return FlowResult(flow="llm_train", artifacts={}, flow_run_id=flow_run.get_id(),
                              mlflow_run_id=mlflow_run_id, summary={"dry_run": True, **p})
        if base is None:
            if cfg.corpus is None:
                raise ConfigError(["base_model: no base model and no corpus to build a tiny one from"])
            sources = {f"source_{i}": raw_ref(p) for i, p in enumerate(cfg.corpus.sources)}
            steps["ingest"] = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
            steps["base_model"] = base_model_task(cfg.tiny_base, steps["ingest"].ref, name=f"{cfg.name}_base")
            base = steps["base_model"].ref
        models: dict[str, ArtifactRef] = {"base": base}
        current, registered = base, {}
        for s in cfg.stages:
            t = _quick(s.train, cfg.quick_steps) if cfg.quick else s.train
            model = (models.get(s.model) or _resolve(s.model)) if s.model else current
            ref = (models.get(s.teacher) or _resolve(s.teacher)) if s.teacher else None
            rm = (models.get(s.reward_model) or _resolve(s.reward_model)) if s.reward_model else None
            args = (t, model, data[s.dataset])
            name = f"{cfg.name}_{s.name}"
            if t.method == "sft":
                r = train_sft(*args, name=name)
            elif t.method == "cpt":
                r = train_cpt(*args, name=name)
            elif t.method == "dpo":
                r = train_dpo(*args, name=name)
            elif t.method == "orpo":
                r = train_orpo(*args, name=name)
            elif t.method == "grpo":
                r = train_grpo(*args, name=name, reward_model=rm)
            elif t.method == "reward":
                r = train_reward(*args, name=name)
            else:
                r = train_kd(*args, name=name, teacher=ref)
            steps[s.name], models[s.name] = r, r.ref
            if t.method != "reward":  # a reward model scores; it is not the next stage's policy
                current = r.ref
            if cfg.register_models:
                reg_name = f"{cfg.registry_prefix}-{cfg.name}-{s.name}"
                registered[s.name] = f"{reg_name}/{train_register(r.ref, reg_name, s.name, flow_run.get_id())}"
    losses = {k: round(r.metrics.get("final_loss", float("nan")), 4)
              for k, r in steps.items() if k not in ("ingest", "base_model")}
    summary = {"final_model": current.uri, "registered": registered, "losses": losses}
    return FlowResult.from_steps("llm_train", steps, mlflow_run_id, summary)


if __name__ == "__main__":
    raise SystemExit(main(llm_train, LLMTrainConfig))
