"""2-GPU NCCL check of the sharded TT path: TW / RW / CW / mixed forward + fused steps vs unsharded.

    torchrun --nproc_per_node 2 scripts/gpu_dist_check.py            # NCCL on 2 GPUs
    torchrun --nproc_per_node 2 scripts/gpu_dist_check.py --device cpu --backend gloo   # same logic on CPU

Registers the pure-PyTorch fbgemm CUDA fallbacks first (only for ops without a CUDA
kernel), so it also runs with fbgemm-gpu-cpu. The oracle is the unsharded
TTEmbeddingBagCollection on the global batch with loss (1/W) * sum_r L_r and a textbook
optimizer update written here. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

TOL = 1e-4


def tables():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    from torchrec_tt import TTEmbeddingBagConfig

    return [
        TTEmbeddingBagConfig(name="t0", num_embeddings=6000, embedding_dim=16, feature_names=["f0", "f1"],
                             tt_p_shapes=[20, 15, 20], tt_q_shapes=[4, 2, 2], tt_ranks=[8, 8]),
        TTEmbeddingBagConfig(name="t1", num_embeddings=400, embedding_dim=16, feature_names=["f2"],
                             pooling=PoolingType.MEAN, tt_p_shapes=[4, 100], tt_q_shapes=[4, 4], tt_ranks=[6]),
        EmbeddingBagConfig(name="t2", num_embeddings=100, embedding_dim=16, feature_names=["f3"]),
    ]


ROWS = {"f0": 6000, "f1": 6000, "f2": 400, "f3": 100}


def make_kjt(seed, batch, lo, hi, device):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    per_feature = {}
    for f, n in ROWS.items():
        bags = []
        for _ in range(batch):
            length = int(torch.randint(0, 6, (1,), generator=g))
            bags.append(torch.randint(0, n, (length,), generator=g).tolist())
        per_feature[f] = bags
    for f in ROWS:
        for bag in per_feature[f][lo:hi]:
            values.extend(bag)
            lengths.append(len(bag))
    return KeyedJaggedTensor(keys=list(ROWS), values=torch.tensor(values, device=device),
                             lengths=torch.tensor(lengths, device=device))


def reference_step(ref, opt, lr, eps, state):
    with torch.no_grad():
        for p in ref.parameters():
            g = p.grad
            if opt == "exact_sgd":
                p -= lr * g
            elif opt == "exact_adagrad":
                s = state.setdefault(id(p), torch.zeros_like(p))
                s += g * g
                p -= lr * g / (s.sqrt() + eps)
            else:
                s = state.setdefault(id(p), torch.zeros(p.shape[0], device=p.device))
                s += (g * g).mean(dim=1)
                p -= lr * g / (s.sqrt() + eps).unsqueeze(1)
            p.grad = None


def check(plan_name, per_table, opt, rank, world, device, steps=3, batch=64):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_tt import TTEmbeddingBagCollection
    from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder

    lr, eps = 0.05, 1e-8
    torch.manual_seed(0)
    src = TTEmbeddingBagCollection(tables())
    torch.manual_seed(0)
    # Initialised on the CPU like `src` (the CUDA generator draws other numbers), then moved.
    ref = TTEmbeddingBagCollection(tables()).to(device)
    sharder = TTEmbeddingBagCollectionSharder(fused_params={"optimizer": opt, "learning_rate": lr, "eps": eps})
    plan = construct_module_sharding_plan(src, per_table, sharder=sharder, local_size=world, world_size=world,
                                          device_type=device.type)
    dmp = DistributedModelParallel(src, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
                                   plan=ShardingPlan({"": plan}), sharders=[sharder])
    gb, lo, hi = batch * world, rank * batch, (rank + 1) * batch
    state, err = {}, 0.0
    t0 = time.perf_counter()
    for step in range(steps + 1):
        out = dmp(make_kjt(step, gb, lo, hi, device)).wait().to_dict()
        ref_out = ref(make_kjt(step, gb, 0, gb, device)).to_dict()
        err = max(err, max(float((out[k] - ref_out[k][lo:hi]).detach().abs().max()) for k in out))
        if step == steps:
            break
        g = torch.Generator().manual_seed(100 + step)
        coef = {k: torch.randn(gb, 16, generator=g).to(device) for k in sorted(out)}
        sum((out[k] * coef[k][lo:hi]).sum() for k in sorted(out)).backward()
        (sum((ref_out[k] * coef[k]).sum() for k in sorted(ref_out)) / world).backward()
        reference_step(ref, opt, lr, eps, state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ok = err < TOL
    print(f"[rank {rank}] {plan_name:6s} {opt:24s} max|sharded - unsharded| = {err:.2e} "
          f"({'OK' if ok else 'FAIL'}, {time.perf_counter() - t0:.2f} s)", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default=None, help="nccl (cuda) or gloo (cpu) by default")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 comparison
    dist.init_process_group(args.backend or ("nccl" if args.device == "cuda" else "gloo"))
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from torchrec_tt.distributed import TT_COMPUTE_KERNEL as CK
    from torchrec_tt.distributed.fbgemm_cuda_fallback import register_fbgemm_cuda_fallbacks

    if args.device == "cuda":
        print(f"[rank {rank}] fbgemm CUDA fallbacks registered: {register_fbgemm_cuda_fallbacks()}", flush=True)
    plans = {
        "tw": {"t0": table_wise(rank=0, compute_kernel=CK), "t1": table_wise(rank=world - 1, compute_kernel=CK),
               "t2": table_wise(rank=0, compute_kernel=CK)},
        "rw": {t: row_wise(compute_kernel=CK) for t in ("t0", "t1", "t2")},
        "cw": {t: column_wise(ranks=list(range(world)), compute_kernel=CK) for t in ("t0", "t1", "t2")},
        "mixed": {"t0": row_wise(compute_kernel=CK), "t1": column_wise(ranks=list(range(world)), compute_kernel=CK),
                  "t2": table_wise(rank=world - 1, compute_kernel=CK)},
    }
    ok = True
    for name, plan in plans.items():
        for opt in ("exact_sgd", "exact_adagrad", "exact_row_wise_adagrad"):
            ok &= check(name, plan, opt, rank, world, device)
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    if rank == 0:
        print("gpu_dist_check:", "PASS" if bool(flag.item()) else "FAIL", flush=True)
    return 0 if bool(flag.item()) else 1


if __name__ == "__main__":
    sys.exit(main())
