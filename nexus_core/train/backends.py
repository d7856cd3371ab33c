"""How a stage's training runs beyond one plain process: the ``accelerate`` config file of a
multi-process launch (DDP, FSDP, DeepSpeed ZeRO-2/3; shipped in ``configs/accelerate/``), the
attention implementation and Liger kernels. Everything here is checked before any compute
(:func:`backend_problems`, called by the stages' pre-flight).

- ``accelerate_config`` names a shipped file (``ddp``, ``fsdp``, ``deepspeed_zero2``,
  ``deepspeed_zero3``) or a path to an accelerate config YAML; when unset, ``distributed`` (ddp|fsdp)
  names the shipped file. The launch passes ``--config_file``; the stage's ``num_processes`` (and,
  multi-node, the node flags) win over the file's, and precision comes from the stage.
- The setting's value (not the file's content) is in the cache key and in the work-dir key: the
  strategy decides how checkpoints are written (an FSDP or ZeRO checkpoint cannot be resumed under
  DDP), and results differ only by numerics. The rest of a file (prefetch, offload, wrap policy)
  changes speed and memory, not what is trained, so editing it reuses a finished model; a file
  edited to another ``distributed_type`` should get a new name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nexus_core.config import repo_root
from nexus_core.errors import InputError

if TYPE_CHECKING:
    from nexus_core.train.common import StageBase

ACCELERATE_DIR = Path("configs") / "accelerate"
# accelerate's distributed_type -> what the stage launcher runs; others (MULTI_CPU needs mpirun,
# XLA, MEGATRON_LM, NO) are refused before the launch.
STRATEGIES = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


@dataclass(frozen=True)
class AccelerateSetup:
    """An accelerate config file as the stage launcher uses it."""

    path: Path
    strategy: str  # ddp | fsdp | deepspeed
    zero_stage: int | None = None  # DeepSpeed only

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only a shard of the parameters (FSDP, ZeRO-3): the full weights must
        be gathered (a collective on every rank) before rank 0 saves them."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)


def shipped_accelerate_configs() -> list[str]:
    """Names of the accelerate config files in ``configs/accelerate/``."""
    return sorted(p.stem for p in (repo_root() / ACCELERATE_DIR).glob("*.yaml"))


def accelerate_file(cfg: StageBase) -> Path:
    """The accelerate config file a stage launches with: ``accelerate_config`` (a path, or a shipped
    name), else the shipped file named by ``distributed``. InputError naming the setting."""
    spec = cfg.accelerate_config or cfg.distributed
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = repo_root() / ACCELERATE_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    raise InputError(f"accelerate_config {spec!r}: neither a file nor a shipped config "
                     f"({', '.join(shipped_accelerate_configs())} in {ACCELERATE_DIR}/)")


def load_accelerate_config(path: str | Path) -> AccelerateSetup:
    """Parse an accelerate config file with accelerate's own loader (the one ``accelerate launch
    --config_file`` uses). InputError naming the file when it does not parse or names a
    distributed_type the stage launcher does not run."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = Path(path)
    try:
        conf = load_config_from_file(str(path))
    except Exception as exc:  # accelerate raises ValueError/TypeError/yaml errors for a bad file
        raise InputError(f"{path}: not a valid accelerate config file: {exc}") from None
    if not isinstance(conf, ClusterConfig):
        raise InputError(f"{path}: compute_environment must be LOCAL_MACHINE (the stage launches accelerate itself)")
    kind = str(getattr(conf.distributed_type, "value", conf.distributed_type))
    if kind not in STRATEGIES:
        raise InputError(f"{path}: distributed_type {kind} is not run by the stage launcher; use MULTI_GPU (DDP, also "
                         "on CPU over gloo), FSDP or DEEPSPEED")
    zero = (conf.deepspeed_config or {}).get("zero_stage") if kind == "DEEPSPEED" else None
    if kind == "DEEPSPEED" and zero not in (0, 1, 2, 3):
        raise InputError(f"{path}: deepspeed_config.zero_stage must be 0, 1, 2 or 3 (got {zero!r})")
    return AccelerateSetup(path=path, strategy=STRATEGIES[kind], zero_stage=zero)


def accelerate_setup(cfg: StageBase) -> AccelerateSetup:
    """The stage's accelerate config file, parsed (see :func:`load_accelerate_config`)."""
    return load_accelerate_config(accelerate_file(cfg))


def launch_flags(cfg: StageBase) -> list[str]:
    """``accelerate launch`` flags that select the stage's config file."""
    return ["--config_file", str(accelerate_file(cfg))]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a package that is installed but broken (a missing CUDA library)
        return False
    return True


def backend_problems(cfg: StageBase, gpu: bool) -> list[str]:
    """What stops this stage's accelerate config, attention implementation or Liger kernels here,
    one line per problem naming the setting (empty: all fine)."""
    problems = []
    try:
        setup = accelerate_setup(cfg)
    except InputError as exc:
        problems.append(str(exc))
        setup = None
    if setup is not None:
        key = "accelerate_config" if cfg.accelerate_config else "distributed"
        if cfg.accelerate_config and cfg.distributed != "ddp" and setup.strategy != cfg.distributed:
            problems.append(f"distributed: {cfg.distributed}, but accelerate_config {cfg.accelerate_config} "
                            f"({setup.path}) is {setup.strategy}; set only one of them")
        if setup.strategy == "deepspeed" and not _importable("deepspeed"):
            problems.append(f"{key}: {setup.path} uses DeepSpeed (ZeRO-{setup.zero_stage}), but the deepspeed package "
                            "cannot be imported here; pip install deepspeed (on a GPU machine), or choose "
                            "accelerate_config: fsdp")
        if setup.strategy != "ddp" and not gpu:
            problems.append(f"{key}: {setup.path} is {setup.strategy.upper()}, which needs GPUs here: accelerate 1.15 "
                            "(which the Trainer wraps models with) turns FSDP/DeepSpeed on only for accelerator "
                            "devices; on CPU its state is MULTI_CPU, which drops the plugin and would train plain DDP. "
                            "Use accelerate_config: ddp on CPU")
        if setup.strategy == "fsdp" and cfg.adapters:
            problems.append(f"{key}: {setup.path} is FSDP, and LoRA/QLoRA under it fails in the first training step "
                            "(FSDP1 'AssertionError: as_params=True type(prim_param)=Tensor', seen on an H200 with "
                            "this project's pins, with and without gradient checkpointing); train adapters with "
                            "accelerate_config: ddp, or use finetune: full under FSDP")
        if setup.strategy == "deepspeed" and cfg.quantized:
            problems.append(f"{key}: DeepSpeed with a 4-bit base (qlora / load_in_4bit) is not supported by this "
                            "stage; use ddp or fsdp")
    impl = cfg.attn_implementation
    if impl == "flash_attention_2":
        if not gpu:
            problems.append("attn_implementation=flash_attention_2 needs a CUDA GPU; this machine has none (use sdpa "
                            "or eager on CPU)")
        if not _importable("flash_attn"):
            problems.append("attn_implementation=flash_attention_2 needs the flash_attn package (pip install "
                            "flash-attn); it cannot be imported here")
    if impl == "flex_attention" and not _importable("torch.nn.attention.flex_attention"):
        problems.append("attn_implementation=flex_attention needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if cfg.liger_kernel:
        if not _importable("liger_kernel"):
            problems.append("liger_kernel: true needs the liger-kernel package (pip install liger-kernel); it cannot "
                            "be imported here")
        if not gpu:
            problems.append("liger_kernel: true needs a GPU (Liger's kernels are Triton kernels); this machine has "
                            "none")
    return problems


def launched_strategy_problem(cfg: StageBase, fsdp: bool, deepspeed: bool) -> str | None:
    """In a launched process: what is wrong when the Trainer did not set up the strategy the stage's
    accelerate config file names (``fsdp``/``deepspeed``: whether the Trainer's accelerator runs them),
    so a run never trains another strategy than the one asked for. None when they agree."""
    setup = accelerate_setup(cfg)
    got = "fsdp" if fsdp else "deepspeed" if deepspeed else "ddp"
    if got == setup.strategy:
        return None
    return (f"{setup.path} asks for {setup.strategy.upper()}, but the Trainer's accelerator set up "
            f"{got.upper()} (accelerate enables FSDP/DeepSpeed only on accelerator devices)")


def model_kwargs(cfg: StageBase) -> dict[str, str]:
    """``from_pretrained`` keyword arguments of the stage's attention setting (none for ``auto``:
    transformers' own choice, sdpa where the model supports it)."""
    return {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
