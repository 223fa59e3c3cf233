"""Training steps of the seed TT table for Nsight Compute (`ncu`): warm-up steps, then profiled ones.

Run under ncu by ``scripts/gpu_ncu.sh``; alone it just trains (useful to check the arguments):

    python3 scripts/ncu_tt_step.py --batch-size 4096 --pooling-factor 20 --steps 2

The ids are uniform over the table, the update is the fused SGD, as in
``benchmarks/bench_tt_embedding_bag.py``. The warm-up steps run between
``cudaProfilerStop``/``Start`` markers, so ``ncu --profile-from-start off`` sees only the
profiled steps.
"""

from __future__ import annotations

import argparse
import logging

import torch

from torchrec_tt import OptimType, TTEmbeddingBag

logger = logging.getLogger("ncu_tt_step")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-embeddings", type=int, default=11_000_000)
    ap.add_argument("--batch-size", "-B", type=int, default=4096)
    ap.add_argument("--pooling-factor", "-L", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("ncu_tt_step.py needs a GPU")
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    table = TTEmbeddingBag(
        args.num_embeddings, 64, tt_p_shapes=[200, 220, 250], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32],
        sparse=True, optimizer=OptimType.EXACT_SGD, learning_rate=0.01, include_last_offset=True, device=dev,
    )
    B, L = args.batch_size, args.pooling_factor
    offsets = torch.arange(0, B * L + 1, L, device=dev)
    grad = torch.randn(B, 64, device=dev)

    def step() -> None:
        ids = torch.randint(0, args.num_embeddings, (B * L,), device=dev)
        table(ids, offsets).backward(grad)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    logger.info("B=%d L=%d: %d warm-up + %d profiled steps done", B, L, args.warmup, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
