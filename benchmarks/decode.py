"""Decode: a llama-style tensor-parallel model generating token by token with a KV cache (batch 1),
local tensors vs stock DTensor vs dtdispatch, in tokens/s.

    python benchmarks/decode.py                      # world sizes 1 and 2 via torchrun
    python benchmarks/decode.py --world-sizes 1 --rounds 9

The model: token embedding, ``--layers`` blocks (RMSNorm, attention with a KV cache, RMSNorm,
SwiGLU MLP) and a head, parallelized as torchtitan does for inference (ColwiseParallel q/k/v and
w1/w3, RowwiseParallel wo and w2, a ColwiseParallel head with replicated output): the attention and
the cache run on each rank's local heads, the linears on DTensor parameters. Every generation is a
prompt of 8 tokens (one prefill) then ``--tokens`` greedy decode steps, under ``torch.no_grad()``.
"local" is the same model not parallelized (the whole model on every rank). Variants are
interleaved in rotating order in one process; reported: the median over rounds. Before timing,
stock's and dtdispatch's generated tokens must be identical. Output: benchmarks/results/decode.md
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("local", "stock", "dtdispatch")
PROMPT = 8


def _model(*, dim: int, heads: int, layers: int, hidden: int, vocab: int) -> Any:
    import torch
    import torch.nn.functional as F
    from _llama import FeedForward, RMSNorm
    from torch import nn

    head_dim = dim // heads

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in "qkvo")
            self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

        def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
            b, s, _ = x.shape
            # On each rank the local heads (ColwiseParallel hands out local tensors).
            q, k, v = (
                w(x).view(b, s, -1, head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
            )
            if pos == 0:
                self.cache = (k, v)
            else:
                assert self.cache is not None
                self.cache = (torch.cat([self.cache[0], k], 2), torch.cat([self.cache[1], v], 2))
            keys, values = self.cache
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=pos == 0)
            return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
            self.attention, self.feed_forward = Attention(), FeedForward(dim, hidden)

        def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
            h = x + self.attention(self.attention_norm(x), pos)
            return h + self.feed_forward(self.ffn_norm(h))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(Block() for _ in range(layers))
            self.norm = RMSNorm(dim)
            self.output = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
            h = self.tok_embeddings(tokens)
            for layer in self.layers:
                h = layer(h, pos)
            return self.output(self.norm(h))

    return Decoder()


def _plan(layers: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {"output": ColwiseParallel(output_layouts=Replicate())}
    for i in range(layers):
        for name in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "feed_forward.w1",
            "feed_forward.w3",
        ):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def _generate(model: Any, prompt: Any, tokens: int) -> list[int]:
    import torch

    out: list[int] = []
    with torch.no_grad():
        logits = model(prompt, 0)
        pos = prompt.shape[1]
        for _ in range(tokens):
            logits = logits.to_local() if hasattr(logits, "to_local") else logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(torch.tensor([[token]], device=prompt.device), pos)
            pos += 1
    return out


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    from _bootstrap import init_distributed
    from step import _interleaved
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import dtdispatch

    info = init_distributed()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    barrier = dist.barrier if info.world_size > 1 else (lambda: None)
    shape = {
        "dim": args.dim,
        "heads": 4,
        "layers": args.layers,
        "hidden": 2 * args.dim,
        "vocab": 512,
    }
    prompt = torch.randint(
        0, shape["vocab"], (1, PROMPT), generator=torch.Generator().manual_seed(0)
    ).to(info.device)
    models: dict[str, Any] = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = _model(**shape).to(info.device)
        if name != "local":
            parallelize_module(model, mesh, _plan(args.layers))
        if name == "dtdispatch":
            dtdispatch.accelerate(model)
        models[name] = model
    generated = {name: _generate(m, prompt, args.tokens) for name, m in models.items()}
    if generated["stock"] != generated["dtdispatch"]:
        raise SystemExit(
            f"tokens differ: stock {generated['stock']}, dtdispatch {generated['dtdispatch']}"
        )
    fns = {name: (lambda m=m: _generate(m, prompt, args.tokens)) for name, m in models.items()}
    ms = _interleaved(fns, args.rounds, 1, barrier)
    if info.rank == 0:
        result = {
            "world_size": info.world_size,
            "device": str(info.device),
            "torch": torch.__version__,
            "rounds": args.rounds,
            "tokens": args.tokens,
            "layers": args.layers,
            "dim": args.dim,
            "tokens_per_s": {n: args.tokens / (t / 1e3) for n, t in ms.items()},
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"decode_ws{info.world_size}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| world size | layers, dim | local tok/s | stock tok/s | dtdispatch tok/s | "
        "dtdispatch/stock time |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        tps = res["tokens_per_s"]
        lines.append(
            f"| {res['world_size']} ({res.get('device', 'cpu')}) | {res['layers']}, {res['dim']} | "
            f"{tps['local']:.0f} | "
            f"{tps['stock']:.0f} | {tps['dtdispatch']:.0f} | "
            f"{tps['stock'] / tps['dtdispatch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per generation")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    results = []
    for n in args.world_sizes:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--worker",
            "--rounds",
            str(args.rounds),
            "--tokens",
            str(args.tokens),
            "--layers",
            str(args.layers),
            "--dim",
            str(args.dim),
            "--out",
            args.out,
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads((Path(args.out) / f"decode_ws{n}.json").read_text()))
    table = _table(results)
    (Path(args.out) / "decode.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
