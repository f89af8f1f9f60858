"""The one typed config: built from params.yaml, then ``-s key=value`` overrides on top.

Every knob lives here with its default and meaning; stages never call ``cfg.get("x", 3)``.
Invalid values and unknown keys are rejected when the config is built, with one line that
names the file, line and key, and how to fix it.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraflow.core.errors import ConfigError

TARGET_PRESETS = ("attention-qv", "attention", "mlp", "all-linear")
EVAL_METRICS = ("loss", "perplexity", "exact_match", "token_f1")
# Metrics where a lower value is better; every other gate metric is higher-is-better.
LOWER_IS_BETTER = ("loss", "perplexity")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSection(Section):
    base: str = Field(
        "models/base",
        description="Local path (relative to params.yaml) or hub id of the base causal LM. "
        "The default is the embedded model that `loraflow build-base` makes on first use.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Only for models you trust."
    )
    allow_pickle: bool = Field(
        False,
        description="Also load pickle weights (pytorch_model.bin, adapter_model.bin) when a model or adapter has "
        "no safetensors. A pickle can run code when loaded: only for files you trust.",
    )


# The default base: the small model loraflow builds itself (loraflow/model/embedded.py), never downloaded.
EMBEDDED_BASE = ModelSection.model_fields["base"].default  # "models/base"


class DataSection(Section):
    path: str = Field(
        "data/raw/sample.jsonl",
        description="JSONL, JSON, CSV or Parquet file, a `save_to_disk` folder, or a hub dataset name.",
    )
    format: Literal["alpaca", "chat", "completion", "text", "auto"] = Field(
        "auto", description="Record format; auto detects it from the fields of the first record."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map a canonical field (instruction, input, output, messages, prompt, "
        "completion, text) to your column name, e.g. {prompt: question}.",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a DatasetDict folder.")
    val_fraction: float = Field(0.1, description="Share of records in the validation split.")
    test_fraction: float = Field(0.1, description="Share of records in the test split.")
    max_length: int = Field(256, description="Max tokens of prompt + answer + EOS.")
    max_record_bytes: int = Field(
        1_000_000,
        description="Largest record, in bytes of its JSONL line or of its rendered prompt + answer; a longer "
        "one is a bad record (too_long), never parsed or tokenized.",
    )
    seed: int = Field(0, description="Salt of the content hash that assigns records to splits.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad record (file:line); skip: drop and count it."
    )

    @field_validator("val_fraction", "test_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"must be a fraction in (0, 1), got {v}")
        return v

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"must be at least 8 tokens, got {v}")
        return v

    @field_validator("max_record_bytes")
    @classmethod
    def _max_record_bytes(cls, v: int) -> int:
        if v < 1024:
            raise ValueError(f"must be at least 1024 bytes, got {v}")
        return v

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> "DataSection":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves too little to train on; keep the sum below 0.9"
            )
        return self


class QuantizationSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base (QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for matmuls; auto picks for the device."
    )


class LoraSection(Section):
    r: int = Field(16, description="Rank: the adapter's capacity (8-16 simple tasks, 32-64 domain, 128+ broad).")
    alpha: float = Field(32, description="Scale: the update is multiplied by alpha/r (r=16, alpha=32 -> 2.0).")
    dropout: float = Field(0.05, description="Dropout on the adapter's input, in [0, 1).")
    target_modules: Union[Literal["attention-qv", "attention", "mlp", "all-linear"], list[str]] = Field(
        "attention-qv",
        description="Preset resolved against the model's own module names, or an explicit list of names.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError(f"must name at least one module, or a preset: {', '.join(TARGET_PRESETS)}")
        return v

    @property
    def scale(self) -> float:
        """alpha / r: how loudly the adapter speaks relative to the base."""
        return self.alpha / self.r


class TrainSection(Section):
    epochs: float = Field(1.0, description="Passes over the train split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 trains for `epochs`.")
    learning_rate: float = Field(2e-4, description="Peak learning rate of the adapter.")
    batch_size: int = Field(8, description="Examples per device step.")
    grad_accum: int = Field(1, description="Steps accumulated per optimizer update.")
    batching: Literal["auto", "padding_free", "group_by_length", "padded"] = Field(
        "auto",
        description="How a batch's examples are laid out. padding_free: end to end in one row, no padding, each "
        "example attending only to itself; group_by_length: padded, examples of similar length together; padded: "
        "shuffled and padded (a plain Trainer's way). auto: padding_free when the model keeps packed examples apart "
        "(checked before training: packed and padded examples must give the same loss), else group_by_length.",
    )
    warmup_ratio: float = Field(0.03, description="Share of steps spent warming up the learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(42, description="Seed of adapter init, dropout and data order.")
    save_steps: int = Field(50, description="Checkpoint every N steps; a re-run resumes from the last one.")
    logging_steps: int = Field(5, description="Log loss, learning rate and tokens/s every N steps.")
    resume: Literal["auto", "restart"] = Field(
        "auto",
        description="auto: resume the last checkpoint of the same setup; an interrupted run's checkpoint of another "
        "setup (data, base, method, LoRA or quantization config) is refused, a finished run's is replaced. "
        "restart: discard outputs/checkpoints and start at step 0.",
    )

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("batch_size", "grad_accum", "save_steps", "logging_steps")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


class EvalSection(Section):
    metrics: list[Literal["loss", "perplexity", "exact_match", "token_f1"]] = Field(
        default_factory=lambda: list(EVAL_METRICS), description="Metrics computed for base and tuned."
    )
    max_new_tokens: int = Field(32, description="Greedy generation budget per test prompt (stops at EOS).")
    num_samples: int = Field(200, description="Test records generated for exact match / token F1 (0 = all).")
    batch_size: int = Field(16, description="Prompts per forward/generation batch.")


class MergeSection(Section):
    base: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="dequantized: merge into the NF4 weights the adapter trained against, dequantized to "
        "full precision; original: merge into the original full-precision weights.",
    )
    tolerance: float = Field(
        1e-3, description="Max |merged - unmerged| logit difference of an fp32 merge before the stage fails; a "
        "16-bit merge is allowed its weights' rounding on top (8 x eps x max |logit|).")
    logit_check: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compare merged and unmerged logits on test examples (loads the model in fp32); auto: when it "
        "fits in memory. Every merged weight is checked on random vectors either way.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the merged weights; auto: the base's own (its config.json torch_dtype), so a bf16 "
        "base is not registered as fp32 at twice its size.",
    )


class RegisterSection(Section):
    model_name: str = Field("loraflow-demo", description="Registered model name in the MLflow registry.")
    gate_metric: Literal["loss", "perplexity", "exact_match", "token_f1"] = Field(
        "exact_match", description="Tuned metric a new version must improve to become champion."
    )
    min_delta: float = Field(0.0, description="Required improvement over the champion's gate metric.")
    log: Literal["merged", "adapter"] = Field("merged", description="Log the merged model or the adapter.")


class OrchestrationSection(Section):
    train_deployment: str | None = Field(
        None,
        description="Prefect deployment that trains (e.g. train/gpu); null trains in-process, "
        "unless the pipeline itself runs as a deployment (then train/gpu).",
    )
    train_timeout_s: int = Field(
        21600, description="Stop a training attempt after this many seconds (a Prefect timeout on the train task)."
    )
    retries: int = Field(
        2, description="Retries of transient failures (artifact up/downloads, registry calls, a crashed training)."
    )
    retry_delay_s: float = Field(10.0, description="First retry delay; it doubles with each retry.")

    @field_validator("train_timeout_s")
    @classmethod
    def _timeout(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive number of seconds, got {v}")
        return v

    @field_validator("retries")
    @classmethod
    def _retries(cls, v: int) -> int:
        if not 0 <= v <= 10:
            raise ValueError(f"must be between 0 and 10, got {v}")
        return v


with warnings.catch_warnings():
    # "register" is a contract section name; it shadows ABCMeta.register on the class only.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Config(Section):
        model: ModelSection = Field(default_factory=ModelSection)
        data: DataSection = Field(default_factory=DataSection)
        method: Literal["qlora", "lora", "auto"] = Field(
            "qlora", description="qlora: 4-bit NF4 frozen base; lora: 16/32-bit base; auto: lora when it fits."
        )
        quantization: QuantizationSection = Field(default_factory=QuantizationSection)
        lora: LoraSection = Field(default_factory=LoraSection)
        train: TrainSection = Field(default_factory=TrainSection)
        eval: EvalSection = Field(default_factory=EvalSection)
        merge: MergeSection = Field(default_factory=MergeSection)
        register: RegisterSection = Field(default_factory=RegisterSection)
        orchestration: OrchestrationSection = Field(default_factory=OrchestrationSection)

        def flat(self) -> dict[str, Any]:
            """Every key as a dotted name (``lora.r``): what MLflow params and DVC see."""
            return dict(_flatten(self.model_dump()))


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "fields":
            yield from _flatten(v, key + ".")
        else:
            yield key, v


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from ``path`` (params.yaml; None = defaults) and ``-s key=value`` overrides."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found; pass -c PATH to an existing params.yaml") from None
        try:
            raw = yaml.safe_load(text) or {}
            lines = _key_lines(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model:, data:, lora:, ...)")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, where, lines, overrides)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-s {item!r}: expected KEY=VALUE with a dotted key, e.g. -s lora.r=32")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"-s {item}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line number."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (str(k.value),)
                out[key] = k.start_mark.line + 1
                walk(v, key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All dotted keys the config accepts (sections and leaves)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, key + "."))
    return keys


def _explain(err: ValidationError, where: str, lines: dict[tuple[str, ...], int], overrides) -> str:
    """Turn the first pydantic error into one line: file:line: key: problem; fix."""
    e = err.errors()[0]
    loc = tuple(str(p) for p in e["loc"] if not str(p).startswith(("function-", "literal[")))
    # Union members add their own names to the location; keep the config path only.
    loc = tuple(p for p in loc if p not in ("str", "list[str]") and not p.startswith("list["))
    key = ".".join(loc) if loc else "(top level)"
    source = _source(loc, where, lines, overrides)
    if e["type"] == "extra_forbidden":
        guess = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
        if not guess:
            # Compare the last part with the siblings of its section (lora.rank -> lora.r).
            section = ".".join(loc[:-1])
            siblings = [k for k in valid_keys() if k.rsplit(".", 1)[0] == section and "." in k] or valid_keys()
            leaf = {k.rsplit(".", 1)[-1]: k for k in siblings}
            near = difflib.get_close_matches(loc[-1], list(leaf), n=1, cutoff=0.0) if loc else []
            guess = [leaf[near[0]]] if near else []
        hint = f"did you mean {guess[0]}?" if guess else "remove it"
        return f"{source}: unknown key {key}; {hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    got = e.get("input")
    if e["type"] not in ("value_error",) and not isinstance(got, dict) and got is not None:
        msg += f" (got {got!r})"
    return f"{source}: {key}: {msg}; fix it in params.yaml or with -s {key}=..."


def _source(loc: tuple[str, ...], where: str, lines: dict[tuple[str, ...], int], overrides) -> str:
    key = ".".join(loc)
    for item in overrides:
        okey = item.partition("=")[0].strip()
        if okey == key or okey.startswith(key + "."):
            return f"-s {item}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{where}:{lines[loc[:n]]}"
    return where


def reference_markdown(shipped: "Config | None" = None) -> str:
    """The README's config reference: every key, its default and meaning, from the schema itself.

    With ``shipped`` (the repo's params.yaml) a column shows the value tuned for the embedded model.
    """
    head = "| key | default | params.yaml | meaning |" if shipped else "| key | default | meaning |"
    rows = [head, "|---|---|---|" + ("---|" if shipped else "")]
    flat = shipped.flat() if shipped else {}

    def show(v: Any) -> str:
        text = "null" if v is None else yaml.safe_dump(v, default_flow_style=True).strip()
        return "`" + text.removesuffix("...").strip() + "`"

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            key = f"{prefix}{name}"
            default = field.get_default(call_default_factory=True)
            cells = [f"`{key}`", show(default)]
            if shipped:
                cells.append(show(flat[key]) if flat[key] != default else "")
            cells.append((field.description or "").replace("|", "\\|"))
            rows.append("| " + " | ".join(cells) + " |")

    walk(Config, "")
    return "\n".join(rows)
