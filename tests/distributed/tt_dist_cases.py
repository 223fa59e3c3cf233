"""Shared pieces of the multi-process TT sharding tests (run inside spawned gloo workers).

The oracle is the *unsharded* ``TTEmbeddingBagCollection`` run on the global batch with loss
``(1/W) * sum_r L_r`` (torchrec's gradient division), and an optimizer written here from its
textbook formula (SGD / Adagrad / row-wise Adagrad), never the library's update code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

EPS = 1e-6


def tables(aligned: bool = True) -> list[Any]:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    from torchrec_tt.modules.tt_embedding_configs import TTEmbeddingBagConfig

    return [
        # two features on one table; P_2 = 10 divides the RW block 30; Q_2 = 4
        TTEmbeddingBagConfig(name="t0", num_embeddings=60 if aligned else 55, embedding_dim=8, feature_names=["f0", "f1"],
                             tt_p_shapes=[6, 5, 2], tt_q_shapes=[2, 2, 2], tt_ranks=[3, 2]),
        # MEAN, feature f1 shared with t0, 2 cores, p_2 = 10 divides the RW block 20; Q_2 = 2
        TTEmbeddingBagConfig(name="t1", num_embeddings=40, embedding_dim=8, feature_names=["f1", "f2"],
                             pooling=PoolingType.MEAN, tt_p_shapes=[4, 10], tt_q_shapes=[4, 2], tt_ranks=[3]),
        # plain table stored uncompressed
        EmbeddingBagConfig(name="t2", num_embeddings=20, embedding_dim=8, feature_names=["f3"]),
    ]


FEATURE_ROWS = {"f0": 59, "f1": 40, "f2": 40, "f3": 20}


def global_batch(seed: int, batch: int, weighted: bool) -> tuple[list[str], dict[str, list[list[int]]], dict[str, list[list[float]]]]:
    g = torch.Generator().manual_seed(1000 + seed)
    ids, wts = {}, {}
    for f, n in FEATURE_ROWS.items():
        bags, wb = [], []
        for _ in range(batch):
            length = int(torch.randint(0, 4, (1,), generator=g))
            bags.append(torch.randint(0, n, (length,), generator=g).tolist())
            wb.append((torch.rand(length, generator=g) + 0.5).tolist())
        ids[f], wts[f] = bags, wb
    return list(FEATURE_ROWS), ids, wts if weighted else {}


def make_kjt(keys: list[str], ids: dict[str, list[list[int]]], wts: dict[str, list[list[float]]], lo: int, hi: int) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values, lengths, weights = [], [], []
    for f in keys:
        for bag in ids[f][lo:hi]:
            values.extend(bag)
            lengths.append(len(bag))
        if wts:
            for bag in wts[f][lo:hi]:
                weights.extend(bag)
    return KeyedJaggedTensor(
        keys=keys, values=torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lengths, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32) if wts else None,
    )


def loss_coefficients(seed: int, names: list[str], batch: int, dim: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2000 + seed)
    return {n: torch.randn(batch, dim, generator=g) for n in sorted(names)}


def reference_update(param: Tensor, grad: Tensor, state: dict[int, Tensor], optimizer: str, lr: float, eps: float) -> None:
    """Textbook optimizer step on a dense (internal-layout) parameter; rows = slices."""
    with torch.no_grad():
        if optimizer == "sgd":
            param -= lr * grad
        elif optimizer == "adagrad":
            s = state.setdefault(id(param), torch.zeros_like(param))
            s += grad * grad
            param -= lr * grad / (s.sqrt() + eps)
        elif optimizer == "rowwise_adagrad":
            s = state.setdefault(id(param), torch.zeros(param.shape[0], dtype=param.dtype))
            s += (grad * grad).mean(dim=1)
            param -= lr * grad / (s.sqrt() + eps).unsqueeze(1)
        else:
            raise ValueError(optimizer)


def find_sharded(dmp: Any) -> Any:
    from torchrec_tt.distributed import ShardedTTEmbeddingBagCollection

    return next(m for m in dmp.modules() if isinstance(m, ShardedTTEmbeddingBagCollection))


def expected_local(ref_core: Tensor, shard: Any, k: int) -> Tensor:
    """The slice of a global internal-layout core a shard should hold (independent index arithmetic)."""
    if k != 0:
        return ref_core
    p, q, r = shard.global_p, shard.global_q, shard.ranks
    p_inner, q_inner = math.prod(p[1:]), math.prod(q[1:])
    a = shard.row_offset // p_inner
    end = shard.row_offset + shard.num_rows
    b = p[0] if end == shard.num_embeddings else math.ceil(end / p_inner)
    if shard.num_rows == 0:
        a = b = p[0]
    c, e = shard.col_offset // q_inner, (shard.col_offset + shard.num_cols) // q_inner
    return ref_core.reshape(p[0], q[0], r[1])[a:b, c:e].reshape(b - a, -1)


def ref_params(ref: Any, table: str) -> list[Tensor]:
    bag = ref.embedding_bags[table]
    return list(bag.tt_cores) if hasattr(bag, "tt_cores") else [bag.weight]


def build_dmp(rank: int, world_size: int, per_table: dict[str, Any], fused_params: dict[str, Any] | None,
              weighted: bool, in_backward: tuple[Any, dict[str, Any]] | None = None, seed: int = 0,
              qcomm_codecs_registry: Any = None, output_dtensor: bool = False, aligned: bool = True,
              table_configs: list[Any] | None = None) -> tuple[Any, Any]:
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_tt import TTEmbeddingBagCollection
    from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder

    torch.manual_seed(seed)
    src = TTEmbeddingBagCollection(table_configs or tables(aligned), is_weighted=weighted)
    if in_backward is not None:
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        apply_optimizer_in_backward(in_backward[0], src.embedding_bags.parameters(), in_backward[1])
    sharder = TTEmbeddingBagCollectionSharder(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
    plan = construct_module_sharding_plan(
        src, per_table, sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    if output_dtensor:
        env = ShardingEnv(world_size=world_size, rank=rank, pg=dist.group.WORLD, output_dtensor=True)
    else:
        env = ShardingEnv.from_process_group(dist.group.WORLD)
    dmp = DistributedModelParallel(src, env=env, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder])
    return dmp, plan


def reference_module(weighted: bool, seed: int = 0, aligned: bool = True) -> Any:
    from torchrec_tt import TTEmbeddingBagCollection

    torch.manual_seed(seed)
    return TTEmbeddingBagCollection(tables(aligned), is_weighted=weighted)


def train_and_compare(rank: int, world_size: int, dmp: Any, ref: Any, optimizer: str | None, lr: float, eps: float,
                      steps: int, weighted: bool, batch: int = 4) -> dict[str, float]:
    """Run ``steps`` steps on both; return max abs errors of forwards (and grads when not fused)."""
    errs = {"forward": 0.0, "grad": 0.0}
    state: dict[int, Tensor] = {}
    gb = batch * world_size
    lo, hi = rank * batch, (rank + 1) * batch
    for step in range(steps + 1):
        keys, ids, wts = global_batch(step, gb, weighted)
        out = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
        ref_out = ref(make_kjt(keys, ids, wts, 0, gb)).to_dict()
        assert sorted(out) == sorted(ref_out), (sorted(out), sorted(ref_out))
        for n in out:
            errs["forward"] = max(errs["forward"], float((out[n] - ref_out[n][lo:hi]).detach().abs().max()))
        if step == steps:
            break
        coef = loss_coefficients(step, list(out), gb, 8)
        loss = sum((out[n] * coef[n][lo:hi]).sum() for n in sorted(out))
        loss.backward()
        ref_loss = sum((ref_out[n] * coef[n]).sum() for n in sorted(ref_out)) / world_size
        ref.zero_grad()
        ref_loss.backward()
        sharded = find_sharded(dmp)
        if optimizer is None:
            for lookup in sharded._lookups:
                for shard in lookup.shards:
                    for k, core in enumerate(shard.cores):
                        want = expected_local(ref_params(ref, shard.table_name)[k].grad, shard, k)
                        errs["grad"] = max(errs["grad"], float((core.grad - want).abs().max()))
                        core.grad = None
            for p in ref.parameters():
                p.grad = None
            continue
        for p in ref.parameters():
            reference_update(p, p.grad, state, optimizer, lr, eps)
            p.grad = None
    return errs
