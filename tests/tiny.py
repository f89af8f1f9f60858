"""Tiny models made from configs plus a tokenizer trained locally: no downloads, seconds to build.

They go through exactly the same loading code as a hub model (a Hugging Face folder on disk).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "### Instruction:\nWhat is the opposite of hot?\n\n### Response:\ncold",
    "### Instruction:\nWhat day comes after Monday?\n\n### Response:\nTuesday",
    "### Instruction:\nIs 37 even or odd?\n\n### Input:\n37\n\n### Response:\nodd",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "user assistant system: Hello, how are you? I am fine, thank you. 0123456789",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(out: Path, vocab_size: int = 512, with_pad: bool = True):
    """Train a byte-level BPE tokenizer on CORPUS and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<|pad|>"] if with_pad else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>" if with_pad else None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, arch: str = "llama", vocab_size: int = 512, seed: int = 0, with_pad: bool = True) -> Path:
    """Save a tiny random-init causal LM of ``arch`` (llama, gpt2, qwen2, mistral, falcon) with a tokenizer."""
    import torch
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, vocab_size, with_pad=with_pad)
    v = len(tok)
    common = dict(vocab_size=v, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    hidden, layers, heads = 64, 2, 4
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                             tie_word_embeddings=False, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512,
                               **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    elif arch == "falcon":
        cfg = tf.FalconConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              new_decoder_architecture=False, multi_query=True, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
             ("old", "new"), ("wet", "dry"), ("hard", "soft"), ("happy", "sad"), ("early", "late")]


def alpaca_records(n_numbers: int) -> list[dict]:
    """A small learnable alpaca task: ten opposites, then even/odd for 0..n_numbers-1."""
    return [{"instruction": f"What is the opposite of {a}?", "input": "", "output": b} for a, b in OPPOSITES] + [
        {"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}
        for n in range(n_numbers)
    ]


def force_cpu_repack(monkeypatch) -> None:
    """Make bitsandbytes repack 4-bit weights for CPU inference on any CPU (docs/traps.md §1), as it does on one
    with AVX512-BF16, so a test of loraflow's switch (``quant.disable_cpu_repack``) can fail everywhere.

    ``Linear4bit.__init__`` sets ``support_avx512bf16_for_cpu = has_avx512bf16()`` (the name imported into
    ``bitsandbytes.nn.modules``), and ``Linear4bit.forward`` rewrites the weight in place into the CPU layout
    (``packing_format_for_cpu``) when that flag is set and the forward is on the CPU, in eval mode, without
    grad. With the probe forced, every 4-bit layer built afterwards repacks unless loraflow turns it off.
    Checks that the forced condition really makes a fresh layer repack: a bitsandbytes that decides
    otherwise fails here, not silently in the tests that rely on it.
    """
    import contextlib

    import bitsandbytes.nn.modules as bnb_modules
    import torch

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    layer = bnb_modules.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    assert layer.support_avx512bf16_for_cpu is True
    layer.eval()
    # The forward repacks first, then multiplies; the packed kernel itself may not run on this CPU.
    with contextlib.suppress(Exception), torch.no_grad():
        layer(torch.randn(1, 64))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "bitsandbytes no longer repacks"
