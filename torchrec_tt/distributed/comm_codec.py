"""Error-bounded, fixed-rate codecs for TorchRec's pooled-embedding all-to-all.

:class:`ErrorBoundedCommCodec` implements TorchRec's ``QuantizedCommCodec`` contract (duck-typed:
``encode``, ``decode``, ``calc_quantized_size``, ``quantized_dtype``, ``create_context``,
``padded_size``), so it plugs into ``qcomm_codecs_registry`` of
:class:`~torchrec_tt.distributed.TTEmbeddingBagCollectionSharder` and of torchrec's own
``EmbeddingBagCollectionSharder``. Build a registry with :func:`get_error_bounded_codecs_registry`
(or by knob name with :func:`make_comm_codecs_registry`).

**Wire format.** The flat float tensor is cut into blocks of ``block_size`` (K) consecutive
values. Each block is sent as a scale ``s`` (bfloat16, 2 bytes, for 4 and 8 bits; float32,
4 bytes, for 16 bits) followed by K signed integer codes of ``bits`` bits (two 4-bit codes per
byte), all packed into one ``uint8`` tensor (a dtype both gloo and NCCL carry). With
``Q = 2**(bits-1) - 1`` and ``m`` the block's largest finite magnitude,
``s = max(m / Q, 2**-126)`` (rounded *up* to bfloat16 for 4/8 bits) and ``code = round(x / s)``,
clamped to ``[-Q, Q]``; the spare code ``-(Q+1)`` marks a non-finite value. A block takes
``header + K * bits / 8`` bytes (K=32: 0.56 / 1.06 / 2.13 bytes per value at 4 / 8 / 16 bits,
against 4 for FP32 and 2 for FP16), so the wire size is a pure function of the input length
(``calc_quantized_size``), as TorchRec requires: sender and receiver compute the split
sizes independently. Blocks are independent, so a block-aligned split of the input is a
contiguous run of blocks of the output: encoding the concatenation of the per-rank chunks
equals concatenating their encodings (tested). Every all-to-all split (``B_r * D_j``
elements) must therefore be a multiple of K, which holds when K divides the per-rank batch
size or every table's (shard's) dimension; ``calc_quantized_size`` raises otherwise.

**Guarantee** (``x`` the float32 value sent, ``x_hat`` the value decoded, ``m`` the largest
finite ``|x|`` of its block, ``c = 1 + 2**-6`` the slack for float32 rounding inside
encode/decode, proved in :func:`block_error_bound`):

* every finite ``x``: ``|x_hat - x| <= c * max(m / (2Q), 2**-127)``
  (a bound relative to the block's own magnitude, i.e. to the values of that table and
  sample when K divides the table dimensions: 1/254 of the block maximum at 8 bits);
* hence an *absolute* bound ``eps``: ``|x_hat - x| <= eps`` for every finite value of every
  block whose ``m <= 2 * Q * eps / c`` (and ``eps >= c * 2**-127``). A fixed-rate code cannot
  promise ``eps`` for arbitrary inputs; blocks that exceed the range keep the relative
  bound above and are *counted* (device-side counter ``violations``, no host sync);
* ``NaN`` and ``+-inf`` decode to ``NaN`` at the same position (the sign of an infinity is not
  kept); they do not affect the scale, so the finite values of their block keep the bound;
  they are counted (``nonfinite``). Zeros (and all-zero blocks) decode to exact zeros.

**Adaptation, two levels.** *Table level*: every block carries its own scale, so each table's
values (each sample's slice of a table, when K divides the dims) are quantised on a step
proportional to their own magnitude -- the bound is scaled to that table's value statistics
without the codec needing the sharding layout (one codec serves every output dist of every
sharded module). *Iteration level*: the code width of each call comes from an
:class:`ErrorBoundPolicy`, advanced once per training step with ``policy.step(iteration)``
(rank-synchronous: all ranks must agree on the width, since it sets the split sizes):

* ``mode="fixed"``: a constant width;
* ``mode="rel"``: a relative bound ``r(t)`` from a :class:`BoundSchedule` (e.g. loose early,
  tight late); the width is the narrowest with ``c / (2Q) <= r(t)``;
* ``mode="abs"``: an absolute bound ``eps(t)`` from a schedule; a controller reads a sampled
  histogram of block magnitudes recorded on the device during encode, sums it over ranks
  (one small ``all_reduce`` every ``interval`` steps, the only host sync) and picks the
  narrowest width for which at most ``tolerance`` of the blocks would exceed ``eps(t)``.

Decisions are logged (``logging``, INFO when the width changes) and kept in
``policy.history``; ``policy.summary()`` reports the counters.

Reduce-scatter (row-wise / table-row-wise sharding) sums in the wire dtype, so this codec
(bytes with per-block scales) is not additive: the builders leave reduce-scatter to
TorchRec's FP16/BF16 codecs (``reduce_scatter="fp16"``) or uncompressed.

Example::

    >>> from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder
    >>> from torchrec_tt.distributed.comm_codec import get_error_bounded_codecs_registry
    >>> registry = get_error_bounded_codecs_registry(forward="eb8", backward="eb8", block_size=16,
    ...                                              device=torch.device("cpu"))
    >>> sharder = TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)
    >>> codec = registry["POOLED_EMBEDDINGS_ALL_TO_ALL"].forward
    >>> x = torch.randn(64)
    >>> wire = codec.encode(x)
    >>> wire.dtype, wire.numel() == codec.calc_quantized_size(64)
    (torch.uint8, True)
    >>> bool(((codec.decode(wire) - x).abs() <= block_error_bound(x, 8, 16)).all())
    True
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "BOUND_SLACK",
    "COMM_CODECS",
    "SUPPORTED_BITS",
    "BoundSchedule",
    "ErrorBoundPolicy",
    "ErrorBoundedCodecContext",
    "ErrorBoundedCommCodec",
    "abs_threshold",
    "bits_for_relative_bound",
    "block_bytes",
    "block_error_bound",
    "comm_codec_policies",
    "decode_blocks",
    "encode_blocks",
    "get_error_bounded_codecs_registry",
    "header_bytes",
    "make_comm_codecs_registry",
    "max_code",
    "quantized_numel",
    "relative_bound",
]

#: Code widths of the codec.
SUPPORTED_BITS: tuple[int, ...] = (4, 8, 16)
#: Relative slack ``c - 1`` of every bound for float32 rounding in encode/decode (see :func:`block_error_bound`).
BOUND_SLACK: float = 2.0**-6
#: Smallest block scale (the smallest normal float32): all-zero and subnormal blocks use it.
MIN_SCALE: float = 2.0**-126
#: Knob values of :func:`make_comm_codecs_registry` (``--comm_codec``).
COMM_CODECS: tuple[str, ...] = ("none", "fp16", "bf16", "eb4", "eb8", "eb16", "eb_adaptive")

# Magnitude histogram of the controller: 4 bins per octave over [2**-64, 2**64), from at most
# _HIST_SAMPLE blocks per call (a fixed-stride sample: static shapes, no host sync).
_HIST_BINS_PER_OCTAVE = 4
_HIST_MIN_EXP = -64
_HIST_MAX_EXP = 64
_HIST_BINS = (_HIST_MAX_EXP - _HIST_MIN_EXP) * _HIST_BINS_PER_OCTAVE
_HIST_SAMPLE = 4096
_MODES = ("fixed", "rel", "abs")
_FLOAT32_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------- arithmetic
def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def max_code(bits: int) -> int:
    """Largest code magnitude ``Q = 2**(bits-1) - 1`` (``-(Q+1)`` marks non-finite values).

    Args:
        bits (int): 4, 8 or 16.

    Returns:
        int: 7, 127 or 32767.
    """
    _check_bits(bits)
    # a power, not a shift: torch 2.11's dynamo fails to evaluate `1 << (bits - 1)` on a symbolic width
    return 2 ** (bits - 1) - 1


def header_bytes(bits: int) -> int:
    """Bytes of a block's scale: 2 (bfloat16) for 4 and 8 bits, 4 (float32) for 16 bits."""
    return 4 if bits == 16 else 2


def block_bytes(bits: int, block_size: int) -> int:
    """Bytes of one encoded block: ``header_bytes(bits) + block_size * bits / 8``."""
    return header_bytes(bits) + block_size * bits // 8


def quantized_numel(numel: int, bits: int, block_size: int) -> int:
    """Bytes on the wire for ``numel`` values: ``numel / K`` blocks of :func:`block_bytes` each.

    Args:
        numel (int): values to send (a multiple of ``block_size``).
        bits (int): code width.
        block_size (int): K.

    Returns:
        int: the ``uint8`` element count of the encoded tensor.

    Raises:
        ValueError: if ``numel`` is not a multiple of ``block_size``.
    """
    if numel % block_size:
        raise ValueError(
            f"ErrorBoundedCommCodec: {numel} values are not a whole number of blocks of {block_size}; every "
            "all-to-all split (batch per rank x dims) must be a multiple of block_size: pick a block_size "
            "that divides every table (shard) dimension or the per-rank batch size"
        )
    return numel // block_size * block_bytes(bits, block_size)


def relative_bound(bits: int) -> float:
    """The guaranteed error relative to the block maximum: ``c / (2Q)`` (8 bits: 0.00400).

    Args:
        bits (int): code width.

    Returns:
        float: ``(1 + BOUND_SLACK) / (2 * max_code(bits))``.
    """
    return (1.0 + BOUND_SLACK) / (2 * max_code(bits))


def abs_threshold(bits: int, error_bound: float) -> float:
    """Largest block magnitude for which ``bits`` guarantee the absolute bound: ``2 Q eps / c``.

    Args:
        bits (int): code width.
        error_bound (float): eps.

    Returns:
        float: the block maximum ``m`` up to which ``|x_hat - x| <= eps`` holds.
    """
    return 2 * max_code(bits) * error_bound / (1.0 + BOUND_SLACK)


def bits_for_relative_bound(rel: float, choices: Iterable[int] = SUPPORTED_BITS) -> int:
    """Narrowest width in ``choices`` whose relative bound is ``<= rel`` (the widest if none is).

    Args:
        rel (float): wanted error relative to the block maximum (e.g. 0.004).
        choices (iterable of int): allowed widths.

    Returns:
        int: the width.
    """
    options = sorted(choices)
    for b in options:
        if relative_bound(b) <= rel:
            return b
    return options[-1]


def block_error_bound(x: Tensor, bits: int, block_size: int) -> Tensor:
    """The guaranteed per-element error bound of the codec for ``x`` (the oracle of the tests).

    ``c * max(m / (2Q), 2**-127)`` with ``m`` the largest finite magnitude of the element's
    block, ``c = 1 + 2**-6``. Proof sketch (float32, unit roundoff ``u = 2**-24``): the
    scale ``s >= max(fl(m / Q), 2**-126)`` is normal and ``m <= Q s (1 + u)``; the quotient
    ``t = fl(x / s)`` is within ``u Q (1 + u)`` of ``x / s``; rounding (and the clamp to
    ``[-Q, Q]``) moves it by at most 1/2, so ``|q s - x| <= s (1/2 + u Q (1 + u))``; the decode
    product ``fl(q s)`` adds at most ``u Q s``. In all, ``|x_hat - x| <= (s / 2)(1 + 4 u Q + 4 u^2 Q)``.
    16 bits (float32 scale): ``s <= (m / Q)(1 + u)`` and ``4 u Q < 2**-7``. 4 and 8 bits
    (scale rounded up to bfloat16): ``s <= (m / Q)(1 + u)(1 + 2**-7)`` and ``4 u Q < 2**-15``.
    Both products stay below ``c``, so ``|x_hat - x| <= c * max(m / (2Q), 2**-127)``.

    Args:
        x (Tensor): the values sent (any shape; flattened, then cut into blocks).
        bits (int): code width.
        block_size (int): K.

    Returns:
        Tensor: float64, same shape as ``x``; ``inf`` where ``x`` is not finite (no bound).
    """
    flat = x.detach().reshape(-1, block_size).to(torch.float64)
    finite = torch.isfinite(flat)
    m = torch.where(finite, flat.abs(), torch.zeros_like(flat)).amax(dim=1, keepdim=True)
    bound = torch.clamp(m / (2 * max_code(bits)), min=2.0**-127) * (1.0 + BOUND_SLACK)
    bound = bound.expand_as(flat).clone()
    bound[~finite] = math.inf
    return bound.reshape(x.shape)


# ----------------------------------------------------------------------------- kernels
def encode_blocks(x: Tensor, bits: int, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Encode ``x`` (any float dtype, numel a multiple of ``block_size``) into the wire format.

    Pure tensor code with static shapes (no host sync; ``torch.compile(fullgraph=True)`` works).
    The per-block scales are dtype-viewed as a 1-D tensor: inductor may give the ``(n, 1)``
    column a last-dim stride other than 1, which its dtype view refuses.

    Args:
        x (Tensor): values; converted to float32.
        bits (int): 4, 8 or 16.
        block_size (int): K (even for 4 bits).

    Returns:
        tuple: ``(payload, absmax, nonfinite)``: the 1-D ``uint8`` payload of
        ``quantized_numel(x.numel(), bits, block_size)`` bytes, the per-block largest finite
        magnitude ``(x.numel() / K,)`` float32, and the count of non-finite values (0-dim int64).
    """
    q_max = max_code(bits)
    sentinel = -q_max - 1
    xb = x.reshape(-1, block_size).to(torch.float32)
    absmax = xb.abs().nan_to_num_(nan=0.0, posinf=0.0).amax(dim=1, keepdim=True)  # finite values only
    scale = torch.clamp(absmax / q_max, min=MIN_SCALE)
    if bits == 16:
        header = scale.reshape(-1).view(torch.uint8).reshape(-1, 4)
    else:  # round the (positive, normal) scale up to the next bfloat16: clear the low 16 bits, carrying up
        scale = ((scale.view(torch.int32) + 0xFFFF) & -65536).view(torch.float32)
        header = scale.reshape(-1).to(torch.bfloat16).view(torch.uint8).reshape(-1, 2)  # exact: low half zero
    # finite x: |x / s| <= Q (to rounding), so the clamp only catches the sentinel; NaN / +-inf -> sentinel
    q = torch.nan_to_num(torch.round(xb / scale), nan=sentinel, posinf=sentinel, neginf=sentinel)
    q = q.clamp_(sentinel, q_max)
    nonfinite = torch.count_nonzero(q == sentinel)
    if bits == 8:
        codes = q.to(torch.int8).view(torch.uint8)
    elif bits == 16:
        codes = q.to(torch.int16).view(torch.uint8)
    else:
        u = (q + 8).to(torch.uint8)
        codes = u[:, 0::2] | (u[:, 1::2] << 4)
    payload = torch.cat([header, codes], dim=1).reshape(-1)
    return payload, absmax.reshape(-1), nonfinite


def decode_blocks(payload: Tensor, bits: int, block_size: int) -> Tensor:
    """Decode a ``uint8`` payload of whole blocks (any concatenation of encoded chunks).

    Args:
        payload (Tensor): 1-D ``uint8``, a multiple of ``block_bytes(bits, block_size)`` bytes.
        bits (int): code width used by the sender.
        block_size (int): K used by the sender.

    Returns:
        Tensor: 1-D float32 values (``NaN`` where a non-finite value was sent).
    """
    q_max = max_code(bits)
    head = header_bytes(bits)
    rows = payload.reshape(-1, block_bytes(bits, block_size))
    scale = rows[:, :head].contiguous().view(torch.float32 if bits == 16 else torch.bfloat16).to(torch.float32)
    codes = rows[:, head:].contiguous()
    if bits == 8:
        q = codes.view(torch.int8)
    elif bits == 16:
        q = codes.view(torch.int16)
    else:
        q = torch.stack([codes & 15, codes >> 4], dim=2).reshape(rows.shape[0], block_size).to(torch.int8) - 8
    out = (q.to(torch.float32) * scale).clamp_(-_FLOAT32_MAX, _FLOAT32_MAX)  # q * s may pass FLT_MAX by < 1%
    return out.masked_fill_(q == -q_max - 1, math.nan).reshape(-1)


# ----------------------------------------------------------------------------- policy
@dataclass
class BoundSchedule:
    """An error bound as a function of the training iteration.

    ``kind``: ``constant`` (``start``), ``linear`` (``start`` to ``end`` over ``steps``, then
    ``end``), ``exp`` (geometric interpolation, same ends) or ``step`` (``start`` before
    ``steps``, ``end`` from then on).

    Args:
        start (float): bound at iteration 0.
        end (float, optional): final bound (default ``start``).
        steps (int): length of the transition.
        kind (str): ``constant``, ``linear``, ``exp`` or ``step``.

    Example::

        >>> s = BoundSchedule(start=0.07, end=0.004, steps=100, kind="exp")  # loose early, tight late
        >>> round(s(0), 3), round(s(50), 4), s(1000)
        (0.07, 0.0167, 0.004)
    """

    start: float
    end: float | None = None
    steps: int = 0
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "exp", "step"):
            raise ValueError(f"BoundSchedule.kind must be constant, linear, exp or step, got {self.kind!r}")
        if self.end is None:
            self.end = self.start
        if self.start <= 0 or self.end <= 0 or self.steps < 0:
            raise ValueError(f"BoundSchedule needs start, end > 0 and steps >= 0, got {self}")

    def __call__(self, iteration: int) -> float:
        end = float(self.end)  # type: ignore[arg-type]
        if self.kind == "constant":
            return self.start
        if self.kind == "step" or self.steps == 0:
            return self.start if iteration < self.steps else end
        frac = min(max(iteration / self.steps, 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (end - self.start) * frac
        return self.start * (end / self.start) ** frac

    @classmethod
    def from_spec(cls, spec: BoundSchedule | Mapping[str, Any] | float) -> BoundSchedule:
        """A schedule from a number (constant), a mapping of the fields, or a schedule."""
        if isinstance(spec, BoundSchedule):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        return cls(start=float(spec))


class ErrorBoundPolicy:
    """Chooses the code width of each all-to-all call and collects the codec's statistics.

    Call :meth:`step` once per training iteration on every rank (the width sets the split
    sizes, so all ranks must agree; the controller's one collective runs there too). Without
    ``step`` calls the width stays at its initial value.

    Args:
        mode (str): ``fixed`` (width ``bits``), ``rel`` (relative bound from ``schedule``) or
            ``abs`` (absolute bound from ``schedule``, width chosen by the controller).
        bits (int): the width of ``fixed`` mode; the initial width of ``abs`` mode (default:
            the widest of ``bits_choices``).
        schedule (BoundSchedule, dict or float, optional): the bound per iteration (``rel``:
            relative to the block maximum; ``abs``: absolute). In ``fixed`` mode an absolute
            bound to *monitor* (blocks above it are counted), optional.
        bits_choices (tuple of int): widths the adaptive modes may use.
        interval (int): ``abs`` mode: iterations between controller decisions.
        tolerance (float): ``abs`` mode: largest fraction of blocks allowed above the bound.
        collect_stats (bool): record counters and the magnitude histogram during encode
            (a few small device ops per call; required by ``abs`` mode).
        name (str): label in logs and summaries.
        process_group (ProcessGroup, optional): group of the controller's ``all_reduce``
            (default: the default group, when initialised).

    Example::

        >>> policy = ErrorBoundPolicy("rel", schedule={"start": 0.08, "end": 0.004, "steps": 1000, "kind": "step"})
        >>> policy.bits, policy.step(1000)
        (4, 8)
    """

    def __init__(
        self,
        mode: str = "fixed",
        bits: int | None = None,
        schedule: BoundSchedule | Mapping[str, Any] | float | None = None,
        bits_choices: Iterable[int] = SUPPORTED_BITS,
        interval: int = 50,
        tolerance: float = 1e-3,
        collect_stats: bool = True,
        name: str = "codec",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.bits_choices = tuple(sorted(set(bits_choices)))
        for b in self.bits_choices:
            _check_bits(b)
        if not self.bits_choices:
            raise ValueError("bits_choices is empty")
        if mode != "fixed" and schedule is None:
            raise ValueError(f"mode={mode!r} needs a schedule (a bound, a dict of BoundSchedule fields, or one)")
        if mode == "abs" and not collect_stats:
            raise ValueError("mode='abs' reads the encode statistics: collect_stats must be True")
        if interval < 1 or not 0.0 <= tolerance < 1.0:
            raise ValueError(f"need interval >= 1 and 0 <= tolerance < 1, got {interval}, {tolerance}")
        self.mode = mode
        self.schedule = BoundSchedule.from_spec(schedule) if schedule is not None else None
        self.interval = interval
        self.tolerance = tolerance
        self.collect_stats = collect_stats
        self.name = name
        self.process_group = process_group
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        #: absolute bound currently monitored (abs mode: the target), None when there is none
        self.error_bound: float | None = None
        #: relative bound currently targeted (rel mode)
        self.relative_target: float | None = None
        if mode == "fixed":
            self.bits = bits if bits is not None else 8
            _check_bits(self.bits)
            self.error_bound = self.schedule(0) if self.schedule is not None else None
        elif mode == "rel":
            self.relative_target = self.schedule(0)  # type: ignore[misc]
            self.bits = bits_for_relative_bound(self.relative_target, self.bits_choices)
        else:
            self.error_bound = self.schedule(0)  # type: ignore[misc]
            self.bits = bits if bits is not None else self.bits_choices[-1]
            _check_bits(self.bits)
        self._reset_counters()
        self.history.append(self._decision(0, "initial"))
        logger.info("comm codec %s: %s", name, self.describe())

    # ---- configuration / logging
    def describe(self) -> str:
        """One line: mode, width, bound."""
        parts = [
            f"mode={self.mode}",
            f"bits={self.bits}",
            f"relative bound {relative_bound(self.bits):.3g} of block max",
        ]
        if self.error_bound is not None:
            parts.append(f"abs bound {self.error_bound:.3g}")
        if self.relative_target is not None:
            parts.append(f"target rel {self.relative_target:.3g}")
        if self.schedule is not None and self.mode != "fixed":
            parts.append(f"schedule {self.schedule}")
        return ", ".join(parts)

    def _decision(self, iteration: int, reason: str) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "bits": self.bits,
            "error_bound": self.error_bound,
            "relative_target": self.relative_target,
            "reason": reason,
        }

    def _set_bits(self, bits: int, iteration: int, reason: str) -> None:
        if bits != self.bits:
            old, self.bits = self.bits, bits
            self.history.append(self._decision(iteration, reason))
            logger.info("comm codec %s: iteration %d: %d -> %d bits (%s)", self.name, iteration, old, bits, reason)
        else:
            logger.debug("comm codec %s: iteration %d: keep %d bits (%s)", self.name, iteration, bits, reason)

    # ---- iteration level
    def step(self, iteration: int) -> int:
        """Advance to ``iteration`` (call on every rank with the same value); returns the width.

        ``abs`` mode decides every ``interval`` iterations: one ``all_reduce`` of the
        magnitude histogram (a collective) and one host read.
        """
        self.iteration = iteration
        if self.mode == "fixed" or self.schedule is None:
            return self.bits
        target = self.schedule(iteration)
        if self.mode == "rel":
            self.relative_target = target
            self._set_bits(
                bits_for_relative_bound(target, self.bits_choices), iteration, f"relative bound {target:.3g}"
            )
            return self.bits
        self.error_bound = target
        if iteration > 0 and iteration % self.interval == 0:
            bits, reason = self._controller(target)
            self._set_bits(bits, iteration, reason)
        return self.bits

    def _controller(self, eps: float) -> tuple[int, str]:
        window = self._hist - self._hist_mark if self._hist is not None else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            if window is None:  # this rank encoded nothing: still join the collective
                window = torch.zeros(_HIST_BINS, dtype=torch.int64, device=self._collective_device())
            dist.all_reduce(window, group=self.process_group)
        if self._hist is not None:
            self._hist_mark = self._hist.clone()
        if window is None:
            return self.bits, "no data"
        counts = window.cpu()
        total = float(counts.sum())
        if total == 0:
            return self.bits, "no data"
        # bin j holds magnitudes in [2**(e/4), 2**((e+1)/4)), e = j + 4 * _HIST_MIN_EXP; a bin may
        # exceed a threshold when its upper edge does (conservative by at most 2**(1/4)).
        upper_exp = (torch.arange(_HIST_BINS, dtype=torch.float64) + 1) / _HIST_BINS_PER_OCTAVE + _HIST_MIN_EXP
        fracs = {
            b: float(counts[upper_exp > math.log2(abs_threshold(b, eps))].sum()) / total for b in self.bits_choices
        }
        fits = [b for b in self.bits_choices if fracs[b] <= self.tolerance]
        bits = fits[0] if fits else self.bits_choices[-1]
        above = ", ".join(f"{b} bits {f:.2%}" for b, f in fracs.items())
        return bits, f"abs bound {eps:.3g}; sampled blocks above range ({int(total)}): {above}"

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- statistics
    def _reset_counters(self) -> None:
        self.calls = 0
        self.elements = 0
        self.blocks = 0
        self.wire_bytes = 0
        self._counters: Tensor | None = None  # [nonfinite, violations, max |x|, max guaranteed error]
        self._hist: Tensor | None = None
        self._hist_mark: Tensor | None = None

    def record(self, absmax: Tensor, nonfinite: Tensor, bits: int, block_size: int) -> None:
        """Accumulate one encode call's statistics on the device (no host sync).

        Args:
            absmax (Tensor): per-block largest finite magnitude.
            nonfinite (Tensor): 0-dim count of non-finite values.
            bits (int): width used.
            block_size (int): K.
        """
        nb = absmax.numel()
        self.calls += 1
        self.blocks += nb
        self.elements += nb * block_size
        self.wire_bytes += quantized_numel(nb * block_size, bits, block_size)
        if not self.collect_stats or nb == 0:
            return
        dev = absmax.device
        if self._counters is None or self._counters.device != dev:
            self._counters = torch.zeros(4, dtype=torch.float64, device=dev)
            self._hist = torch.zeros(_HIST_BINS, dtype=torch.int64, device=dev)
            self._hist_mark = torch.zeros_like(self._hist)
        absmax = absmax.detach()
        top = absmax.max().to(torch.float64)
        if self.error_bound is not None:
            violations = (absmax > abs_threshold(bits, self.error_bound)).sum().to(torch.float64)
        else:
            violations = torch.zeros((), dtype=torch.float64, device=dev)
        sums = torch.stack([nonfinite.to(torch.float64), violations])
        self._counters[:2] += sums
        maxes = torch.stack([top, torch.clamp(top / (2 * max_code(bits)), min=2.0**-127) * (1 + BOUND_SLACK)])
        self._counters[2:] = torch.maximum(self._counters[2:], maxes)
        stride = max(1, nb // _HIST_SAMPLE)
        sample = absmax[::stride][:_HIST_SAMPLE]
        idx = (
            torch.floor(torch.log2(sample) * _HIST_BINS_PER_OCTAVE)
            .clamp_(_HIST_MIN_EXP * _HIST_BINS_PER_OCTAVE, _HIST_MAX_EXP * _HIST_BINS_PER_OCTAVE - 1)
            .to(torch.int64)
            - _HIST_MIN_EXP * _HIST_BINS_PER_OCTAVE
        )
        self._hist.index_add_(0, idx, torch.ones_like(idx))  # type: ignore[union-attr]

    def summary(self) -> dict[str, Any]:
        """Counters since construction (reads the device counters: a host sync; call at log time).

        Returns:
            dict: ``bits``, bounds, ``calls``, ``elements``, ``wire_bytes``, ``fp32_bytes``,
            ``compression_vs_fp32``, ``nonfinite``, ``violations`` (blocks above the absolute
            bound in force), ``max_abs``, ``max_guaranteed_error`` (the largest per-element
            bound of any block sent) and ``block_max_quantiles`` (p50 / p99 / p99.9 of the block
            maxima, from the sampled histogram: upper bin edges, within 2**0.25; a guide for
            choosing an absolute bound).
        """
        out: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode,
            "bits": self.bits,
            "iteration": self.iteration,
            "error_bound": self.error_bound,
            "relative_target": self.relative_target,
            "relative_bound": relative_bound(self.bits),
            "calls": self.calls,
            "elements": self.elements,
            "blocks": self.blocks,
            "wire_bytes": self.wire_bytes,
            "fp32_bytes": 4 * self.elements,
            "compression_vs_fp32": round(4 * self.elements / self.wire_bytes, 3) if self.wire_bytes else None,
        }
        if self._counters is not None:
            c = self._counters.cpu().tolist()
            out.update(
                nonfinite=int(c[0]),
                violations=int(c[1]),
                max_abs=c[2],
                max_guaranteed_error=c[3],
                violation_frac=c[1] / max(self.blocks, 1),
            )
        if self._hist is not None:
            counts = self._hist.cpu().to(torch.float64)
            total = float(counts.sum())
            if total > 0:
                cum = torch.cumsum(counts, 0) / total
                out["block_max_quantiles"] = {
                    str(q): 2.0 ** ((int(torch.searchsorted(cum, q / 100)) + 1) / _HIST_BINS_PER_OCTAVE + _HIST_MIN_EXP)
                    for q in (50, 99, 99.9)
                }
        return out


# ----------------------------------------------------------------------------- codec
@dataclass
class ErrorBoundedCodecContext:
    """Per-call context: the code width agreed for this all-to-all.

    ``padded_dim_sum_per_rank`` and ``row_dim`` are read by torchrec's ``comm_ops`` (FP8/MX4
    padding); they stay ``None`` / 0 here.
    """

    bits: int
    padded_dim_sum_per_rank: list[int] | None = None
    row_dim: int = 0


class ErrorBoundedCommCodec:
    """Fixed-rate, block-scaled, error-bounded ``QuantizedCommCodec`` (see the module docstring).

    Args:
        policy (ErrorBoundPolicy, optional): chooses the width per call (default: fixed 8 bits).
        block_size (int): K, values per scale (even; every all-to-all split must be a multiple).
        compile (bool): run encode/decode through ``torch.compile`` (fuses the element-wise
            passes on GPU; the first call compiles).

    Example::

        >>> codec = ErrorBoundedCommCodec(ErrorBoundPolicy("fixed", bits=4), block_size=8)
        >>> x = torch.tensor([0.0, 1.0, -2.0, 3.5, float("nan"), 0.25, 7.0, -7.0])
        >>> codec.decode(codec.encode(x))
        tensor([ 0.,  1., -2.,  4., nan,  0.,  7., -7.])
    """

    def __init__(self, policy: ErrorBoundPolicy | None = None, block_size: int = 32, compile: bool = False) -> None:
        if block_size < 2 or block_size % 2:
            raise ValueError(f"block_size must be even and >= 2, got {block_size}")
        self.policy = policy if policy is not None else ErrorBoundPolicy("fixed", bits=8)
        self.block_size = block_size
        self._compile = compile
        self._compiled: dict[tuple[str, int], Callable[..., Any]] = {}

    def _kernel(self, kind: str, bits: int) -> Callable[..., Any]:
        """``encode_blocks`` / ``decode_blocks`` with the width and block size bound.

        With ``compile=True``: one ``torch.compile``'d function per (kind, width); dynamo's
        automatic dynamic shapes make the length symbolic after its first change (forward,
        backward and evaluation calls differ). The functions of all widths share one code
        object, so a second width can make the width symbolic too: ``max_code`` is written
        so that dynamo evaluates it on a SymInt (torch 2.11 failed on a shift).
        """
        fn = encode_blocks if kind == "encode" else decode_blocks
        if not self._compile:
            return functools.partial(fn, bits=bits, block_size=self.block_size)
        key = (kind, bits)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(functools.partial(fn, bits=bits, block_size=self.block_size))
        return self._compiled[key]

    def __repr__(self) -> str:
        return f"ErrorBoundedCommCodec(block_size={self.block_size}, {self.policy.describe()})"

    @property
    def quantized_dtype(self) -> torch.dtype:
        """``torch.uint8``: the payload dtype (gloo and NCCL both carry it)."""
        return torch.uint8

    def _bits(self, ctx: ErrorBoundedCodecContext | None) -> int:
        return ctx.bits if ctx is not None else self.policy.bits

    def create_context(self) -> ErrorBoundedCodecContext:
        """Freeze the width of one all-to-all call (sender and receiver side)."""
        return ErrorBoundedCodecContext(bits=self.policy.bits)

    def encode(self, input_tensor: Tensor, ctx: ErrorBoundedCodecContext | None = None) -> Tensor:
        """Float values (numel a multiple of ``block_size``) -> 1-D ``uint8`` payload."""
        bits = self._bits(ctx)
        quantized_numel(input_tensor.numel(), bits, self.block_size)  # validates the length
        with torch.no_grad():  # torchrec's autograd Functions carry the gradients, never the payload
            payload, absmax, nonfinite = self._kernel("encode", bits)(input_tensor)
            self.policy.record(absmax, nonfinite, bits, self.block_size)
        return payload

    def decode(self, input_grad: Tensor, ctx: ErrorBoundedCodecContext | None = None) -> Tensor:
        """``uint8`` payload of whole blocks -> 1-D float32 values."""
        bits = self._bits(ctx)
        if input_grad.dtype != torch.uint8:
            raise TypeError(f"ErrorBoundedCommCodec.decode expects uint8, got {input_grad.dtype}")
        if input_grad.numel() % block_bytes(bits, self.block_size):
            raise ValueError(f"payload of {input_grad.numel()} bytes is not a whole number of {bits}-bit blocks")
        with torch.no_grad():
            return self._kernel("decode", bits)(input_grad)

    def calc_quantized_size(self, input_len: int, ctx: ErrorBoundedCodecContext | None = None) -> int:
        """Payload bytes for ``input_len`` values (a pure function of the length and the width)."""
        return quantized_numel(input_len, self._bits(ctx), self.block_size)

    def padded_size(
        self, input_tensor: Tensor, dim_per_rank: list[int], my_rank: int, qcomm_ctx: ErrorBoundedCodecContext | None
    ) -> tuple[int, int]:
        """No padding: ``(dim_per_rank[my_rank], 0)``."""
        return dim_per_rank[my_rank], 0


# ----------------------------------------------------------------------------- registries
CodecSpec = str | Mapping[str, Any] | ErrorBoundPolicy | None


def _torchrec_codecs(precision: str, device: torch.device) -> Any:
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs

    p = CommType[precision.upper()]
    if device.type == "cpu" and p == CommType.BF16:
        logger.warning("comm codec: BF16 is not supported on gloo - using FP16 (as torchrec does)")
        p = CommType.FP16
    return get_qcomm_codecs(QCommsConfig(forward_precision=p, backward_precision=p))


def _direction_codec(
    spec: CodecSpec,
    direction: str,
    block_size: int,
    device: torch.device,
    compile: bool,
    process_group: dist.ProcessGroup | None,
) -> Any:
    from torchrec.distributed.types import NoOpQuantizedCommCodec

    name = f"a2a_{direction}"
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "fp32")):
        return NoOpQuantizedCommCodec()
    if isinstance(spec, str) and spec.lower() in ("fp16", "bf16"):
        return getattr(_torchrec_codecs(spec, device), "forward" if direction == "fwd" else "backward")
    if isinstance(spec, str):
        if spec.lower() not in ("eb4", "eb8", "eb16"):
            raise ValueError(f"codec spec must be fp32, fp16, bf16, eb4, eb8, eb16, a dict or a policy, got {spec!r}")
        policy = ErrorBoundPolicy("fixed", bits=int(spec[2:]), name=name, process_group=process_group)
    elif isinstance(spec, Mapping):
        kwargs = {"name": name, "process_group": process_group, **spec}
        policy = ErrorBoundPolicy(**kwargs)
    elif isinstance(spec, ErrorBoundPolicy):
        policy = spec
    else:
        raise TypeError(f"unsupported codec spec {spec!r}")
    return ErrorBoundedCommCodec(policy, block_size=block_size, compile=compile)


def get_error_bounded_codecs_registry(
    forward: CodecSpec = "eb8",
    backward: CodecSpec = "eb8",
    *,
    block_size: int = 32,
    reduce_scatter: str | None = "fp16",
    device: torch.device | None = None,
    compile: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """A ``qcomm_codecs_registry`` with the error-bounded codec on the pooled all-to-all.

    Args:
        forward (str, dict or ErrorBoundPolicy, optional): codec of the forward all-to-all
            (pooled embeddings): ``"eb4"`` / ``"eb8"`` / ``"eb16"`` (fixed width), a dict of
            :class:`ErrorBoundPolicy` arguments (adaptive), a policy, ``"fp16"`` / ``"bf16"``
            (torchrec's codec) or ``"fp32"`` / None (uncompressed).
        backward (same as ``forward``): codec of the backward all-to-all (gradients).
        block_size (int): values per scale; must divide every all-to-all split (choose a
            divisor of every table dimension, e.g. 16 for 16-dim tables, so blocks never mix tables).
        reduce_scatter (str, optional): ``"fp16"`` / ``"bf16"``: torchrec's codec for
            ``POOLED_EMBEDDINGS_REDUCE_SCATTER`` (row-wise sharding; the error-bounded codec is
            not additive); None or ``"fp32"``: uncompressed.
        device (torch.device, optional): where the comms run (``cpu``: BF16 becomes FP16, as
            torchrec does on gloo); default CUDA when available.
        compile (bool): ``torch.compile`` the encode/decode kernels.
        process_group (ProcessGroup, optional): group of the adaptive controller.

    Returns:
        dict: ``{CommOp name: QuantizedCommCodecs}`` for ``TTEmbeddingBagCollectionSharder`` /
        ``EmbeddingBagCollectionSharder(qcomm_codecs_registry=...)``.

    Example::

        >>> registry = get_error_bounded_codecs_registry(
        ...     forward={"mode": "abs", "schedule": 1e-3},  # width chosen for |error| <= 1e-3
        ...     backward={"mode": "rel", "schedule": {"start": 0.08, "end": 0.004, "steps": 500, "kind": "step"}},
        ...     block_size=16, device=torch.device("cpu"))
        >>> sorted(registry)
        ['POOLED_EMBEDDINGS_ALL_TO_ALL', 'POOLED_EMBEDDINGS_REDUCE_SCATTER']
    """
    from torchrec.distributed.types import CommOp, QuantizedCommCodecs

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fwd = _direction_codec(forward, "fwd", block_size, device, compile, process_group)
    bwd = _direction_codec(backward, "bwd", block_size, device, compile, process_group)
    registry: dict[str, Any] = {
        CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name: QuantizedCommCodecs(forward=fwd, backward=bwd)
    }
    if reduce_scatter is not None and reduce_scatter.lower() != "fp32":
        if reduce_scatter.lower() not in ("fp16", "bf16"):
            raise ValueError(f"reduce_scatter must be fp16, bf16, fp32 or None, got {reduce_scatter!r}")
        registry[CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER.name] = _torchrec_codecs(reduce_scatter, device)
    for op, codecs in registry.items():
        logger.info("qcomm %s: forward %s, backward %s", op, _describe(codecs.forward), _describe(codecs.backward))
    return registry


def _describe(codec: Any) -> str:
    if isinstance(codec, ErrorBoundedCommCodec):
        return repr(codec)
    precision = getattr(codec, "_comm_precision", None)  # torchrec / fbgemm codecs
    return f"{type(codec).__name__}({getattr(precision, 'name', 'fp32')})"


#: What ``--comm_codec eb_adaptive`` means (override any field with ``comm_codec_options``).
EB_ADAPTIVE_DEFAULTS: dict[str, Any] = {
    # forward values: the narrowest width that keeps |error| <= eps(t) on all but 0.1% of blocks, eps
    # going from 0.05 to 0.01 over the first 200 steps (loose early, tight late); decided every 25 steps
    "forward": {
        "mode": "abs",
        "schedule": {"start": 0.05, "end": 0.01, "steps": 200, "kind": "exp"},
        "interval": 25,
        "tolerance": 1e-3,
    },
    # gradients: 4 bits (bound 7.3% of the block max) for the first 100 steps, 8 bits (0.4%) after
    "backward": {"mode": "rel", "schedule": {"start": 0.08, "end": 0.004, "steps": 100, "kind": "step"}},
}


def make_comm_codecs_registry(
    name: str, device: torch.device | None = None, embedding_dims: Iterable[int] = (), **options: Any
) -> dict[str, Any] | None:
    """The registry behind a ``--comm_codec`` value.

    Args:
        name (str): ``none`` (FP32: no registry), ``fp16`` / ``bf16`` (torchrec's
            ``QCommsConfig`` codecs on every comm op), ``eb4`` / ``eb8`` / ``eb16`` (error-bounded,
            fixed width, forward and backward) or ``eb_adaptive`` (:data:`EB_ADAPTIVE_DEFAULTS`).
        device (torch.device, optional): comms device.
        embedding_dims (iterable of int): table dimensions; the default ``block_size`` is the
            largest power of two (<= 32) dividing all of them.
        **options: overrides for :func:`get_error_bounded_codecs_registry` (``block_size``,
            ``forward``, ``backward``, ``reduce_scatter``, ``compile``).

    Returns:
        dict or None: the registry (None for ``none``).

    Example::

        >>> reg = make_comm_codecs_registry("eb8", torch.device("cpu"), embedding_dims=[16])
        >>> reg["POOLED_EMBEDDINGS_ALL_TO_ALL"].forward.block_size
        16
    """
    name = name.lower()
    if name not in COMM_CODECS:
        raise ValueError(f"comm codec must be one of {list(COMM_CODECS)}, got {name!r}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "none":
        if options:
            logger.warning("comm_codec none: options %s ignored", sorted(options))
        return None
    if name in ("fp16", "bf16"):
        from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

        p = CommType[name.upper()]
        return get_qcomm_codecs_registry(QCommsConfig(forward_precision=p, backward_precision=p), device=device)
    dims = list(embedding_dims)
    block = 32
    while block > 2 and any(d % block for d in dims):
        block //= 2
    kwargs: dict[str, Any] = {"block_size": block}
    if name == "eb_adaptive":
        kwargs.update({k: dict(v) for k, v in EB_ADAPTIVE_DEFAULTS.items()})
        for direction in ("forward", "backward"):
            if isinstance(options.get(direction), Mapping):
                kwargs[direction].update(options.pop(direction))
    else:
        kwargs.update(forward=name, backward=name)
    kwargs.update(options)
    return get_error_bounded_codecs_registry(device=device, **kwargs)


def comm_codec_policies(registry: Mapping[str, Any] | None) -> list[ErrorBoundPolicy]:
    """The distinct :class:`ErrorBoundPolicy` objects of a registry's error-bounded codecs.

    Call ``policy.step(iteration)`` on each once per training step (every rank), and log
    ``policy.summary()`` now and then.

    Args:
        registry (dict, optional): a ``qcomm_codecs_registry``.

    Returns:
        list[ErrorBoundPolicy]: forward before backward, in registry order.
    """
    out: list[ErrorBoundPolicy] = []
    for codecs in (registry or {}).values():
        for codec in (codecs.forward, codecs.backward):
            policy = getattr(codec, "policy", None)
            if isinstance(policy, ErrorBoundPolicy) and all(p is not policy for p in out):
                out.append(policy)
    return out
