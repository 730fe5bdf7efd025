"""One replica's engine settings, as an operator writes them (the `engine:` section of a
cluster config). The vLLM engine turns them into engine arguments (`engines.vllm.EngineSetup`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """One replica's engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["vllm", "sim"] = "vllm"  # sim: the simulated engine, stepping in real time
    model: str = "models/tiny-llama"
    served_model_name: str = "tiny-llama"
    random_weights: bool = True  # load_format=dummy: real compute, meaningless text (said in /v1/models)
    block_size: int = Field(32, ge=1)
    kv_blocks: int | None = Field(256, ge=2)  # num_gpu_blocks_override; None: sized by vLLM
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    prefix_caching: bool = True  # vLLM's default
    kv_cache_space_gib: float = Field(1.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE
    num_gpus: float = Field(0.0, ge=0)  # per replica, asked of Ray (1 on GPU nodes)
    latency_model: str = "tiny-llama-cpu"  # the policy's cost model and the simulated engine's step times (replicas.latency)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.kv_blocks is not None and (self.kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(f"kv_blocks={self.kv_blocks} of {self.block_size} tokens cannot hold one request of "
                             f"max_model_len={self.max_model_len}")
        return self
