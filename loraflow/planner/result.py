"""The planner's typed results: what ``plan()`` returns and ``--json`` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GIB = 2**30
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Lint:
    """One piece of advice. ``id`` is stable (scripts and MLflow tags key on it)."""

    id: str
    level: Literal["warning", "info"]
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Device:
    """Where training would run: its memory and the FLOP/s the time estimate assumes."""

    name: str
    kind: Literal["gpu", "cpu"]
    memory_gib: float
    peak_tflops: float  # dense bf16 tensor-core peak (GPU) or an effective figure (CPU)
    mfu: float  # model FLOPs utilisation assumed against that peak
    source: str  # where memory_gib came from: --gpu-memory, torch.cuda, system RAM
    bf16: bool = False  # computes bf16 natively (a GPU; a CPU with AVX512-BF16 or AMX): what compute_dtype auto picks

    @property
    def effective_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu


@dataclass(frozen=True)
class Memory:
    """Peak training memory of one method, in bytes, by where it goes."""

    weights: float  # the model's weights as stored (16-bit, or 4-bit NF4 for QLoRA)
    trainable_state: float  # gradients and Adam states (and the adapters' fp32 weights)
    activations: float  # saved for backward, plus the fp32 logits of the loss
    workspace: float = 0.0  # QLoRA: one linear's weight dequantized to the compute dtype
    freed: float = 0.0  # full: gradients and activations never all alive at once (estimates.full_memory)
    allocator: float = 0.0  # CPU: freed blocks glibc's malloc keeps in its heap (estimates.cpu_allocator_bytes)
    runtime: float = 0.0  # CPU: the runtime's own first-step memory (kernels, thread pools; estimates.CPU_RUNTIME_BYTES)

    @property
    def total(self) -> float:
        return (self.weights + self.trainable_state + self.activations + self.workspace - self.freed
                + self.allocator + self.runtime)

    def gib(self) -> dict[str, float]:
        parts = asdict(self) | {"total": self.total}
        return {k: round(v / GIB, 3) for k, v in parts.items()}


@dataclass(frozen=True)
class DataSize:
    """How much the run trains on, and where each number came from."""

    train_records: int | None
    records_source: str
    tokens_per_record: float
    tokens_source: str
    test_records: int | None = None  # what evaluate and merge's logit check run through (None: unknown)


@dataclass(frozen=True)
class StageCosts:
    """What one method's adapter costs after training (``Plan.after_training``), in bytes and seconds.

    Peaks follow the training estimate's convention: on a CPU, the stage process's resident memory
    above what its imports hold (runtime terms included); on a GPU, evaluate's is device memory and
    merge's and register's host RAM (neither uses the GPU for its peak). See
    ``loraflow.planner.after_training``.
    """

    evaluate_peak: float  # evaluate: the base as trained (4-bit or compute dtype) + adapter + one batch
    merge_peak: float  # streaming merge (a few copies of the largest tensor), or the logit check when it runs
    merged_bytes: float  # the merged weights on disk: parameters x bytes of the merge.dtype output
    registered_bytes: float  # what register adds to the artifact store per version (register.log)
    merge_seconds: float  # the merge stage: streaming read/merge/write, + the logit check when it runs
    register_peak: float  # register: MLflow logging the folder (copied file by file, never loaded)

    def to_dict(self) -> dict[str, float]:
        return {
            "evaluate_peak_gib": round(self.evaluate_peak / GIB, 3),
            "merge_peak_gib": round(self.merge_peak / GIB, 3),
            "merged_gib": round(self.merged_bytes / GIB, 3),
            "registered_gib": round(self.registered_bytes / GIB, 3),
            "merge_seconds": round(self.merge_seconds, 1),
            "register_peak_gib": round(self.register_peak / GIB, 3),
        }


@dataclass(frozen=True)
class Plan:
    """Everything ``loraflow plan`` reports; ``to_dict()`` is the ``--json`` object."""

    base: str
    model_type: str
    params_total: int
    params_quantized: int  # linear weights stored in 4-bit by QLoRA
    params_matmul: int  # weights used in a matmul per token (linears and the LM head)
    targets: list[str]  # resolved target module suffixes, as peft's target_modules takes them
    target_roles: list[str]  # where the adapted modules sit: attention, mlp, other, head
    adapted_modules: int
    trainable_params: int
    trainable_pct: float
    device: Device
    memory: dict[str, Memory]  # full | lora | qlora
    method: str  # the method that would train: lora or qlora (auto resolved)
    method_reason: str
    fit_hint: str  # what would make the chosen method fit, when it does not ("" when it does)
    data: DataSize
    steps: int | None
    train_tokens: float | None
    seconds: dict[str, float | None]  # full | lora | qlora
    seq_len: int
    batch_size: int
    gradient_checkpointing: bool
    lints: list[Lint] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    mapped_bytes: float = 0.0  # CPU QLoRA: the checkpoint's pages a 4-bit load reads (file-backed; dropped after it)
    qlora_load_peak: float = 0.0  # QLoRA's train stage before its first step: load and kbit preparation (after_training.train_load_peak)
    after_training: dict[str, StageCosts] = field(default_factory=dict)  # lora | qlora: evaluate, merge, register
    merge_logit_check: bool = False  # merge would compare logits (merge.logit_check; auto: the fp32 model fits)

    @property
    def estimates_gib(self) -> dict[str, float]:
        return {m: round(self.memory[m].total / GIB, 3) for m in METHODS}

    def fits(self, method: str, headroom: float) -> bool:
        return self.memory[method].total <= headroom * self.device.memory_gib * GIB

    @property
    def warnings(self) -> list[Lint]:
        return [x for x in self.lints if x.level == "warning"]

    def to_dict(self) -> dict[str, Any]:
        from loraflow.planner.estimates import HEADROOM

        return {
            "base": self.base,
            "model_type": self.model_type,
            "params": {"total": self.params_total, "quantized": self.params_quantized, "matmul": self.params_matmul},
            "method": self.method,
            "method_reason": self.method_reason,
            "fit_hint": self.fit_hint,
            "device": asdict(self.device),
            "estimates_gib": self.estimates_gib,
            "breakdown_gib": {m: self.memory[m].gib() for m in METHODS},
            "mapped_checkpoint_gib": round(self.mapped_bytes / GIB, 3),
            "load_peak_gib": round((self.qlora_load_peak if self.method == "qlora" else 0.0) / GIB, 3),
            "fits": {m: self.fits(m, HEADROOM) for m in METHODS},
            "headroom": HEADROOM,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "targets": self.targets,
            "adapted_modules": self.adapted_modules,
            "trainable_params": self.trainable_params,
            "trainable_pct": self.trainable_pct,
            "data": asdict(self.data),
            "time": {
                "steps": self.steps,
                "tokens": self.train_tokens,
                "seconds": self.seconds,
                "effective_tflops": round(self.device.effective_flops / 1e12, 3),
            },
            "after_training": {m: c.to_dict() for m, c in self.after_training.items()},
            "merge_logit_check": self.merge_logit_check,
            "lints": [x.to_dict() for x in self.lints],
            "assumptions": self.assumptions,
        }
