"""One replica's engine settings: the `engine:` section of a cluster config, and what the
benchmark and calibration start vLLM with (`engine_kwargs`). The one place they are defined."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    kv_cache_space_gib: float = Field(1.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE
    num_gpus: float = Field(0.0, ge=0)  # per replica, asked of Ray (1 on GPU nodes)
    latency_model: str = "tiny-llama-cpu"  # the policy's cost model and the simulated engine's step times (replicas.latency)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.kv_blocks is not None and (self.kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(f"kv_blocks={self.kv_blocks} of {self.block_size} tokens cannot hold one request of "
                             f"max_model_len={self.max_model_len} (vLLM keeps one block back)")
        return self

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
        return dict(model=self.model, load_format="dummy" if self.random_weights else "auto",
                    dtype="float32" if self.random_weights else "auto",
                    max_model_len=self.max_model_len, block_size=self.block_size,
                    num_gpu_blocks_override=self.kv_blocks, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens, enable_prefix_caching=self.prefix_caching,
                    # async_scheduling left to vLLM: on by default on GPU (AsyncCacheOptScheduler), forced off on CPU
                    enable_chunked_prefill=True, scheduler_cls=scheduler_cls,
                    additional_config=settings.as_additional_config(), disable_log_stats=True)
