"""The llm_train flow: a queue of training stages on a base model, each consuming the previous stage's
model and producing a registered model artifact.

    nexus run llm_train configs/train/tiny.yaml                    # tiny base + SFT(LoRA) → DPO → KD, offline
    nexus run llm_train configs/train/sft_lora.yaml base_model=models/my_base@v1 datasets.sft=distill/sft@v2
    nexus run llm_train configs/train/tiny.yaml --dry-run          # check every stage's data, print the queue
    nexus run llm_train configs/train/omni_tiny.yaml               # tiny base + SigLIP (omni) → mm_align → mm_sft
    nexus run llm_train configs/train/omni_audio_tiny.yaml         # tiny base + Whisper (Qwen2-Audio) → same stages

Every stage's dataset (and any model named by path, spec or hub id) is checked against its step's
contract before the first stage starts, so a bad DPO dataset stops the run before SFT trains, and against the
modalities of the model it trains (``images`` data on a text-only model: "modality validation failed").

An ``omni:`` section composes the base with a vision encoder (``configs/encoders.yaml``) before the
queue starts; its stages are then ``mm_align`` / ``mm_sft`` on ``messages`` + ``images`` data. With
``audio:`` (and ``vision: none``) it composes the audio sibling (Whisper encoder, Qwen2-Audio class)
instead, trained on ``messages`` + ``audios`` data.

In the lifecycle it takes the base model and the distilled dataset(s) as refs.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field, model_validator

from flows.common import flow_lineage, main
from flows.results import LLMTrainResult
from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import FlowConfig, NexusModel, PathOrName
from nexus_core.contract import check_plan
from nexus_core.corpus.ingest import IngestConfig
from nexus_core.errors import ConfigError
from nexus_core.io import resolve_ref
from nexus_core.models.io import describe_model, resolve_model
from nexus_core.train.base_model import BaseModelConfig
from nexus_core.train.chat import queue_template_problems
from nexus_core.train.cpt import CPTConfig, run_cpt
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.kd import KDConfig, run_kd
from nexus_core.train.mm_features import features_config
from nexus_core.train.mm_train import MMAlignConfig, MMSFTConfig, run_mm_train
from nexus_core.train.modalities import detect_modalities, queue_modality_problems
from nexus_core.train.omni import OmniConfig, audio_ref, run_omni, vision_ref
from nexus_core.train.orpo import ORPOConfig, run_orpo
from nexus_core.train.reward import RewardConfig, run_reward
from nexus_core.train.sft import SFTConfig, run_sft
from nexus_core.train.steer import EVAL_INPUT, Steering
from tasks.base_model import base_model as base_model_task
from tasks.ingest import ingest
from tasks.train_cpt import train_cpt
from tasks.train_dpo import train_dpo
from tasks.train_grpo import train_grpo
from tasks.train_kd import train_kd
from tasks.train_mm import train_mm
from tasks.train_mm_features import train_mm_features
from tasks.train_omni import train_omni
from tasks.train_orpo import train_orpo
from tasks.train_register import train_register
from tasks.train_reward import train_reward
from tasks.train_sft import train_sft

AnyStage = Annotated[SFTConfig | CPTConfig | DPOConfig | ORPOConfig | GRPOConfig | RewardConfig | KDConfig
                     | MMAlignConfig | MMSFTConfig, Field(discriminator="method")]


class DatasetShare(NexusModel):
    """One dataset of a stage's mix."""

    ref: PathOrName = Field(description="Key in `datasets`, or a dataset path / artifact spec")
    weight: float = Field(default=1.0, gt=0, description="Share of the training rows drawn from it (weight / sum)")


class Stage(NexusModel):
    """One stage of the queue: a method config plus where its inputs come from."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Stage name (artifact train/<run>_<name>_vN)")
    dataset: str = Field(description="Key in `datasets` (or the flow's datasets parameter) to train on; with "
                                     "`datasets:` it may be left out (the first one's ref)")
    datasets: list[DatasetShare] | None = Field(default=None, description="sft/dpo/orpo/reward: several datasets "
                                                "mixed by weight (the step's data, data_1, ... inputs)")
    eval_dataset: PathOrName | None = Field(default=None, description="sft/dpo/orpo/reward: key in `datasets` (or a "
                                            "path/spec) to evaluate on, instead of an eval_split")
    model: PathOrName | None = Field(default=None, description="Input model: an earlier stage's name or a path/spec "
                                                "(default: the previous causal-LM stage, else the base)")
    teacher: PathOrName | None = Field(default=None, description="kd source=model (or mm_sft with kd): an earlier "
                                       "stage, 'base', or a path/spec")
    reward_model: PathOrName | None = Field(default=None, description="grpo: an earlier reward stage, or a path/spec")
    train: AnyStage = Field(description="The method and its hyper-parameters (method: sft|cpt|dpo|orpo|grpo|"
                                        "reward|kd|mm_align|mm_sft)")

    @model_validator(mode="before")
    @classmethod
    def _first_dataset(cls, data: Any) -> Any:
        """``datasets:`` names the stage's ``dataset`` (its first ref) unless that is given and differs."""
        if isinstance(data, dict) and data.get("datasets"):
            first = data["datasets"][0]
            ref = first.get("ref") if isinstance(first, dict) else getattr(first, "ref", None)
            if data.get("dataset") not in (None, ref):
                raise ValueError("dataset: set either dataset or datasets (whose first ref is the dataset)")
            data = {**data, "dataset": ref}
        return data

    def data_inputs(self, data: dict[str, ArtifactRef]) -> dict[str, ArtifactRef | None]:
        """The step's data inputs: ``data`` (and ``data_1``, ... when mixing) and ``eval_data``."""
        keys = [d.ref for d in self.datasets] if self.datasets else [self.dataset]
        out = {("data" if i == 0 else f"data_{i}"): data.get(k) for i, k in enumerate(keys)}
        return out | ({EVAL_INPUT: data.get(self.eval_dataset)} if self.eval_dataset else {})


class LLMTrainConfig(FlowConfig):
    """Config of the llm_train flow."""

    name: str = Field(default="train", pattern=r"^[a-z0-9_]+$", description="Run name; artifact names derive from it")
    base_model: PathOrName | None = Field(default=None, description="Base model dir or artifact spec (NAME@vN); unused when the "
                                                     "flow gets a base_model ref; else a tiny base is built")
    corpus: IngestConfig | None = Field(default=None, description="Raw corpus the tiny base's tokenizer is trained on")
    tiny_base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Tiny base built when no model")
    omni: OmniConfig | None = Field(default=None, description="Compose the base with a vision encoder (omni "
                                    "conversion) before the stages; none: the base as it is")
    datasets: dict[str, PathOrName] = Field(default_factory=dict, description="Dataset key → file, dir or spec")
    stages: list[Stage] = Field(default_factory=list, description="The stage queue, run in order")
    quick: bool = Field(default=False, description="Run every stage for `quick_steps` steps (smoke test of a recipe)")
    quick_steps: int = Field(default=3, ge=1, description="Steps per stage when quick")
    register_models: bool = Field(default=True, description="Register every stage's model in the MLflow model registry")
    registry_prefix: str = Field(default="nexus", description="Registered model name = <prefix>-<run name>-<stage>")

    @model_validator(mode="after")
    def _queue(self) -> LLMTrainConfig:
        seen: list[str] = []
        for i, s in enumerate(self.stages):
            if s.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage {s.name!r}")
            if s.train.method == "kd" and s.train.source == "model" and not s.teacher:
                raise ValueError(f"stages[{i}].teacher: kd with source=model needs a teacher")
            if isinstance(s.train, MMSFTConfig) and (s.train.kd is None) != (s.teacher is None):
                raise ValueError(f"stages[{i}]: mm_sft distils with both train.kd and teacher; set both or neither")
            steerable = isinstance(s.train, Steering)
            for key, used in (("datasets", s.datasets), ("eval_dataset", s.eval_dataset)):
                if used and not steerable:
                    raise ValueError(f"stages[{i}].{key}: only sft, dpo, orpo and reward stages mix datasets or "
                                     f"evaluate; this one is {s.train.method}")
            if s.datasets and isinstance(s.train, Steering) and s.train.data_weights is not None:
                raise ValueError(f"stages[{i}].train.data_weights: set the weights in stages[{i}].datasets")
            seen.append(s.name)
        return self


def _quick(stage: AnyStage, steps: int) -> AnyStage:
    evals = {"eval_steps": steps} if isinstance(stage, Steering) and stage.eval_steps else {}
    return stage.model_copy(update={"max_steps": steps, "checkpoint": stage.checkpoint.model_copy(
        update={"save_steps": steps}), **evals})


def stage_datasets(cfg: LLMTrainConfig, data: dict[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """``data`` plus every ``datasets:``/``eval_dataset`` ref of a stage that is not a key of it,
    resolved as a path or artifact spec (an error names the stage's key)."""
    out = dict(data)
    for s in cfg.stages:
        refs = [(f"stages.{s.name}.datasets[{i}].ref", d.ref) for i, d in enumerate(s.datasets or [])]
        refs += [(f"stages.{s.name}.eval_dataset", s.eval_dataset)] if s.eval_dataset else []
        for key, spec in refs:
            if spec not in out:
                out[spec] = resolve_ref(spec, key)
    return out


STEPS = {"sft": run_sft, "cpt": run_cpt, "dpo": run_dpo, "orpo": run_orpo, "grpo": run_grpo,
         "reward": run_reward, "kd": run_kd, "mm_align": run_mm_train, "mm_sft": run_mm_train}


def queue(cfg: LLMTrainConfig) -> list[str]:
    """The stage queue in words (dry runs print it)."""
    return [f"{i + 1}. {s.name}: {s.train.method} ({s.train.finetune}) on "
            + (" + ".join(f"{d.ref} x{d.weight:g}" for d in s.datasets) if s.datasets else s.dataset)
            + (f", eval on {s.eval_dataset}" if s.eval_dataset else "")
            + (f", teacher={s.teacher}" if s.teacher else "") + (f", reward_model={s.reward_model}" if s.reward_model else "")
            + f", max_steps={cfg.quick_steps if cfg.quick else s.train.max_steps}" for i, s in enumerate(cfg.stages)]


def referenced_models(cfg: LLMTrainConfig) -> dict[str, ArtifactRef]:
    """Every model a stage names by reference (not 'base' or a stage), resolved once: a local model
    directory is digested in full, so the check and the run share one resolution."""
    stages = {"base", *(s.name for s in cfg.stages)}
    named: dict[str, ArtifactRef] = {}
    for s in cfg.stages:
        for role, spec in (("model", s.model), ("teacher", s.teacher), ("reward_model", s.reward_model)):
            if spec and spec not in stages and spec not in named:
                named[spec] = resolve_model(spec, f"stages.{s.name}.{role}")
    return named


def _model(spec: str | None, models: dict[str, ArtifactRef | None], where: str) -> ArtifactRef | None:
    """A stage's model reference: 'base', an earlier stage, or a reference from :func:`referenced_models`."""
    if spec is None:
        return None
    if spec not in models:
        raise ConfigError([f"{where}: {spec!r} is not 'base' or an earlier stage"])
    return models[spec]


def check_stages(cfg: LLMTrainConfig, base: ArtifactRef | None, data: dict[str, ArtifactRef],
                 named: dict[str, ArtifactRef]) -> None:
    """Every stage's inputs known before training (its dataset, models named by reference) against its
    step's contract, all problems in one error. Datasets missing from ``data`` come from an upstream flow
    (the lifecycle's distill) and are checked when they exist; stages not trained yet are unknown (None).
    A stage rendering chats on a model without a chat template (and no ``chat_template:``) stops the run."""
    problems = queue_template_problems(cfg.stages, base, named, data)
    problems += queue_modality_problems(cfg.stages, base_modalities(cfg, base), named, data)
    if problems:
        raise ConfigError(problems)
    known: dict[str, ArtifactRef | None] = {"base": base, **named}
    planned = []
    if cfg.omni is not None:  # the omni step's inputs: the base, when known, and the vision encoder
        planned.append((run_omni, cfg.omni, {"model": base, "vision": vision_ref(cfg.omni),
                                             "audio": audio_ref(cfg.omni)}, "omni"))
    for s in cfg.stages:
        step_data = s.data_inputs(data)
        inputs = {"data": step_data.pop("data"), EVAL_INPUT: step_data.pop(EVAL_INPUT, None),
                  "model": _model(s.model, known, f"stages.{s.name}.model"),
                  "teacher": _model(s.teacher, known, f"stages.{s.name}.teacher"),
                  "reward_model": _model(s.reward_model, known, f"stages.{s.name}.reward_model")}
        planned.append((STEPS[s.train.method], s.train, inputs, f"stage {s.name}"))
        for i, ref in enumerate(step_data.values(), 1):  # mixed-in datasets: the same contract as `data`
            planned.append((STEPS[s.train.method], s.train, {"data": ref}, f"stage {s.name} (datasets[{i}])"))
        known[s.name] = None  # later stages may use this one; its model does not exist yet
    check_plan(planned)


def base_modalities(cfg: LLMTrainConfig, base: ArtifactRef | None) -> list[str]:
    """What the stages' base takes: the base model's modalities (a tiny base: text), plus vision once the
    omni section has composed it with a vision encoder."""
    has = detect_modalities(base.path) if base is not None else ["text"]
    added = "audio" if cfg.omni is not None and cfg.omni.audio else "vision"
    return has + [added] if cfg.omni is not None and added not in has else has


def _mm_features(t: MMAlignConfig | MMSFTConfig, model: ArtifactRef, data: ArtifactRef, name: str,
                 stage: str) -> ArtifactRef | None:
    """An mm stage's precomputed tower features: its ``features`` artifact, or made here (``precomputed``)."""
    if t.features:
        return resolve_ref(t.features, f"stages.{stage}.train.features")
    if t.precomputed:
        return train_mm_features(features_config(t), model, data, name=f"{name}_features").ref
    return None


@flow(name="llm_train", log_prints=True)
def llm_train(cfg: LLMTrainConfig, base_model: ArtifactRef | None = None,
              datasets: dict[str, ArtifactRef] | None = None) -> LLMTrainResult:
    """Run the stage queue on ``base_model`` (or ``cfg.base_model``, or a tiny base), registering each model."""
    with flow_lineage(cfg) as mlflow_run_id:
        steps: dict = {}
        data = {k: resolve_ref(v, f"datasets.{k}") for k, v in cfg.datasets.items()} | dict(datasets or {})
        data = stage_datasets(cfg, data)
        missing = sorted({s.dataset for s in cfg.stages} - set(data))
        if missing:
            raise ConfigError([f"stages: dataset(s) {', '.join(missing)} not in datasets ({', '.join(data)})"])
        base = base_model or (resolve_model(cfg.base_model, "base_model") if cfg.base_model else None)
        named = referenced_models(cfg)
        check_stages(cfg, base, data, named)
        if cfg.dry_run:
            described = describe_model(base.path) if base else {"modalities": ["text"],
                                                               "architecture": "tiny (built at run)"}
            enc = f"audio encoder {cfg.omni.audio_spec()}" if cfg.omni and cfg.omni.audio else (
                f"vision encoder {cfg.omni.vision_spec()}" if cfg.omni else "")
            omni = (f"omni: {enc} → modalities "
                    f"{', '.join(base_modalities(cfg, base))}\n") if cfg.omni else ""
            print(f"base model: {described}\n{omni}stage queue:\n  " + "\n  ".join(queue(cfg)))
            return LLMTrainResult.planned("llm_train", queue(cfg), mlflow_run_id, base_model=described)
        if base is None:
            if cfg.corpus is None:
                raise ConfigError(["base_model: no base model and no corpus to build a tiny one from"])
            sources = {f"source_{i}": raw_ref(p) for i, p in enumerate(cfg.corpus.sources)}
            steps["ingest"] = ingest(cfg.corpus, sources, name=f"{cfg.name}_corpus")
            steps["base_model"] = base_model_task(cfg.tiny_base, steps["ingest"].ref, name=f"{cfg.name}_base")
            base = steps["base_model"].ref
        if cfg.omni is not None:
            steps["omni"] = train_omni(cfg.omni, base, vision_ref(cfg.omni), name=f"{cfg.name}_omni",
                                       audio=audio_ref(cfg.omni))
            base = steps["omni"].ref
        models: dict[str, ArtifactRef | None] = {"base": base, **named}
        current, registered = base, {}
        for s in cfg.stages:
            t = _quick(s.train, cfg.quick_steps) if cfg.quick else s.train
            model = _model(s.model, models, f"stages.{s.name}.model") or current
            ref = _model(s.teacher, models, f"stages.{s.name}.teacher")
            rm = _model(s.reward_model, models, f"stages.{s.name}.reward_model")
            args = (t, model, data[s.dataset])
            name = f"{cfg.name}_{s.name}"
            step_data = s.data_inputs(data)
            steer = {"more_data": {k: v for k, v in step_data.items() if k.startswith("data_")} or None,
                     "eval_data": step_data.get(EVAL_INPUT)}
            if s.datasets and isinstance(t, Steering):
                t = t.model_copy(update={"data_weights": [d.weight for d in s.datasets]})
                args = (t, model, data[s.dataset])
            if t.method == "sft":
                r = train_sft(*args, name=name, **steer)
            elif t.method == "cpt":
                r = train_cpt(*args, name=name)
            elif t.method == "dpo":
                r = train_dpo(*args, name=name, **steer)
            elif t.method == "orpo":
                r = train_orpo(*args, name=name, **steer)
            elif t.method == "grpo":
                r = train_grpo(*args, name=name, reward_model=rm)
            elif t.method == "reward":
                r = train_reward(*args, name=name, **steer)
            elif isinstance(t, MMAlignConfig | MMSFTConfig):
                r = train_mm(*args, name=name, features=_mm_features(t, model, data[s.dataset], name, s.name),
                             teacher=ref)
            else:
                r = train_kd(*args, name=name, teacher=ref)
            steps[s.name], models[s.name] = r, r.ref
            if t.method != "reward":  # a reward model scores; it is not the next stage's policy
                current = r.ref
            if cfg.register_models:
                reg_name = f"{cfg.registry_prefix}-{cfg.name}-{s.name}"
                registered[s.name] = f"{reg_name}/{train_register(r.ref, reg_name, s.name, flow_run.get_id())}"
    losses = {k: round(r.metrics.get("final_loss", float("nan")), 4)
              for k, r in steps.items() if k not in ("ingest", "base_model", "omni")}
    return LLMTrainResult.from_steps("llm_train", steps, mlflow_run_id, final_model=current, registered=registered,
                                     losses=losses)


if __name__ == "__main__":
    raise SystemExit(main(llm_train, LLMTrainConfig))
