"""A training step captured in a CUDA graph, replayed against the same step run eagerly.

Shared by the CUDA-kernel tests: capturing proves the step never synchronises with the host,
and bitwise-equal parameters after every replay prove the replayed kernels see the new ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def assert_graph_replay_matches_eager(
    step: Callable[[object, torch.Tensor], object],
    table: object,
    twin: object,
    params: Callable[[object], list[torch.Tensor]],
    ids_batches: Sequence[torch.Tensor],
) -> None:
    """Captures ``step(table, ids)`` once, replays it per batch next to ``step(twin, ids)``.

    Args:
        step: one training step (forward, backward, optimizer update) of a model on ids.
        table: the model captured in the graph.
        twin: the same model run eagerly; it must start equal to ``table``.
        params: every tensor a step changes (cores, optimizer state, cache), for a model.
        ids_batches: the batches, all of one shape; the first is also the warm-up batch.

    Both models are reset to the twin's state before the first replay (the warm-up step on a
    side stream, which sets allocator pools and shared-memory attributes outside the capture,
    trains the twin once), and after each batch their parameters must be bitwise equal.

    Example:
        >>> assert_graph_replay_matches_eager(step, table, twin, params, ids)  # doctest: +SKIP
    """
    start = [x.clone() for x in params(twin)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(twin, ids_batches[0])  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    static_ids = ids_batches[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(table, static_ids)
    for model in (table, twin):
        for dst, src in zip(params(model), start, strict=True):
            dst.copy_(src)
    for ids in ids_batches:
        static_ids.copy_(ids)
        graph.replay()
        step(twin, ids)
        torch.cuda.synchronize()
        for a, b in zip(params(table), params(twin), strict=True):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(params(table), start, strict=True)), "the steps changed nothing"
