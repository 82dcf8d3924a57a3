"""Hugging Face transformers with its own tensor parallelism
(``from_pretrained(DIR, tp_plan="auto")``), stock DTensor vs dtdispatch, bitwise (``make clients``;
see ``_harness.py``).

    torchrun --standalone --nproc-per-node 2 clients/hf.py [--configs native:on,off] [-k CASE]

Tiny random models are built from a config and saved once (rank 0, a temporary directory); every
run loads them with ``tp_plan="auto"``. Cases: several AdamW training steps with gradient clipping
(loss, gradient norms, every parameter and gradient each step) and greedy ``generate`` (tokens and
the logits of every new token), on an untied Llama and on models whose input embedding is tied to
the LM head.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from _harness import CaseFn, Harness, check_fast, param_records
from torch.distributed.tensor import DTensor

import dtdispatch

VOCAB = 512
SEQ = 16
BATCH = 2


def _models() -> dict[str, Any]:
    from transformers import Gemma2Config, LlamaConfig

    small = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return {
        "llama": LlamaConfig(**small),
        # Llama's plan shards the LM head: with tied embeddings the tied weight is that DTensor.
        "llama tied": LlamaConfig(**small, tie_word_embeddings=True),
        # Gemma 2 ties its embeddings by default.
        "gemma2 tied": Gemma2Config(**small, sliding_window=8),
    }


def _save(root: str, name: str, config: Any) -> str:
    """The model directory of ``name``: built from ``config`` with seed 0 and saved by rank 0."""
    from transformers import AutoModelForCausalLM

    path = f"{root}/{name.replace(' ', '-')}"
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    dist.barrier()
    return path


def _load(path: str, fast: bool) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
    if fast:
        dtdispatch.accelerate(model)
    return model


def _tokens(seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _tied(model: Any) -> dict[str, Any]:
    """Whether the input embedding and the LM head still share one Parameter object."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return {"tied": emb is head, "embedding is DTensor": isinstance(emb, DTensor)}


def train_case(path: str, steps: int) -> CaseFn:
    """AdamW (one param group per kind: torch's foreach kernels do not mix DTensor and Tensor),
    clipping per kind (stock's ``clip_grad_norm_`` raises on the mix), ``steps`` steps."""

    def run(fast: bool) -> Iterator[dict[str, Any]]:
        model = _load(path, fast)
        model.train()
        yield {**param_records(model, fast, grads=False), **_tied(model)}
        dt = [p for p in model.parameters() if isinstance(p, DTensor)]
        plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
        groups = [g for g in (dt, plain) if g]
        opt = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2)
        for step in range(steps):
            ids = _tokens(100 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            norms = {f"grad norm{' (plain)' if i else ''}": torch.nn.utils.clip_grad_norm_(g, 1.0)
                     for i, g in enumerate(groups)}
            opt.step()
            rec = {"loss": loss, **norms, **param_records(model, fast), **_tied(model)}
            opt.zero_grad()
            yield rec

    return run


def generate_case(path: str, new_tokens: int) -> CaseFn:
    """Greedy ``generate`` with the KV cache: the tokens, then each new token's logits as a step."""

    def run(fast: bool) -> Iterator[dict[str, Any]]:
        model = _load(path, fast)
        model.eval()
        check_fast(model, fast)
        ids = _tokens(7, batch=2, seq=6)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
        yield {"sequences": out.sequences}
        for logits in out.logits:
            yield {"logits": logits}

    return run


def main() -> int:
    h = Harness("hf")
    root = None
    if h.rank == 0:
        root = tempfile.mkdtemp(prefix="dtdispatch-hf-")
    holder = [root]
    dist.broadcast_object_list(holder, 0)
    root = holder[0]
    assert root is not None
    try:
        for name, config in _models().items():
            if not any(h.selected(f"{name} {c}") for c in ("train", "generate")):
                continue
            path = _save(root, name, config)
            h.case(f"{name} train", train_case(path, h.args.steps))
            h.case(f"{name} generate", generate_case(path, 6))
    finally:
        dist.barrier()
        if h.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    return h.finish()


if __name__ == "__main__":
    sys.exit(main())
