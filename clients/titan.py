"""torchtitan with its own tensor parallelism, stock DTensor vs dtdispatch, bitwise (``make
clients``; see ``_harness.py``).

    torchrun --standalone --nproc-per-node 2 clients/titan.py [--configs native:on,off] [-k CASE]

Built as torchtitan's trainer builds a model (its debug configs cut to 2 layers): on the meta
device, ``parallelize`` with its sharding configs on a tp=2 mesh, ``to_empty`` on the CPU,
``init_weights``; then its training step: ``ChunkedLossWrapper(CrossEntropyLoss)`` (loss parallel
on the vocabulary shards), its fused AdamW, its LR scheduler and its gradient clipping. Each step
records the loss, the gradient norm, the learning rate and every parameter and gradient.

torchtitan needs two runtime patches on a CPU machine, made here and not in site-packages: a
stand-in for its MoE kernels module (which imports triton at import time; dense models never call
it) and ``device_type = "cpu"`` where it copied "cuda" at import.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch
from _harness import CaseFn, Harness, param_records

import dtdispatch

SEQ = 16
BATCH = 2
LAYERS = 2


def _patch_torchtitan() -> None:
    """Make torchtitan importable and CPU-bound on a machine without triton or a GPU."""
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    stub = types.ModuleType(name, "stand-in: triton kernels of MoE expert parallelism")

    def kernel_stub(attr: str) -> Callable[..., NoReturn]:
        if attr.startswith("_"):
            raise AttributeError(attr)

        def kernel(*args: Any, **kwargs: Any) -> NoReturn:
            raise RuntimeError(f"{name}.{attr}: triton kernels are not available here")

        return kernel

    stub.__getattr__ = kernel_stub  # type: ignore[method-assign]
    sys.modules[name] = stub

    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tools_utils

    for module in (tools_utils, parallel_dims, dist_utils):
        module.device_type = "cpu"
        module.device_module = torch.cpu


def _model_config(family: str, *, sp: bool) -> Any:
    """A 2-layer debug model of ``family`` with causal SDPA and a short RoPE cache, sharding
    configs set for tensor parallel (sequence parallel when ``sp``)."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    if family == "llama3":
        from torchtitan.models.llama3 import llama3_configs
        from torchtitan.models.llama3.sharding import set_llama3_sharding_config

        cfg = llama3_configs["debugmodel"](attn_backend="flex")
        set_sharding = set_llama3_sharding_config
    elif family == "qwen3":
        from torchtitan.models.qwen3 import qwen3_configs
        from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

        cfg = qwen3_configs["debugmodel"](attn_backend="flex")
        set_sharding = functools.partial(set_qwen3_sharding_config, enable_ep=False)
    else:
        raise ValueError(family)
    cfg.layers = cfg.layers[:LAYERS]
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.attention.rope.max_seq_len = SEQ
    set_sharding(cfg, enable_sp=sp)
    return cfg


def _parallel_dims(backend: str) -> Any:
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.distributed import ParallelDims

    dist_utils.set_spmd_backend(backend)
    return ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1, world_size=2,
                        spmd_backend=backend)


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train_case(family: str, *, sp: bool = True, backend: str = "partial_dtensor",
               when: str = "after init", weight_tying: bool | None = None, steps: int = 3,
               loss: str = "chunked") -> CaseFn:
    """torchtitan's training step on ``family``; dtdispatch's ``accelerate`` runs ``when``:
    "after init" (after ``init_weights``) or "on meta" (after ``parallelize``, before ``to_empty``).
    ``loss``: "chunked" (its ``ChunkedLossWrapper``) or "torch loss_parallel" (the full forward,
    then ``F.cross_entropy`` on the Shard(-1) logits under torch's ``loss_parallel()``).
    ``weight_tying``: None keeps the config's (llama3 untied, qwen3 tied)."""

    def run(fast: bool) -> Iterator[dict[str, Any]]:
        import torchtitan.distributed.utils as dist_utils
        from torchtitan.components.loss import IGNORE_INDEX, ChunkedLossWrapper, CrossEntropyLoss
        from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
        from torchtitan.distributed import full_dtensor

        torch.autograd.set_multithreading_enabled(False)
        cfg = _model_config(family, sp=sp)
        if weight_tying is not None:
            cfg.enable_weight_tying = weight_tying
        if weight_tying is False and family == "qwen3":
            # Its tied debug model leaves the embedding's init to the LM head; untied, the
            # embedding takes qwen3's own embedding init (as its untied flavors do).
            import torchtitan.models.qwen3 as qwen3

            cfg.tok_embeddings.param_init = qwen3._EMBEDDING_INIT
        vocab = cfg.vocab_size
        pdims = _parallel_dims(backend)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = cfg.build()
        model.parallelize(pdims)
        if fast and when == "on meta":
            dtdispatch.accelerate(model)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        if fast and when == "after init":
            dtdispatch.accelerate(model)
        model.train()
        tied = {}
        if cfg.enable_weight_tying:
            tied["tied"] = model.tok_embeddings.weight is model.lm_head.weight
        yield {**param_records(model, fast, grads=False), **tied}

        if loss == "chunked":
            loss_fn = ChunkedLossWrapper.Config(
                loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab)).build()
            loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True
        optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
        schedulers = LRSchedulersContainer.Config(
            warmup_steps=2, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.0,
        ).build(optimizers=optimizers, training_steps=steps)
        for step in range(steps):
            optimizers.zero_grad()
            inputs, labels = _batch(step, vocab)
            valid = (labels != IGNORE_INDEX).sum()
            if backend == "full_dtensor":
                inputs, labels, _ = full_dtensor.parallelize_inputs(pdims, inputs, labels, {})
            if loss == "chunked":
                value, _ = loss_fn(model(inputs), labels, valid)
                value.backward()
            else:
                from torch.distributed.tensor.parallel import loss_parallel

                logits = model(inputs)
                with loss_parallel():
                    value = torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
                    ) / valid
                    value.backward()
            grad_norm = dist_utils.clip_grad_norm_(
                [p for p in model.parameters()], 1.0, foreach=True, pp_mesh=None, ep_enabled=False,
            )
            optimizers.step()
            schedulers.step()
            lrs = {f"lr {i}": g["lr"] for i, g in enumerate(optimizers.optimizers[0].param_groups)}
            yield {"loss": value.detach(), "grad norm": grad_norm, **lrs,
                   **param_records(model, fast), **tied}

    return run


def main() -> int:
    h = Harness("titan")
    _patch_torchtitan()
    steps = h.args.steps
    cases: dict[str, CaseFn] = {
        "llama3 sp": train_case("llama3", sp=True, steps=steps),
        "llama3 no-sp": train_case("llama3", sp=False, steps=steps),
        "llama3 sp, accelerate on meta": train_case("llama3", sp=True, when="on meta", steps=steps),
        "llama3 sp, torch loss_parallel": train_case("llama3", sp=True, loss="torch loss_parallel",
                                                     steps=steps),
        "llama3 sp, full_dtensor": train_case("llama3", sp=True, backend="full_dtensor",
                                              steps=steps),
        "llama3 no-sp, full_dtensor": train_case("llama3", sp=False, backend="full_dtensor",
                                                 steps=steps),
        "qwen3 tied sp": train_case("qwen3", sp=True, weight_tying=True, steps=steps),
        "qwen3 tied no-sp": train_case("qwen3", sp=False, weight_tying=True, steps=steps),
        # qwen3's RoPE is real (cos/sin), llama3's complex: these run the same training features
        # on a model without complex tensors or tied weights.
        "qwen3 untied sp": train_case("qwen3", sp=True, weight_tying=False, steps=steps),
        "qwen3 untied no-sp": train_case("qwen3", sp=False, weight_tying=False, steps=steps),
        "qwen3 untied sp, accelerate on meta": train_case(
            "qwen3", sp=True, weight_tying=False, when="on meta", steps=steps),
        "qwen3 untied sp, torch loss_parallel": train_case(
            "qwen3", sp=True, weight_tying=False, loss="torch loss_parallel", steps=steps),
        "qwen3 untied sp, full_dtensor": train_case(
            "qwen3", sp=True, weight_tying=False, backend="full_dtensor", steps=steps),
    }
    for name, fn in cases.items():
        h.case(name, fn)
    return h.finish()


if __name__ == "__main__":
    sys.exit(main())
