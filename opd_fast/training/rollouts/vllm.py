"""The `vllm` rollout engine: a vLLM engine colocated with the trainer (same process, same
device), sampling with the trainer's settings and refreshed with the student's weights after
every optimizer step.

- In process: vLLM's engine core runs in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING
  =0), so `sync_weights` hands the model's tensors to the worker's `reload_weights` (vLLM's
  in-place reload: its checkpoint-name mapping, fused layers and per-backend weight processing)
  through `LLM.collective_rpc`: an in-memory copy into the engine's parameters, no disk round
  trip, no serialisation. The prefix cache is reset after each sync (its KV entries belong to
  the old weights).
- Sampling: temperature, top-p, no top-k, no min-p, no repetition penalties, stop at the
  student's EOS ids, ids at or past the shared vocabulary never sampled (allowed_token_ids);
  one seed per request from the run's generator; vLLM's model generation defaults ignored.
- Log-probs: `processed_logprobs`, i.e. under the distribution vLLM sampled from (after the
  temperature, the top-p nucleus and the allowed ids), as the `hf` engine reports them.
- Memory: on a GPU the engine sleeps while the trainer works (level 1: weights offloaded to
  host memory, KV cache dropped) and wakes for each sampling; `sync_weights` wakes only the
  weights. vLLM's CPU backend has no sleep mode, so there the engine stays resident.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os

import torch

from opd_fast.training.lora import engine_state_items
from opd_fast.training.rollouts.base import EngineUnavailable, RolloutEngine, SamplingSettings
from opd_fast.training.rollouts.batch import RolloutBatch, pack

INSTALL_HINT = 'pip install "opd_fast[vllm]"'
# The share of a GPU's memory the engine may take (weights, activations and KV cache while it
# samples); the rest stays with the trainer. Sleep hands it back between rollouts.
GPU_MEMORY_FRACTION = 0.35


def import_vllm():
    """The vllm module, or EngineUnavailable naming the extra that installs it."""
    try:
        import vllm
    except ImportError as error:
        raise EngineUnavailable(
            f"rollout_engine 'vllm' needs vLLM, which is not installed here ({error}); "
            f"install the extra: {INSTALL_HINT} (on a CPU: tools/vllm_env.sh)"
        ) from None
    return vllm


def check_architecture(model_path: str, vllm) -> str:
    """The model's architecture if vLLM can run it, else EngineUnavailable naming it and
    pointing at the `hf` engine. Read from config.json, before any engine starts."""
    config_path = os.path.join(model_path, "config.json")
    try:
        with open(config_path) as handle:
            architectures = json.load(handle).get("architectures") or []
    except (OSError, ValueError) as error:
        raise EngineUnavailable(f"cannot read the model's config {config_path}: {error}") from None
    supported = set(vllm.ModelRegistry.get_supported_archs())
    usable = [name for name in architectures if name in supported]
    if not usable:
        raise EngineUnavailable(
            f"vLLM {vllm.__version__} cannot run the model at {model_path} (architectures "
            f"{architectures or 'not named in config.json'}); use rollout_engine: hf"
        )
    return usable[0]


@contextlib.contextmanager
def _trainer_threads_kept():
    """vLLM's CPU worker replaces torch.set_num_threads (it pins its own thread pool); in our
    process that would silently disable the trainer's thread settings, so undo it."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _distributed_state_kept(vllm):
    from vllm.v1.engine import core

    teardown = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *args, **kwargs: gc.collect()
    try:
        yield
    finally:
        core.cleanup_dist_env_and_memory = teardown


class VLLMEngine(RolloutEngine):
    name = "vllm"
    holds_weights = True
    seeded = True
    _live: list[VLLMEngine] = []  # engines of this process (they share vLLM's global state)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        model_path: str,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        gpu_memory_fraction: float = GPU_MEMORY_FRACTION,
    ):
        vllm = import_vllm()
        self.architecture = check_architecture(model_path, vllm)
        self.vllm, self.tokenizer = vllm, tokenizer
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.output_rows = model.get_output_embeddings().weight.shape[0]
        # The engine core must live in this process: weights are handed over in memory.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        options = dict(
            model=model_path,
            tokenizer=model_path,
            skip_tokenizer_init=True,  # token ids in and out; texts decoded by our tokenizer
            dtype=str(parameter.dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # not the model's sampling defaults
            enable_prefix_caching=True,
        )
        self.can_sleep = self.device.type == "cuda"
        if self.can_sleep:
            options.update(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_fraction)
        else:
            options.update(enforce_eager=True)  # no torch.compile on the CPU backend: faster start
        with _trainer_threads_kept():
            try:
                self.llm = vllm.LLM(**{k: v for k, v in options.items() if v is not None})
                # Some limits (e.g. the CPU attention's head sizes) only show at the first
                # forward: find them here, before training, not at the first rollout.
                self.llm.generate(
                    [{"prompt_token_ids": [0]}],
                    vllm.SamplingParams(max_tokens=1, detokenize=False),
                    use_tqdm=False,
                )
            except Exception as error:  # vLLM's own errors, with what we asked for
                self.__dict__.pop("llm", None)
                raise EngineUnavailable(
                    f"vLLM {vllm.__version__} cannot run the model at {model_path} "
                    f"({self.architecture}, {parameter.dtype}, {self.device}): "
                    f"{type(error).__name__}: {error}; use rollout_engine: hf"
                ) from error
        self.sleeping: set[str] = set()  # the memory tags that sleep ("weights", "kv_cache")
        VLLMEngine._live.append(self)
        self.sync_weights(model)  # the live weights (a resumed or fine-tuned student)

    # ---- weights and memory ------------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s parameters and buffers into the engine, in the engine's dtype (vLLM's
        load_weights maps Hugging Face names onto its fused layers), then drop the now stale
        prefix cache. A LoRA student's weights are merged (W + alpha/r * B @ A) under the base
        model's names (opd_fast.training.lora.engine_state_items). A sharded student is
        gathered one FSDP unit (a decoder layer) at a time, each unit's tensors consumed by vLLM
        before the next is gathered: the extra memory is one layer's full tensors, not the
        whole model."""
        self._wake(["weights"])
        moved = [0]

        def counted():
            for name, tensor in engine_state_items(model, self.dtype):
                moved[0] += tensor.numel() * tensor.element_size()
                yield name, tensor

        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": counted(), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.last_sync_bytes = moved[0]

    def sleep(self) -> None:
        if self.can_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = {"weights", "kv_cache"}

    def wake(self) -> None:
        self._wake(["weights", "kv_cache"])

    def _wake(self, tags: list[str]) -> None:
        tags = [tag for tag in tags if tag in self.sleeping]
        if tags:
            self.llm.wake_up(tags=tags)
            self.sleeping -= set(tags)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        VLLMEngine._live.remove(self)
        # An in-process engine's shutdown tears down vLLM's process-wide distributed state,
        # which the other live engines (the student's, when a cold start's teacher engine
        # closes) still use: then only this engine's own resources go.
        with _distributed_state_kept(self.vllm) if VLLMEngine._live else contextlib.nullcontext():
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- sampling ----------------------------------------------------------------------

    def sampling_params(self, settings: SamplingSettings, seed: int | None):
        limit = settings.vocab_limit
        return self.vllm.SamplingParams(
            n=1,
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(settings.eos_ids),
            ignore_eos=True,  # stop only at settings.eos_ids (vLLM's own EOS is the model's)
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            detokenize=False,
            allowed_token_ids=list(range(limit)) if limit and limit < self.output_rows else None,
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        settings: SamplingSettings,
        *,
        seeds: list[int] | None = None,
        example_index: list[int] | None = None,
    ) -> RolloutBatch:
        self.wake()
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        params = [
            self.sampling_params(settings, None if seeds is None else seeds[row])
            for row in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        sequences = []
        for ids, output in zip(prompt_ids, outputs):
            completion = output.outputs[0]
            response = list(completion.token_ids)
            log_probs = [
                float(step[token].logprob) for token, step in zip(response, completion.logprobs)
            ]
            finished = completion.finish_reason == "stop"
            sequences.append((list(ids), response, not finished, log_probs))
        return pack(
            sequences,
            self.tokenizer,
            self.device,
            example_index if example_index is not None else list(range(len(prompt_ids))),
        )

    def prompt_log_probs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) of every token t >= 1 of each sequence, from the
        engine's weights at temperature 1 (vLLM's prompt log-probs): what a test compares
        with the trainer's forward to see the weights really synced."""
        self.wake()
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompts = [{"prompt_token_ids": list(ids)} for ids in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [float(step[token].logprob) for token, step in zip(ids[1:], out.prompt_logprobs[1:])]
            for ids, out in zip(sequences, outputs)
        ]
