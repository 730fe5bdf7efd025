"""One replica's engine settings: the `engine:` section of a cluster config, what the
benchmark and calibration start vLLM with (`engine_kwargs`), and the engine the simulator
models (`bench.simulate.SimSetup.engine`). The one place they are defined."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replicas.config import SchedulerConfig
from replicas.latency import RooflineLatencyModel, get_latency_model

if TYPE_CHECKING:
    from replicas.engine_settings import EngineSettings


class EngineConfig(BaseModel):
    """One replica's engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["vllm", "sim"] = "vllm"  # sim: the simulated engine, stepping in real time
    model: str = "models/tiny-llama"
    served_model_name: str = "tiny-llama"
    random_weights: bool = True  # load_format=dummy: real compute, meaningless text (said in /v1/models)
    block_size: int = Field(32, ge=1)  # the CPU attention backend needs a multiple of 32 (vLLM says so at start)
    kv_blocks: int | None = Field(256, ge=2)  # num_gpu_blocks_override (one is vLLM's null block); None: sized by vLLM
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    prefix_caching: bool = True  # vLLM's default; False is the setting of the runs before issue 10
    kv_cache_space_gib: float = Field(default=1.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE
    num_gpus: float = Field(0.0, ge=0)  # per replica, asked of Ray (1 on GPU nodes)
    latency_model: str = "tiny-llama-cpu"  # the policy's cost model and the simulated engine's step times (replicas.latency)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.kv_blocks is not None and (self.kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(f"kv_blocks={self.kv_blocks} of {self.block_size} tokens cannot hold one request of "
                             f"max_model_len={self.max_model_len} (vLLM keeps one block back)")
        if self.max_num_seqs > self.max_num_batched_tokens:  # vLLM refuses it: a step could not serve them all
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be <= "
                             f"max_num_batched_tokens={self.max_num_batched_tokens}")
        return self

    def with_(self, **changes) -> EngineConfig:
        """A copy with `changes`, validated (pydantic's model_copy(update=...) is not)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens)

    def usable_kv_blocks(self) -> int:
        """KV blocks requests can hold: vLLM keeps one of `kv_blocks` back as its null block;
        with `kv_blocks` None, as many as fit the latency model's GPU memory."""
        if self.kv_blocks is not None:
            return self.kv_blocks - 1
        model = get_latency_model(self.latency_model)
        if not isinstance(model, RooflineLatencyModel):
            raise ValueError(f"latency model {self.latency_model!r} does not know the GPU's memory: set kv_blocks")
        return model.kv_capacity_blocks(self.block_size)

    @property
    def model_dir(self) -> Path:
        return Path(self.model)

    def check_model(self) -> None:
        """Before starting vLLM (not at validation: the model may live only on the workers)."""
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"no model at {self.model} (config.json missing); build the local one with "
                             f"`cacheopt model build --out {self.model}`")

    def engine_kwargs(self, scheduler_cls: str, settings: EngineSettings) -> dict:
        """vLLM's engine arguments for these settings, with `scheduler_cls` deciding."""
        return {**self.stock_engine_kwargs(), "scheduler_cls": scheduler_cls,
                "additional_config": settings.as_additional_config()}

    def stock_engine_kwargs(self) -> dict:
        """The same engine with vLLM's own scheduler: what the baselines (a plain `vllm serve`,
        Ray Serve LLM; bench.baselines) run."""
        return dict(model=self.model, load_format="dummy" if self.random_weights else "auto",
                    dtype="float32" if self.random_weights else "auto",
                    max_model_len=self.max_model_len, block_size=self.block_size,
                    num_gpu_blocks_override=self.kv_blocks, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens, enable_prefix_caching=self.prefix_caching,
                    # async_scheduling left to vLLM: on by default on GPU (AsyncCacheOptScheduler), forced off on CPU
                    enable_chunked_prefill=True, disable_log_stats=True)


# The simulator's default engine, the paper's setting: Llama-3-8B on one H100 with vLLM's
# GPU defaults (block 16, 256 sequences, 8192 batched tokens), the cache sized from memory.
LLAMA3_8B_H100 = EngineConfig(kind="sim", model="meta-llama/Meta-Llama-3-8B", served_model_name="llama3-8b",
                              random_weights=False, block_size=16, kv_blocks=None, max_model_len=8192,
                              max_num_seqs=256, max_num_batched_tokens=8192, num_gpus=1,
                              latency_model="llama3-8b-h100")
