"""The registered model as an MLflow pyfunc: the merged model, or the adapter on a pinned base.

``register`` logs this file "from code" (``mlflow.pyfunc.log_model(python_model=<this file>)``):
MLflow copies it into the model and runs it at load time, so it imports nothing from loraflow. A
consumer needs mlflow, torch and transformers (plus peft, and bitsandbytes for a QLoRA adapter).

``model_config`` (written by ``tasks/register.py``, readable in the MLmodel file):

    kind            merged | adapter
    format          alpaca | chat | completion | text: how a request becomes the prompt
    templates       alpaca's two templates, the very strings training rendered with (loraflow.data.formats)
    max_new_tokens  default generation length (a request may pass params={"max_new_tokens": N})
    base            adapter only: {location, source: local|hub, revision, sha256}; a local base is
                    verified against sha256 on load, a hub base is loaded at the pinned commit.
                    Load on another machine with model_config={"base_location": "/path/to/base"}.

Artifacts: ``model`` (the merged Hugging Face folder) or ``adapter`` (the adapter folder with its
tokenizer and ``loraflow_train.json``). Requests: a DataFrame / records with a ``prompt`` column
(alpaca: the instruction) and an optional ``input`` column, or a list of strings. Greedy decoding,
the new text only, cut at EOS: the same as the evaluate stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

import mlflow

TRAIN_META = "loraflow_train.json"  # loraflow.model.loading.ADAPTER_META (not imported: see above)
# (folder, names, sizes, mtimes) -> sha256: a serving process that loads the same base again hashes it once.
_SHA_CACHE: dict[tuple, str] = {}


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the ``*.safetensors`` files of a model folder (relative names and bytes, in order).

    Not ``loraflow.core.fingerprint``'s per-file hashes: this file is the logged model's code and runs
    where loraflow is not installed, so it imports nothing of loraflow.
    """
    folder = Path(folder)
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
    key = (str(folder.resolve()),) + tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


class LoraflowTextModel(PythonModel):
    """Text in, generated text out, for a merged model or an adapter on its base."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = dict(context.model_config or {})
        kind = self.config.get("kind", "merged")
        if kind == "merged":
            where = context.artifacts["model"]
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            self.model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True, dtype=torch.float32)
            if torch.cuda.is_available():
                self.model = self.model.to("cuda")
        elif kind == "adapter":
            from peft import PeftModel

            adapter = context.artifacts["adapter"]
            meta_file = Path(adapter) / TRAIN_META
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
            self.tokenizer = AutoTokenizer.from_pretrained(adapter)
            base = _load_base(self.config, meta)
            self.model = PeftModel.from_pretrained(base, adapter, is_trainable=False)
        else:
            raise ValueError(f"model_config kind={kind!r}: expected merged or adapter")
        if self.tokenizer.pad_token is None:  # as training did (loraflow.model.loading.ensure_pad_token)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()

    # -- requests ------------------------------------------------------------------------------

    def render(self, record: dict[str, Any]) -> str:
        """The prompt exactly as training rendered it (loraflow.data.formats.render_prompt)."""
        fmt = self.config.get("format", "completion")
        prompt = record.get("prompt", record.get("instruction"))
        if not isinstance(prompt, str):
            raise ValueError(f"each request needs a string 'prompt', got {record!r}")
        extra = record.get("input")
        if fmt == "alpaca":
            t = self.config["templates"]
            if isinstance(extra, str) and extra.strip():
                return t["with_input"].format(instruction=prompt, input=extra)
            return t["no_input"].format(instruction=prompt)
        if fmt == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        return prompt  # completion and text: the prompt as given

    # No type hints here: MLflow would read them as a second schema and warn; the signature is logged.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        records = _records(model_input)
        max_new = int((params or {}).get("max_new_tokens") or self.config.get("max_new_tokens", 32))
        return self.generate([self.render(r) for r in records], max_new)

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy, left-padded, new tokens only, cut at EOS (loraflow.model.generation.greedy_generate)."""
        import torch
        from transformers import GenerationConfig

        tok, model = self.tokenizer, self.model
        stop = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               eos_token_id=sorted(stop) or None, pad_token_id=pad)
        device = next(model.parameters()).device
        out: list[str] = []
        tok.padding_side = "left"
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                seqs = model.generate(**enc, generation_config=cfg)
                for tokens in seqs[:, enc["input_ids"].shape[1] :].tolist():
                    cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
                    out.append(tok.decode(tokens[:cut], skip_special_tokens=True).strip())
        return out


def _records(model_input: Any) -> list[dict[str, Any]]:
    """DataFrame, list of records, dict of columns, list of strings or one string -> records."""
    try:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            return [{k: v for k, v in r.items() if v is not None and v == v} for r in model_input.to_dict("records")]
        if isinstance(model_input, pd.Series):
            model_input = model_input.tolist()
    except ImportError:
        pass
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if isinstance(model_input, dict):
        cols = {k: v if isinstance(v, list) else [v] for k, v in model_input.items()}
        n = max(len(v) for v in cols.values())
        return [{k: v[i] for k, v in cols.items() if i < len(v)} for i in range(n)]
    return [r if isinstance(r, dict) else {"prompt": r} for r in list(model_input)]


def _load_base(config: dict[str, Any], meta: dict[str, Any]) -> Any:
    """The pinned base, loaded the way the adapter was trained (4-bit NF4 for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = config["base"]
    location = config.get("base_location") or base["location"]
    revision = base.get("revision") or None
    if base.get("source") == "local" or Path(location).exists():
        if not Path(location, "config.json").exists():
            raise FileNotFoundError(
                f"base model {location} (registered with this adapter) is not here; load with "
                "model_config={'base_location': '/path/to/base'}"
            )
        found = weights_sha256(location)
        if base.get("sha256") and found != base["sha256"]:
            raise ValueError(
                f"base model {location}: weights sha256 {found[:16]}... differ from the registered "
                f"{base['sha256'][:16]}...; the adapter was trained on other weights, point base_location at those"
            )
        revision = None  # a folder has no revisions
    kwargs: dict[str, Any] = {"revision": revision, "use_safetensors": True}
    quant = meta.get("quantization") if meta.get("method") == "qlora" else None
    compute = getattr(torch, str(meta.get("compute_dtype") or "float32"))
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["dtype"] = compute if compute != torch.float16 else torch.float32
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": 0}
    else:
        kwargs["dtype"] = compute
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if quant:
        # bitsandbytes repacks NF4 weights in place on an eval-mode CPU forward (docs/traps.md §1); the
        # evaluate stage turned that off, so the served model computes what was evaluated.
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    elif torch.cuda.is_available():
        model = model.to("cuda")
    return model


mlflow.models.set_model(LoraflowTextModel())
