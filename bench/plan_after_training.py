"""What evaluate, merge and register cost after training, against ``loraflow plan``'s ``after_training``.

    python bench/plan_after_training.py                  # build /tmp/planner_cal, measure, table, JSON (~10 min)
    python bench/plan_after_training.py --cases L1-lora,L1-qlora --stages merge
    python bench/plan_after_training.py --from bench/results/plan_after_training-2026-12-08-cpu.json  # re-plan only

Models: random-init Llamas with a real 7B's widths (Llama-2-7B: hidden 4096, MLP 11008, 32 heads,
vocabulary 32000, untied head), 1 and 2 layers, saved as bfloat16 safetensors (what a 7B ships as),
with the embedded base's tokenizer (``models/base``; 1,024 tokens, so every id fits the vocabulary);
and the embedded base itself (844k parameters, fp32, tied embeddings), where the process's own
runtime is all there is. Adapters: peft's ``get_peft_model`` + ``save_pretrained`` (r=16, α=32, q and
v projections; one case on every linear), lora_B drawn at random so every merge changes the weights,
with the ``loraflow_train.json`` the train stage writes next to it (method, quantization, compute dtype).

Each case is a project folder (params.yaml, a test split, the adapter, an MLflow sqlite store with the
train run that ``reports/train.json`` names, as the train stage leaves them) and each stage runs as
``loraflow stage NAME`` in a fresh process, as ``dvc repro`` runs it. Measured: the process's peak RSS
(its own VmHWM: everything it held, imports included; not ``ru_maxrss``, which on Linux starts from
the parent's RSS at fork), its wall time, and from inside
(the child wraps the stage's functions, nothing else changes): RSS before the work (the imports),
the peak before merge's logit check, the time per kind of tensor (merge / NF4 round trip / copy) and
in the check; the merged folder's size and what register added to the artifact store. Peaks are
compared above each stage's imports: the VmHWM of a fresh process importing ``STAGE_IMPORTS`` of
``bench/scale_rehearsal.py`` (the same baseline that bench subtracts), as ``loraflow plan`` states them.
``plan`` is ``loraflow.planner.plan(cfg, paths).after_training[method]`` for the same project on this
machine (``--from`` plans a saved result again with the current planner, measuring nothing).

Test records are long (prompt + completion fill ``data.max_length``): evaluate's batches are then as
wide as the plan assumes. The logit-check cases use ``data.max_length: 32`` so their twelve fp32
forwards stay short; the check's peak is the models it loads, not the forwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock  # patch.dict: env set for a block, put back after

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MIB, GIB = 2**20, 2**30
SCRATCH = Path("/tmp/planner_cal")
# Llama-2-7B's widths; the layer count is the case's.
WIDTHS = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
          "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "attention-qv"}
EVAL = {"batch_size": 4, "num_samples": 4, "max_new_tokens": 4}
TEST_ROWS = 4  # one evaluate batch

# name: (model, method, target_modules, stages, extra settings, environment)
CASES: dict[str, tuple[str, str, str, tuple[str, ...], dict, dict]] = {
    "tiny-lora": ("embedded", "lora", "attention-qv", ("evaluate", "merge", "register", "register-adapter"), {}, {}),
    "tiny-qlora": ("embedded", "qlora", "attention-qv", ("evaluate", "merge"), {}, {}),
    "L1-lora": ("L1", "lora", "attention-qv", ("evaluate", "merge", "register", "register-adapter"),
                {"merge": {"logit_check": "off"}}, {}),
    "L1-qlora": ("L1", "qlora", "attention-qv", ("evaluate", "merge"), {"merge": {"logit_check": "off"}}, {}),
    "L2-lora": ("L2", "lora", "attention-qv", ("evaluate", "merge"), {"merge": {"logit_check": "off"}}, {}),
    "L2-qlora": ("L2", "qlora", "attention-qv", ("evaluate", "merge"), {"merge": {"logit_check": "off"}}, {}),
    "L1-lora-fp32": ("L1", "lora", "attention-qv", ("evaluate",), {}, {"LORAFLOW_CPU_BF16": "0"}),
    "L1-lora-all": ("L1", "lora", "all-linear", ("merge",), {"merge": {"logit_check": "off"}}, {}),
    "L1-qlora-fp32": ("L1", "qlora", "attention-qv", ("merge",), {"merge": {"logit_check": "off"}},
                      {"LORAFLOW_CPU_BF16": "0"}),
    "L1-lora-check": ("L1", "lora", "attention-qv", ("merge",), {"merge": {"logit_check": "on"},
                                                                 "data": {"max_length": 32}}, {}),
    "L1-qlora-check": ("L1", "qlora", "attention-qv", ("merge",), {"merge": {"logit_check": "on"},
                                                                   "data": {"max_length": 32}}, {}),
}


# ---------------------------------------------------------------------------------------------
# the child: one stage, as `loraflow stage NAME`, with its phases recorded


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def child(stage: str, params: str, record: str) -> int:
    """Run ``loraflow stage <stage> -c params`` in this process; write what happened inside to ``record``."""
    from loraflow.tasks import evaluate, merge

    from loraflow import cli
    from loraflow.model import streaming_merge as sm

    seen: dict = {"actions": {}}

    def timed(fn, name):
        def wrapper(*a, **k):
            seen[f"{name}_rss_before"] = _status()["VmRSS"]
            seen[f"{name}_hwm_before"] = _status()["VmHWM"]
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seen[f"{name}_seconds"] = time.perf_counter() - t
                seen[f"{name}_hwm_after"] = _status()["VmHWM"]
        return wrapper

    real_tensor = sm._Merger.tensor

    def tensor(self, item):
        t = time.perf_counter()
        out = real_tensor(self, item)
        a = seen["actions"].setdefault(item.action, {"n": 0, "numel": 0, "seconds": 0.0})
        a["n"] += 1
        a["numel"] += int(out.numel())
        a["seconds"] += time.perf_counter() - t
        return out

    sm._Merger.tensor = tensor

    def phase(module, name):  # seconds and RSS growth of each call, in order (the logit check's parts)
        real = getattr(module, name)

        def wrapper(*a, **k):
            before, t = _status(), time.perf_counter()
            out = real(*a, **k)
            seen.setdefault("phases", []).append({"name": name, "seconds": round(time.perf_counter() - t, 3),
                                                  "rss_before": before["VmRSS"], "hwm_after": _status()["VmHWM"]})
            return out
        setattr(module, name, wrapper)

    for name in ("dequantize_into", "_logits", "_latency_ms", "completion_loss", "load_tuned"):
        phase(merge, name)
    phase(merge.loading, "load_model")
    merge.merge_checkpoint = timed(merge.merge_checkpoint, "streaming")
    merge._check_logits = timed(merge._check_logits, "check")
    evaluate.load_tuned = timed(evaluate.load_tuned, "load")
    name = "register" if stage.startswith("register") else stage
    t = time.perf_counter()
    code = cli.main(["stage", name, "-c", params])
    seen["seconds"] = time.perf_counter() - t
    seen["hwm"] = _status()["VmHWM"]
    Path(record).write_text(json.dumps(seen))
    sys.stdout.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# the parent: models, adapters, projects, measurements, plans


def stage_imports() -> dict[str, list[str]]:
    """What each stage's process imports before it works: ``bench/scale_rehearsal.py``'s ``STAGE_IMPORTS``
    (so both benches subtract the same baseline), or this copy of it when that file is not there."""
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("scale_rehearsal", ROOT / "bench" / "scale_rehearsal.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return {k: list(module.STAGE_IMPORTS[k]) for k in ("evaluate", "merge", "register")}
    except Exception:  # noqa: BLE001 (any failure: fall back to the copy)
        cli = ["loraflow.cli", "loraflow.tasks.runner", "loraflow.track.tracking", "loraflow.track.lineage"]
        ml = ["mlflow", "mlflow.tracking", "sqlalchemy", "alembic", "pandas", "pyarrow", "scipy"]
        model = ["torch", "transformers", "transformers.models.llama.modeling_llama", "accelerate", "safetensors",
                 "peft", "bitsandbytes", "loraflow.model.loading", "loraflow.model.quant", "loraflow.model.adapters"]
        return {"evaluate": cli + ml + model + ["matplotlib", "loraflow.tasks.evaluate", "loraflow.model.generation"],
                "merge": cli + ml + model + ["loraflow.tasks.merge", "loraflow.model.streaming_merge"],
                "register": cli + ml + ["mlflow.pyfunc", "loraflow.tasks.register", "loraflow.track.registry",
                                        "loraflow.track.pyfunc_model"]}


def import_baselines(repeats: int = 2) -> dict[str, dict]:
    """Per stage: the peak RSS (VmHWM) of a fresh process that only imports what the stage imports; min of ``repeats``."""
    out = {}
    for name, modules in stage_imports().items():
        code = (f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        peaks = []
        for _ in range(repeats):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
            if done.returncode != 0:
                raise SystemExit(f"imports of {name} failed:\n{done.stderr[-2000:]}")
            peaks.append(int(done.stdout.split()[-1]) * 1024)
        out[name] = {"peak_rss": min(peaks), "modules": modules}
    return out


def build_model(name: str) -> Path:
    """A 7B-wide Llama of 1 or 2 layers (bf16 safetensors), or the embedded base; with the embedded tokenizer."""
    if name == "embedded":
        from loraflow.model.embedded import ensure_base

        base = ROOT / "models" / "base"
        ensure_base(base)
        return base
    out = SCRATCH / "models" / f"llama7bw-{name}"
    if (out / "config.json").exists():
        return out
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(ROOT / "models" / "base")
    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=int(name[1:]), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **WIDTHS)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (1.3 GB for 2 layers), saved as bf16
    try:
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")  # then random values, std 0.02 as transformers initialises
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_adapter(model_name: str, model_dir: Path, targets: str) -> Path:
    """peft's adapter on the meta-built model (r, α of LORA), lora_B random; no base weights needed to save it."""
    out = SCRATCH / "adapters" / f"{model_name}-{targets}"
    if (out / "adapter_config.json").exists():
        return out
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from loraflow.model.targets import resolve_targets

    config = tf.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    names = resolve_targets(model, targets)
    model = model.to_empty(device="cpu")  # uninitialised base: only the adapter is saved
    peft_model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                  target_modules=names, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
            elif "lora_B" in n:
                p.normal_(0.0, 0.01)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    tf.AutoTokenizer.from_pretrained(model_dir if (model_dir / "tokenizer.json").exists() else ROOT / "models" / "base"
                                     ).save_pretrained(tmp)
    (tmp / "targets.json").write_text(json.dumps(names))
    tmp.rename(out)
    return out


def make_project(case: str, model_dir: Path, adapter: Path, method: str, targets: str, extra: dict, env: dict) -> Path:
    """A project as the train stage leaves it: params.yaml, a test split, outputs/adapter, the train run."""
    from loraflow.core.atomic import write_json
    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.model import loading
    from loraflow.track import tracking

    root = SCRATCH / "projects" / case
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    params = {"model": {"base": str(model_dir)}, "method": method, "data": {"max_length": 128},
              "lora": dict(LORA, target_modules=targets), "eval": EVAL,
              "register": {"model_name": f"cal-{case}", "gate_metric": "loss"}}
    for k, v in extra.items():
        params[k] = {**params.get(k, {}), **v}
    (root / "params.yaml").write_text(json.dumps(params, indent=2) + "\n")  # JSON is YAML
    cfg = load_config(root / "params.yaml", [])
    paths = Paths.at(root)
    paths.prepared.mkdir(parents=True)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "Paris", "is", "the",
             "capital", "of", "France"]
    with open(paths.split("test"), "w") as fh:  # completions longer than max_length: batches as wide as planned
        for i in range(TEST_ROWS):
            text = " ".join(words[(i + j) % len(words)] for j in range(4 * cfg.data.max_length))
            fh.write(json.dumps({"id": str(i), "prompt": f"Repeat {i}:", "completion": text}) + "\n")
    shutil.copytree(adapter, paths.adapter, ignore=shutil.ignore_patterns("targets.json"))
    with mock.patch.dict(os.environ, env):  # what the train stage would have resolved in the stages' environment
        cdtype = loading.compute_dtype(cfg)
    write_json(paths.adapter / loading.ADAPTER_META, {
        "method": method, "base_model": cfg.model.base, "revision": None,
        "quantization": cfg.quantization.model_dump() if method == "qlora" else None,
        "compute_dtype": str(cdtype).removeprefix("torch."),
        "target_modules": json.loads((adapter / "targets.json").read_text()),
        "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "max_length": cfg.data.max_length})
    write_json(paths.report("prepare"), {"format": "completion", "dataset_digest": f"cal-{case}",
                                         "token_length": {"p50": cfg.data.max_length}})
    tracker = tracking.start_run(paths, cfg.register.model_name, f"train {case}")
    write_json(paths.report("train"), {"mlflow_run_id": tracker.run_id})
    tracking.finish(tracker, True)
    return root


def run_stage(root: Path, stage: str, env: dict) -> dict:
    """``loraflow stage`` in a fresh process: its peak RSS (wait4), wall time, and what it recorded inside."""
    if stage == "register-adapter":
        params = json.loads((root / "params.yaml").read_text())
        params["register"].update(log="adapter", model_name=params["register"]["model_name"] + "-adapter")
        (root / "params-adapter.yaml").write_text(json.dumps(params, indent=2) + "\n")
        config = root / "params-adapter.yaml"
    else:
        config = root / "params.yaml"
    artifacts = root / "mlflow" / "artifacts"
    before = _du(artifacts)
    record = root / f"record-{stage}.json"
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, str(config), str(record)], cwd=root,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{root.name} {stage} failed ({proc.returncode}):\n{out[-4000:]}")
    inside = json.loads(record.read_text())
    # The child's own high-water mark (VmHWM), not wait4's ru_maxrss: Linux carries the parent's RSS at
    # fork into the child's maxrss across exec, so a parent holding torch (~600 MiB) would be every child's floor.
    result = {"peak_rss": inside["hwm"], "wait4_maxrss": usage.ru_maxrss * 1024, "wall_seconds": round(wall, 2),
              "inside": inside,
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}
    if stage == "merge":
        result["merged_bytes"] = _du(root / "outputs" / "merged")
        result["safetensors_bytes"] = sum(f.stat().st_size for f in (root / "outputs" / "merged").glob("*.safetensors"))
    if stage.startswith("register"):
        result["registered_bytes"] = _du(artifacts) - before
        result["adapter_bytes"] = _du(root / "outputs" / "adapter")
    return result


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def plan_for(root: Path, env: dict) -> dict:
    """``loraflow plan``'s after_training for the project, as this machine plans it (same environment)."""
    from loraflow import planner
    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths

    with mock.patch.dict(os.environ, env):
        cfg = load_config(root / "params.yaml", [])
        p = planner.plan(cfg, Paths.at(root), with_lints=False)
        out = p.to_dict()["after_training"]
        raw = {m: {k: getattr(c, k) for k in c.__dataclass_fields__} for m, c in p.after_training.items()}
        adapter_cfg = load_config(root / "params.yaml", ["register.log=adapter"])
        raw_adapter = planner.plan(adapter_cfg, Paths.at(root), with_lints=False).after_training
        return {"gib": out, "bytes": raw, "registered_adapter_bytes": {m: c.registered_bytes for m, c in raw_adapter.items()},
                "logit_check": p.merge_logit_check}


# ---------------------------------------------------------------------------------------------
# the table


def rows_for(results: dict) -> list[dict]:
    """Measured against planned, per case and stage; peaks above the stage's imports (``results["imports"]``)."""
    base = {k: v["peak_rss"] for k, v in results["imports"].items()}
    rows = []
    for case, r in results["cases"].items():
        method = r["method"]
        if "bytes" not in r["plan"]:
            continue
        plan = r["plan"]["bytes"][method]
        for stage, m in r["stages"].items():
            kind = "register" if stage.startswith("register") else stage
            est = plan[{"evaluate": "evaluate_peak", "merge": "merge_peak", "register": "register_peak"}[kind]]
            rows.append({"case": case, "stage": stage, "what": "peak RSS above imports",
                         "measured": m["peak_rss"] - base[kind], "plan": est})
            if stage == "merge":
                rows.append({"case": case, "stage": stage, "what": "seconds", "measured": m["inside"]["streaming_seconds"],
                             "plan": plan["merge_seconds"]})
                rows.append({"case": case, "stage": stage, "what": "merged bytes", "measured": m["merged_bytes"],
                             "plan": plan["merged_bytes"]})
            if stage == "register":
                rows.append({"case": case, "stage": stage, "what": "registered bytes", "measured": m["registered_bytes"],
                             "plan": plan["registered_bytes"]})
            if stage == "register-adapter":
                rows.append({"case": case, "stage": stage, "what": "registered bytes", "measured": m["registered_bytes"],
                             "plan": r["plan"]["registered_adapter_bytes"][method]})
    for row in rows:
        row["error"] = round(row["plan"] / row["measured"] - 1, 3) if row["measured"] else None
    return rows


def show(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['machine']}; {meta['date']}; `{meta['command']}`", "",
             "| case | stage | what | measured | plan | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        def fmt(x, what=r["what"]):
            return f"{x:,.1f} s" if what == "seconds" else f"{x / MIB:,.1f} MiB"
        err = "-" if r["error"] is None else f"{r['error']:+.0%}"
        lines.append(f"| {r['case']} | {r['stage']} | {r['what']} | {fmt(r['measured'])} | {fmt(r['plan'])} | {err} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "PARAMS", "RECORD"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--stages", default="evaluate,merge,register,register-adapter")
    ap.add_argument("--from", dest="source", default=None, help="re-plan a saved result (no measuring)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    if args.source:
        results = json.loads(Path(args.source).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            for case, r in results["cases"].items():
                folder = Path(tmp) / case
                (folder / "model").mkdir(parents=True)
                (folder / "model" / "config.json").write_text(json.dumps(r["config"]))
                for name, text in r.get("model_files", {}).items():
                    (folder / "model" / name).write_text(text)
                params = dict(r["params"], model={"base": str(folder / "model")})
                (folder / "params.yaml").write_text(json.dumps(params))
                # what the planner reads of the project: the test split's size and prepare's token lengths
                (folder / "data" / "prepared").mkdir(parents=True)
                (folder / "data" / "prepared" / "test.jsonl").write_text('{"id": "0"}\n' * TEST_ROWS)
                (folder / "reports").mkdir()
                max_length = params.get("data", {}).get("max_length", 128)
                (folder / "reports" / "prepare.json").write_text(json.dumps({"token_length": {"p50": max_length}}))
                r["plan"] = plan_for(folder, r["env"])
            results.setdefault("imports", import_baselines())
        rows = rows_for(results)
    else:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        results = {"machine": _machine(), "date": date, "command": " ".join(["python", *sys.argv]),
                   "lora": LORA, "eval": EVAL, "widths": WIDTHS, "cases": {}}
        stages = args.stages.split(",")
        started = time.perf_counter()
        results["imports"] = import_baselines()
        for case in args.cases.split(","):
            model_name, method, targets, case_stages, extra, env = CASES[case]
            model_dir = build_model(model_name)
            adapter = build_adapter(model_name, model_dir, targets)
            root = make_project(case, model_dir, adapter, method, targets, extra, env)
            r = {"method": method, "model": model_name, "targets": targets, "env": env,
                 "params": json.loads((root / "params.yaml").read_text()),
                 "config": json.loads((model_dir / "config.json").read_text()),
                 "model_files": {f.name: f.read_text() for f in model_dir.iterdir()
                                 if f.name.startswith("tokenizer") or f.name == "chat_template.jinja"},
                 "stages": {}}
            for stage in case_stages:
                if stage not in stages:
                    continue
                m = run_stage(root, stage, env)
                r["stages"][stage] = m
                print(f"{case} {stage}: peak RSS {m['peak_rss'] / MIB:,.1f} MiB, {m['wall_seconds']} s "
                      f"[{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
            r["plan"] = plan_for(root, env)
            results["cases"][case] = r
        rows = rows_for(results)
    results["table"] = rows
    print(show(rows, results))
    out = ROOT / "bench" / "results" / f"plan_after_training-{results['date']}-cpu{'-' + args.tag if args.tag else ''}.json"
    from loraflow.core.atomic import write_json

    write_json(out, results)
    print(f"\nwrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram:.0f} GiB RAM, Linux {platform.release()}, "
            f"torch {torch.__version__}, bf16 {'native' if torch.cpu._is_avx512_bf16_supported() else 'emulated'}")


if __name__ == "__main__":
    sys.exit(main())
