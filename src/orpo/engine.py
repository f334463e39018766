"""The run's processes: the Accelerator for how the run was launched, and what differs between engines.

One process, DDP (every process holds the whole model), FSDP2 (torch's fully_shard: weights, gradients and
optimizer state split over processes) and DeepSpeed ZeRO come from the launch (`accelerate launch --config_file
configs/accelerate/*.yaml`, or `torchrun` for DDP); the loop asks this module the few things that differ:

- how many forward passes a process runs in a step (`passes`): under DDP at least one, so that a process left
  without pairs still joins the gradient all-reduce; with sharded weights as many as the busiest process, because
  every pass gathers the weights from all processes;
- the whole trained weights, gathered onto the main process for `final/` (`full_state`);
- each process's own shards of the trained weights and optimizer state, for checkpoints (`local_state`,
  `load_local_state`).
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError


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

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def passes(live: int, accelerator) -> int:
    """Forward passes this process runs when `live` of them hold its own pairs; the loop fills the rest with
    zero-weight passes."""
    if accelerator.num_processes == 1:
        return live
    if not sharded(accelerator):
        return max(live, 1)
    return int(accelerator.gather(torch.tensor([live], device=accelerator.device)).max())


def plain(value: torch.Tensor) -> torch.Tensor:
    """A tensor that may be a DTensor (FSDP2's gradient norm) as an ordinary one, whole on every process."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model, accelerator, trained_only: bool) -> dict[str, torch.Tensor] | None:
    """The whole weights on the main process (None elsewhere; every process must call it), or None when the model
    is not sharded (then it saves from its own copy). `trained_only`: the trainable tensors (LoRA adapters)."""
    if not sharded(accelerator):
        return None
    if accelerator.distributed_type != accelerator.distributed_type.FSDP:
        return accelerator.get_state_dict(model)  # ZeRO-3: consolidated by DeepSpeed on the main process
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    state = get_model_state_dict(model, options=options)
    return state if accelerator.is_main_process else None


def local_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's shards of the trainable weights and of the optimizer state, as plain tensors."""
    weights = {n: _local(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    optim = optimizer.state_dict()
    optim["state"] = {k: {n: _local(v) for n, v in s.items()} for k, s in optim["state"].items()}
    return weights, optim


def load_local_state(model, optimizer, weights: dict[str, torch.Tensor], optim: dict) -> None:
    """Put back what `local_state` returned into a model and optimizer sharded the same way."""
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"checkpoint shards do not match this model (e.g. {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            _local(params[name]).copy_(tensor)
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
