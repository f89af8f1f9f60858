"""The embedded base model: a small Llama trained here, on the corpus that ships with loraflow.

``model.base: models/base`` (the default) needs no download: on first use
``loading.base_location`` calls :func:`ensure_base`, which builds the folder once and reuses it.

    loraflow build-base [--out models/base] [--steps N]

What it builds (~80 s on a 2-core CPU): a byte-level BPE tokenizer (digits split one per
token, ChatML chat template) and an 844k-parameter ``LlamaForCausalLM`` trained from scratch on
``loraflow/model/corpus/*.txt``: facts in plain prose ("The opposite of hot is cold.", "The capital of
Peru is Lima.") and on quiz sheets ("What is the plural of mouse?" / "mice"). The model knows
about half of the facts but has never seen an instruction format (its exact match on the sample
task is 0), so a LoRA fine-tune on ``data/raw/sample.jsonl`` (the same facts asked as alpaca
instructions) shows a real gain. Same seed and machine -> identical weights (checked for 1 and
2 torch threads too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.core import progress
from loraflow.core.atomic import atomic_dir
from loraflow.core.errors import ConfigError

if TYPE_CHECKING:  # heavy imports stay out of `loraflow --help`
    from transformers import PreTrainedTokenizerFast

    from loraflow.core.config import Config
    from loraflow.core.paths import Paths

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 1024

# Widths are multiples of 64: bitsandbytes' 4-bit CPU kernels need them (docs/traps.md §1).
# hidden 128, 3 layers, MLP 448 -> 3 x (4 x 128^2 + 3 x 128 x 448) = 713k weights in the blocks
# + 131k embeddings (tied with the head) = 844k. Against 4 layers x MLP 384 it steps ~15% faster
# and knew as many facts (52% vs 50%); hidden 256 at equal time knew far fewer (fewer steps).
ARCH: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=448,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)

# Training recipe, tuned by measurement on 2 cores (share of facts the model completes):
# - many small steps beat few big ones at equal tokens (an earlier corpus): batch 16 x 300 steps
#   25%, 8 x 600 54%, 4 x 1200 68%;
# - but tokens count too: 4 x 64 tokens x 1200 steps 15%, vs 4 x 128 x 900 steps 50%;
# - peak lr 2e-3 (47-52%, two seeds) beats 1e-3 (35%), 3e-3 (30%) and 5e-3 (11%).
# 4 x 128 = 512 tokens a step; the corpus is ~30k tokens, so 900 steps are ~15 passes at
# ~75 ms a step on one thread: ~70 s, most of the build.
SEQ_LEN = 128
BATCH_SIZE = 4
DEFAULT_STEPS = 900
LEARNING_RATE = 2e-3
WARMUP_STEPS = 20
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


def ensure_base(path: Path) -> Path:
    """Return ``path``; build the embedded base model there first if it has no ``config.json``."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    with _lock(path):
        if not (path / "config.json").exists():  # another process may have built it meanwhile
            print(f"loraflow: {path} is missing; building the embedded base model (~80 s, once)",
                  file=sys.stderr)
            build_base(path)
    return path


def build_base(out: Path, *, seed: int = 0, steps: int | None = None) -> Path:
    """Train the tokenizer and the model on the shipped corpus and save both to ``out``.

    ``steps`` optimizer steps (None: ``DEFAULT_STEPS``). Writes atomically: ``out`` is replaced
    only when everything is saved. The folder holds a standard Hugging Face model (safetensors),
    its tokenizer, ``README.md`` (model card) and ``build.json`` (seed, steps, losses).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ConfigError(f"build-base: --steps must be a positive integer, got {steps}")
    started = time.perf_counter()
    docs = read_corpus()

    tok = train_tokenizer(docs)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    config = base_config()
    got = (len(tok), tok.eos_token_id, tok.pad_token_id)
    if got != (config.vocab_size, config.eos_token_id, config.pad_token_id):
        raise RuntimeError(f"build-base: tokenizer (size, eos, pad) = {got} does not match base_config()")

    # One thread: these matmuls are tiny (512 x 128 x 384), so a second thread gains ~20% on an idle
    # box, loses 20-50% with OMP_WAIT_POLICY=PASSIVE (the CLI sets it) and 5x with spinning threads
    # on a busy one. Weights are identical with 1 or 2 threads (checked), so nothing else changes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # seed our init without touching the caller's RNG
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            losses = _train(model, ids, eos_id=tok.eos_token_id, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()

    n_params = sum(p.numel() for p in model.parameters())
    k = max(1, min(10, steps // 5))  # mean of the first and last k steps: less noisy than one step
    info = {
        "seed": seed,
        "steps": steps,
        "tokens_seen": steps * BATCH_SIZE * SEQ_LEN,
        "corpus_tokens": sum(len(x) + 1 for x in ids),
        "corpus_sha256": corpus_digest(),
        "params": n_params,
        "loss_start": sum(losses[:k]) / k,
        "loss_end": sum(losses[-k:]) / k,
        "losses": [round(x, 4) for x in losses],
        # no wall time here: build.json is part of the DVC output, and a rebuild with the same
        # seed must give the same bytes (timing is printed instead)
        "torch": torch.__version__,
        "torch_threads": 1,
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(info, config), encoding="utf-8")
    print(
        f"loraflow: built {out} ({n_params:,} params, {steps} steps, loss {info['loss_start']:.2f} -> "
        f"{info['loss_end']:.2f}, {time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
    )
    return out


def base_config():
    """The ``LlamaConfig`` that :func:`build_base` builds, without building (the planner reads it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        **ARCH,
    )


def read_corpus(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """The shipped corpus as documents (blank-line separated; '# ' comment lines dropped)."""
    from loraflow.model.corpus.generate import read_documents

    return read_documents(corpus_dir)


def corpus_digest(corpus_dir: Path = CORPUS_DIR) -> str:
    h = hashlib.sha256()
    for path in sorted(corpus_dir.glob("*.txt")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE) -> "PreTrainedTokenizerFast":
    """Byte-level BPE (any text encodes), one token per digit, ChatML template; eos = bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one per token ("137" -> 1 3 7): parity and successor are then learnable from the
    # last digit. Spaces stay glued to the next word (GPT-2 style): isolating them made every
    # word one spelling but cost 1.4x tokens, and the model learned far fewer facts in the
    # budget (measured 12% vs 37%); the corpus states answers at line starts instead.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _batches(ids: list[list[int]], eos_id: int, seed: int):
    """Endless (BATCH_SIZE, SEQ_LEN) blocks: each pass shuffles documents, joins them with EOS, cuts."""
    import torch

    rng = random.Random(seed)
    order = list(range(len(ids)))
    while True:
        rng.shuffle(order)
        stream = [t for i in order for t in ids[i] + [eos_id]]
        n = len(stream) // SEQ_LEN
        blocks = torch.tensor(stream[: n * SEQ_LEN]).view(n, SEQ_LEN)
        blocks = blocks[torch.tensor(rng.sample(range(n), n))]
        for b in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
            yield blocks[b : b + BATCH_SIZE]


def _train(model, ids: list[list[int]], *, eos_id: int, steps: int, seed: int) -> list[float]:
    """Plain AdamW loop (no Trainer: fewer moving parts, deterministic); returns per-step loss."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.95),
    )
    warmup = min(WARMUP_STEPS, max(1, steps // 10))

    def lr_at(step: int) -> float:  # linear warmup, cosine down to MIN_LR_RATIO of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    batches = _batches(ids, eos_id, seed)
    bar = progress.bar(total=steps, desc="build-base", unit="step")
    for _ in range(steps):
        x = next(batches)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"build-base: non-finite loss at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


def _model_card(info: dict, config) -> str:
    return f"""# loraflow embedded base model

A small `LlamaForCausalLM` built by `loraflow build-base` from the corpus that ships with
loraflow (`loraflow/model/corpus/*.txt`, generated by `python -m loraflow.model.corpus.generate`: facts in
plain prose and on quiz sheets, original text dedicated to the public domain, CC0 1.0). Nothing was downloaded.
It is a demo base for the sample LoRA/QLoRA fine-tune, not a general language model.

| | |
|---|---|
| parameters | {info['params']:,} |
| layers / hidden / MLP / heads | {config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size} / {config.num_attention_heads} |
| vocabulary | {config.vocab_size} (byte-level BPE, one token per digit, ChatML chat template) |
| seed | {info['seed']} |
| steps | {info['steps']} x {BATCH_SIZE} x {SEQ_LEN} tokens ({info['tokens_seen']:,} tokens; corpus {info['corpus_tokens']:,}) |
| loss | {info['loss_start']:.3f} (first steps) -> {info['loss_end']:.3f} (last steps) |
| corpus sha256 | `{info['corpus_sha256']}` |
| built with | one CPU thread, torch {info['torch']} |

Rebuild: `loraflow build-base --out models/base --steps {info['steps']}` (same seed and machine give
identical weights).
"""


@contextlib.contextmanager
def _lock(path: Path):
    """Serialize builds of one folder across processes (two stages starting at once build once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic_dir still keeps the folder whole
        yield
        return
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cli_build_base(out: str, steps: int | None) -> int:
    """``loraflow build-base``: build the embedded base model into ``out``; exit status 0."""
    build_base(Path(out), steps=steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="loraflow build-base", description="Build the embedded base model.")
    ap.add_argument("--out", default="models/base", help="output folder (default: models/base)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    args = ap.parse_args(argv)
    return cli_build_base(args.out, args.steps)


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------- DVC
# dvc.yaml's ``base`` stage owns the output ``models/base``. With the default ``model.base: models/base``
# it builds the embedded model there. With any other base (a hub id, a folder elsewhere) nothing is
# built: the stage writes ``models/base/REFERENCE.md`` naming the configured base, so the output DVC
# expects exists and says what it stands for. The stage lists ``params: [model.base]``, so switching
# back to the default re-runs it, and the embedded model is built again (``base_location`` builds
# whenever ``models/base/config.json`` is missing).

REFERENCE = "REFERENCE.md"


def write_base_reference(cfg: Config, paths: Paths) -> Path:
    """Replace ``models/base`` with a folder holding only ``REFERENCE.md``; return the file's path.

    The text names ``model.base`` and nothing else the stage does not list as a param, so the file
    never goes stale without DVC noticing.
    """
    from loraflow.core.config import EMBEDDED_BASE

    embedded = EMBEDDED_BASE
    target = paths.root / embedded
    with atomic_dir(target) as tmp:
        (tmp / REFERENCE).write_text(
            f"# {embedded}: not built\n\n"
            f"params.yaml sets `model.base: {cfg.model.base}`, so the stages load that model and the\n"
            f"embedded base model is not built here. This file stands in for the `{embedded}` output of\n"
            "dvc.yaml's `base` stage. Set `model.base` back to its default "
            f"(`{embedded}`) and run `dvc repro`\n"
            "to build the embedded model in this folder.\n",
            encoding="utf-8",
        )
    return target / REFERENCE
