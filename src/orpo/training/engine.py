"""The run's processes: the Accelerator for how the run was launched, and what differs between engines.

One process, DDP (every process holds the whole model), FSDP2 (torch's fully_shard: weights, gradients and
optimizer state split over processes) and DeepSpeed ZeRO come from the launch (`accelerate launch --config_file
configs/accelerate/*.yaml`, or `torchrun` for DDP); the loop asks this module the few things that differ:

- how many forward passes a process runs in a step (`passes`): under DDP at least one, so that a process left
  without pairs still joins the gradient all-reduce; with sharded weights as many as the busiest process, because
  every pass gathers the weights from all processes;
- the whole trained weights, gathered onto the main process for `final/` (`full_state`);
- each process's own shards of the optimizer state, for checkpoints (`local_optimizer_state`,
  `load_local_optimizer`; DeepSpeed writes its own, through Accelerate's save_state);
- DeepSpeed takes the optimizer step inside the last backward of a step (`backward`), and ZeRO-3 gathers each
  module's weights only for that module's forward, so the fused layers, which read their children's weights,
  stay off there (`fusable`).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..config import ConfigError


def make_accelerator(mixed_precision: str, log_with: list[str] | None, project_dir: str):
    """The Accelerator for this launch. Several processes without CUDA run over gloo on the CPU (Accelerate would
    otherwise make each a lone run), and an FSDP2 launch on CPU processes is honoured: Accelerate shards only on
    accelerators, while torch's fully_shard also runs on CPUs."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("orpo shards with FSDP2 only: set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp2-*.yaml)")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir)
    if cpu and fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does: every later
        # AcceleratorState() (the optimizer wrapper makes one) copies it from there
    check_launch(accelerator.num_processes)
    return accelerator


def configure_engine(config, accelerator) -> None:
    """Refuse, before the model loads, settings the engine cannot serve (ConfigError, exit 2); give DeepSpeed the
    settings orpo owns (its batch, no accumulation of its own, orpo's clipping)."""
    model = config.model
    if sharded(accelerator) and not deepspeed(accelerator) and model.load_in_4bit and model.bnb_4bit_quant_storage != model.bnb_4bit_compute_dtype:
        raise ConfigError(f"4-bit weights are sharded only when stored in the compute dtype: set "
                          f"model.bnb_4bit_quant_storage={model.bnb_4bit_compute_dtype} (now {model.bnb_4bit_quant_storage})")
    if not deepspeed(accelerator):
        return
    if config.on_nonfinite == "skip":
        raise ConfigError("on_nonfinite=skip: under DeepSpeed the optimizer step is taken inside DeepSpeed, before orpo "
                          "sees the gradient norm; use on_nonfinite=stop (DeepSpeed's fp16 loss scaler skips overflows itself)")
    if zero3(accelerator):
        if config.layout == "packed":
            raise ConfigError("layout=packed reads the output layer's weight outside its forward, which ZeRO-3 does not "
                              "gather: set layout=plain, or shard with FSDP2 (configs/accelerate/fsdp2-*.yaml)")
        if model.load_in_4bit:
            raise ConfigError("4-bit weights (QLoRA) cannot be partitioned by ZeRO-3: use FSDP2 (configs/accelerate/fsdp2-qlora.yaml) or ZeRO-2")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = 1  # orpo accumulates; the boundary is set per pass (backward)
    ds["train_batch_size"] = config.per_device_train_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = config.max_grad_norm or 0.0


def deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero3(accelerator) -> bool:
    return deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def fusable(accelerator) -> bool:
    """Whether the fused layers may read their children's weights inside one forward: not under ZeRO-3, which
    gathers each module's weights only around that module's own forward."""
    return not zero3(accelerator)


def backward(accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backward of one pass. DeepSpeed is told whether it ends the step (it then reduces the gradients and takes
    its optimizer step itself, clipping at config.max_grad_norm); the others only accumulate."""
    if deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
    else:
        accelerator.backward(loss)


def check_launch(processes: int) -> None:
    """Refuse a launch that asked for several processes and got one: `accelerate launch --cpu --num_processes N`
    starts one process (accelerate runs several CPU processes only through MPI) and sets MASTER_ADDR for nothing."""
    env = os.environ
    if processes != int(env.get("WORLD_SIZE", processes)):
        raise ConfigError(f"the launcher started {env['WORLD_SIZE']} processes but the run sees {processes}")
    if processes == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU", "").lower() == "true":
        raise ConfigError("accelerate launch --cpu started one process, not the several asked for (accelerate runs several "
                          "CPU processes only through MPI). Use `torchrun --standalone --nproc_per_node N -m orpo.cli train ...` "
                          "or `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N -m orpo.cli train ...` "
                          "(gloo on a machine without GPUs), or drop --num_processes for one process.")


def sharded(accelerator) -> bool:
    """True when each process holds only a share of the weights (FSDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or zero3(accelerator)


def passes(live: int, accelerator) -> int:
    """Forward passes this process runs when `live` of them hold its own pairs; the loop fills the rest with
    zero-weight passes."""
    if accelerator.num_processes == 1:
        return live
    if not sharded(accelerator):
        return max(live, 1)
    return int(accelerator.gather(torch.tensor([live], device=accelerator.device)).max())


def plain(value) -> torch.Tensor:
    """A gradient norm as an ordinary tensor, whole on every process: FSDP2 gives a DTensor, DeepSpeed a float
    (None before it has measured one: 0)."""
    if value is None or isinstance(value, (int, float)):
        return torch.tensor(float(value or 0.0))
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model, accelerator, trained_only: bool) -> dict[str, torch.Tensor] | None:
    """The whole weights on the main process (None elsewhere; every process must call it), or None when the model
    is not sharded (then it saves from its own copy). `trained_only`: the trainable tensors (LoRA adapters)."""
    if not sharded(accelerator):
        return None
    if zero3(accelerator):  # gathered in 16 bits by DeepSpeed (zero3_save_16bit_model: true in the config)
        state = accelerator.get_state_dict(model)
        return state if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    state = get_model_state_dict(model, options=options)
    return state if accelerator.is_main_process else None


def local_optimizer_state(optimizer) -> dict:
    """This process's shards of the optimizer state, as plain tensors (its weights: checkpoint.trainable_state)."""
    optim = optimizer.state_dict()
    optim["state"] = {k: {n: _local(v) for n, v in s.items()} for k, s in optim["state"].items()}
    return optim


def load_local_optimizer(optimizer, optim: dict) -> None:
    """Put back the optimizer state `local_optimizer_state` returned into an optimizer sharded the same way."""
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    for key, state in optim["state"].items():
        param = by_index[int(key)]
        if hasattr(param, "device_mesh"):  # back into the DTensor the optimizer steps with
            from torch.distributed.tensor import DTensor

            state.update({n: DTensor.from_local(v.to(param.device), param.device_mesh, param.placements, run_check=False,
                                                 shape=param.shape, stride=param.stride())
                          for n, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0})
    optimizer.load_state_dict(optim)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def isolated():
    """Run a job without leaving process-wide state behind: Accelerate's shared state is cleared before (a
    failed or finished earlier run cannot change this one) and after, and the global random number generators
    (Python, NumPy, torch) are as they were. In a distributed launch Accelerate's state belongs to the launch and
    is left alone."""
    import random

    import numpy as np

    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    if single:
        reset_accelerate()
    try:
        yield
    finally:
        if single:
            reset_accelerate()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (the accelerator, gradient and process singletons)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
