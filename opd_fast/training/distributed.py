"""torch.distributed for the trainer: the process group torchrun asks for, the student sharded
with FSDP2, each rank's share of the prompts, and the reductions that make a step's loss and
metrics those of the global batch.

A process that torchrun did not start (no RANK / WORLD_SIZE in its environment) gets
`Distributed.single()`: every method then returns its input unchanged, without a tensor round
trip, so a single process trains exactly as it did before this module existed.

Backend: gloo for CPU tensors, NCCL for CUDA ones ("cpu:gloo,cuda:nccl" on a GPU machine, so
the small metric reductions can stay on the CPU). Collectives time out after
OPD_FAST_DIST_TIMEOUT_S seconds (default 1800); a rank that dies is noticed sooner by torchrun,
which stops the others and names the failed rank.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
from torch import Tensor

from opd_fast.models.output_layer import register_root_call
from opd_fast.op.names import TOKEN_METRIC_NAMES

TIMEOUT_ENV = "OPD_FAST_DIST_TIMEOUT_S"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group exists (launched by torchrun)

    @classmethod
    def single(cls) -> Distributed:
        return cls()

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """The process group torchrun's environment describes (initialised here when needed);
        `single()` outside torchrun. device: the config's device key."""
        if not launched_by_torchrun():
            return cls.single()
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            backend = "cpu:gloo,cuda:nccl" if wants_cuda else "gloo"
            dist.init_process_group(backend=backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """The ranks on this machine (torchrun's LOCAL_WORLD_SIZE)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    def device_name(self, device: str) -> str:
        """The config's device for this rank: each rank of a GPU job takes cuda:LOCAL_RANK."""
        if self.active and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local_rank}"
        return device

    # ---- work split ---------------------------------------------------------------------

    def split(self, items: list, what: str = "prompts_per_step") -> list:
        """This rank's contiguous share of `items`; their count must divide evenly (every rank
        then runs as many forwards and backwards, which FSDP's collectives need)."""
        if len(items) % self.world_size:
            raise ValueError(
                f"config: {what} ({len(items)}) must be a multiple of the number of ranks "
                f"({self.world_size})"
            )
        share = len(items) // self.world_size
        return items[self.rank * share : (self.rank + 1) * share]

    def padded_share(self, items: list) -> tuple[list, int]:
        """(this rank's share of `items` padded to the same length on every rank, how many of
        them are real): uneven evaluation sets still give every rank as many generate calls."""
        if not self.active:
            return items, len(items)
        share = -(-len(items) // self.world_size)
        mine = items[self.rank * share : (self.rank + 1) * share]
        filler = mine[-1] if mine else items[0]
        return mine + [filler] * (share - len(mine)), len(mine)

    # ---- reductions ---------------------------------------------------------------------

    def _reduce(self, values: list[float], op) -> list[float]:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: list) -> list:
        """Element-wise sums over ranks (unchanged, same Python types, in a single process)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        return self._reduce([float(v) for v in values], dist.ReduceOp.SUM)

    def max(self, values: dict[str, float]) -> dict[str, float]:
        if not self.active:
            return values
        import torch.distributed as dist

        names = sorted(values)
        reduced = self._reduce([float(values[n]) for n in names], dist.ReduceOp.MAX)
        return {**values, **dict(zip(names, reduced))}

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a Ctrl-C seen by one rank)."""
        if not self.active:
            return flag
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def reduce_step_metrics(self, metrics, profile) -> None:
        """Make a StepMetrics and a PositionProfile (in place) those of the global batch: their
        token-weighted sums and weights are summed over ranks, so the means are token-weighted
        over every rank's tokens."""
        if not self.active:
            return
        self.reduce_metrics(metrics)
        self._sum_tensors(profile.sums)
        self._sum_tensors(profile.counts)

    def reduce_metrics(self, metrics) -> None:
        """A StepMetrics (in place) over every rank's tokens."""
        if not self.active:
            return
        names = TOKEN_METRIC_NAMES
        counts = [metrics.tokens, metrics.advantage_tokens, metrics.empty_overlap_rows]
        totals = [metrics.totals.get(name, 0.0) for name in names]
        present = [1.0 if name in metrics.totals else 0.0 for name in names]
        reduced = self.sum(counts + totals + present)
        metrics.tokens, metrics.advantage_tokens, metrics.empty_overlap_rows = reduced[:3]
        totals, present = reduced[3 : 3 + len(names)], reduced[3 + len(names) :]
        metrics.totals = {n: t for n, t, p in zip(names, totals, present) if p > 0}

    def _sum_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        import torch.distributed as dist

        names = sorted(tensors)
        if not names:
            return
        stacked = torch.stack([tensors[name].double().cpu() for name in names])
        dist.all_reduce(stacked)
        for name, row in zip(names, stacked):
            tensors[name] = row

    # ---- coordination -------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 alone and give every rank its result; an exception there is
        raised on every rank (same type and message), so no rank waits for the others."""
        if not self.active:
            return work()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except Exception as error:  # re-raised below, on every rank
                outcome = ("error", error)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def main_first(self, work: Callable[[], Any]) -> Any:
        """Rank 0 runs `work` first (e.g. building a shared cache), then the others."""
        if not self.active:
            return work()
        result = work() if self.is_main else None
        self.barrier()
        return result if self.is_main else work()

    # ---- the student --------------------------------------------------------------------

    def shard(self, model: torch.nn.Module, compute_dtype: torch.dtype, cpu_offload: bool):
        """FSDP2: fully_shard every decoder layer, then the root (which holds the embeddings
        and the tied output layer). On GPU the parameters are kept in fp32 and computed in
        `compute_dtype` (e.g. bf16) with fp32 gradient reduction. No-op in a single process."""
        if not self.active:
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options: dict[str, Any] = {}
        device = next(model.parameters()).device
        if device.type == "cuda" and compute_dtype != torch.float32:
            model.to(torch.float32)  # fp32 master weights; FSDP casts for compute
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=compute_dtype, reduce_dtype=torch.float32
            )
        if cpu_offload:
            if device.type != "cuda":
                raise ValueError(
                    "config: fsdp_cpu_offload needs GPU ranks (on CPU ranks the parameters "
                    "already live in CPU memory)"
                )
            options["offload_policy"] = CPUOffloadPolicy()
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(
                f"cannot shard {type(model).__name__}: no decoder layers found (its "
                "_no_split_modules names none of its modules)"
            )
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        register_root_call(model)
        return model

    def shard_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 for a frozen model used for forwards only (the teacher): every decoder layer
        and the root sharded over the ranks, gathered for each forward and resharded right
        after it, no gradients and no optimizer state. Its forwards are collectives: every
        rank must run as many. No-op in a single process."""
        if not self.active:
            return model
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ValueError(
                f"cannot shard the teacher {type(model).__name__}: no decoder layers found"
            )
        for layer in layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        register_root_call(model)
        return model

    def teacher_sharding(self, wanted: str, teacher_bytes: int, device: torch.device) -> str:
        """ "shard" or "replicate" for the config's teacher_sharding; auto shards (and says so)
        when one copy of the teacher would take more than a quarter of a rank's memory."""
        if wanted != "auto":
            return wanted
        if not self.active:
            return "replicate"
        memory = rank_memory_bytes(device, self.local_world_size)
        choice = "shard" if teacher_bytes > memory / 4 else "replicate"
        if self.is_main:
            print(
                f"teacher_sharding=auto: {choice} (the teacher's weights take "
                f"{teacher_bytes / 2**30:.2f} GiB, a rank has {memory / 2**30:.1f} GiB)",
                flush=True,
            )
        return choice

    def backward(self, scaled_loss: torch.Tensor) -> None:
        """Backward of a loss already divided by the GLOBAL token (or sequence) count. FSDP
        averages gradients over ranks; scaling by the world size makes that average the sum,
        i.e. the gradient of the global-batch loss."""
        if self.active:
            scaled_loss = scaled_loss * self.world_size
        scaled_loss.backward()

    def close(self) -> None:
        """Leave the process group (every rank calls it at the end)."""
        if self.active:
            shutdown()


def available_memory_bytes() -> int:
    """This machine's available RAM (MemAvailable), or its total where that is unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rank_memory_bytes(device: torch.device, local_ranks: int) -> int:
    """The memory one rank may use: its GPU's, or this machine's RAM shared by its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_ranks, 1)


def shutdown() -> None:
    """Every rank waits for the others, then the process group is destroyed: a rank that tore
    gloo down while a peer was still finishing its last collective could abort at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its _no_split_modules names)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units of `model` (root first, then its decoder layers); [] when not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def _unit_tensors(unit: torch.nn.Module, prefix: str, is_unit) -> Iterator[tuple[str, Tensor]]:
    """(state_dict name, tensor) of the parameters and persistent buffers `unit` holds itself,
    not those of the FSDP units inside it."""
    stack = [(prefix, unit)]
    while stack:
        path, module = stack.pop()
        for name, parameter in module.named_parameters(recurse=False):
            yield path + name, parameter
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield path + name, buffer
        stack.extend(
            (f"{path}{name}.", child)
            for name, child in reversed(list(module.named_children()))
            if not is_unit(child)
        )


def full_state_items(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of `model`'s whole state as state_dict names it, in `dtype` (default:
    as it is), without ever holding the whole model unsharded: under FSDP2 one unit (a decoder
    layer, or the root's own embeddings, norm and output layer) is gathered at a time, its
    tensors are yielded as copies, and it is resharded before the next. Every rank must
    consume the whole iterator (the gathers are collectives)."""
    units = fsdp_units(model)
    if not units:
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach()
            yield name, tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)
        return
    prefixes = {id(module): f"{name}." if name else "" for name, module in model.named_modules()}
    unit_ids = {id(unit) for unit in units}
    for unit in units:
        unit.unshard()
        try:
            for name, tensor in _unit_tensors(
                unit, prefixes[id(unit)], lambda m: id(m) in unit_ids
            ):
                # A copy: the gathered storage is freed when the unit reshards.
                yield name, tensor.detach().to(dtype or tensor.dtype, copy=True)
        finally:
            unit.reshard()


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Every FSDP2 unit of `model` gathered once for the block and kept gathered across its
    forwards (a rollout phase: otherwise each decoding step gathers every layer again), then
    resharded. The whole model is unsharded meanwhile. No-op for an unsharded model."""
    units = fsdp_units(model)
    if units:  # FSDP's lazy init sets each unit's resharding policy: run it before changing it
        units[0]._get_fsdp_state()._lazy_init()
    layers = [unit for unit in units if unit is not model]  # the root keeps its own policy
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)


def unsharded_bytes(model: torch.nn.Module) -> int:
    """The bytes `model`'s parameters take unsharded, in the dtype they compute in (FSDP2's
    mixed-precision param_dtype where it sets one)."""
    units = fsdp_units(model)
    compute = getattr(units[0]._get_fsdp_state()._mp_policy, "param_dtype", None) if units else None
    return sum(
        parameter.numel() * torch.empty((), dtype=compute or parameter.dtype).element_size()
        for parameter in model.parameters()  # a DTensor's numel is the whole parameter's
    )


def is_sharded(model: torch.nn.Module) -> bool:
    """True for an FSDP2-sharded model in a multi-rank job: its forwards are collectives, so
    every rank must run as many (Hugging Face's generate(synced_gpus=True))."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP2's sharded (DTensor) gradients:
    the norm of the full gradient, as a float, on every rank."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor: the partial norms all-reduced
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def teacher_url_for_rank(url: str | None, rank: int) -> str | None:
    """teacher_url may list several servers, comma-separated; rank r uses server r mod n."""
    if not url or "," not in url:
        return url
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"config: teacher_url lists no server: {url!r}")
    return servers[rank % len(servers)]


def torchrun_command(nproc_per_node: int, argv: list[str]) -> list[str]:
    """`opd-fast ARGV` on `nproc_per_node` ranks of this machine, through torchrun."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "opd_fast",
        *argv,
    ]


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Run `opd-fast ARGV` under torchrun (one node) and return its exit code. If a rank fails,
    torchrun stops the others and its report names the failed rank."""
    return subprocess.call(torchrun_command(nproc_per_node, argv))
