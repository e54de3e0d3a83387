"""Teacher-weighting schemes: one class per scheme, and the registry the CLI and the configs read.

A scheme turns what the teachers' caches say about each position into per-position weights alpha [N, K]
(rows are N = B * L positions of B windows of L tokens, columns the K teachers). Each class declares

- `needs`: what it reads besides the validity mask: `entropy` (the cache column) and/or `observed` (log p_k(o),
  the teacher's log-prob of the observed next token o = input_ids[t + 1], see student/targets.py);
- `settings`: the `WeightSettings` fields it takes (each field's range check is in `SETTINGS`);
- `check(num_teachers)` and `check_caches(caches)`: refusals that need the settings or the caches;
- `alpha(inputs)`: the weights, float32 (float64 inputs stay float64, for references).

Adding a scheme is one class here plus one line in `REGISTRY`: train-student and evaluate take their
`--teacher-weighting` choices and help from it, and nothing else compares a scheme's name.

Conventions shared by every scheme (tests/student/test_weighting.py checks each against float64 references):

- validity: a teacher without a target at a position (`valid` False: an aligned cache's target mask) gets
  weight 0 there; the others are renormalised. A row with no valid teacher is all 0 (no KD there). K below
  means the number of valid teachers at that position.
- unknown o: where a valid teacher's log p(o) is NaN (every window's last position, whose next token lies
  outside the window), the per-token observed schemes give that row uniform weights over its valid teachers.
- ties: teachers tied at the best value share the weight equally (the beta -> inf limit of `tempered`), so
  the weights do not depend on the teachers' order.
- p(o) = 0 (log p(o) = -inf, CE = +inf) is a legal value: such a teacher is the worst; if every valid teacher
  has it, they tie.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import click
import torch

from common.config_cli import Opt
from common.errors import ConfigError
from common.params import FINITE_FLOAT, FLOAT_LIST, check_weights

log = logging.getLogger("student")

ENTROPY = "entropy"
"""`needs` entry: the cache's `entropy` column, [N, K] nats."""
OBSERVED = "observed"
"""`needs` entry: log p_k(o) of the observed next token, [N, K] (student/targets.py: the `observed_logprob`
column, or its fallback from the teacher's list)."""

ENTROPY_EPS_RANGE = (1e-8, 1e6)
"""Accepted `entropy_eps` (nats): the entropy weights 1/(H + eps) stay finite and non-zero in float32."""
MAX_BETA = 1e6
"""Largest accepted `weight_beta` (beta * log p stays finite in float32 for any p above float32's tiny)."""


@dataclass(frozen=True, kw_only=True)
class WeightSettings:
    """The settings of every scheme (each reads the ones it declares); the configs' defaults come from here."""

    teacher_weights: tuple[float, ...] | None = None
    """`fixed`: one weight per teacher (normalised to sum to 1)."""
    entropy_eps: float = 1e-3
    """`entropy`: eps in 1 / (H + eps), guarding teachers with near-zero entropy (nats)."""
    weight_beta: float = 1.0
    """`tempered`: the exponent beta in alpha_k ∝ p_k(o)^beta (0: uniform; large: min-ce)."""
    weight_floor: float = 0.0
    """`tempered`: the share of the weight spread uniformly over the valid teachers (0..1)."""


DEFAULT_SETTINGS = WeightSettings()


@dataclass(frozen=True)
class Setting:
    """One scheme setting: its CLI flag, help and range check (a ConfigError message, or None when fine)."""

    flag: str
    help: str
    check: Callable[[Any], str | None]


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if lo <= value <= hi else f"must be in [{lo:g}, {hi:g}], got {value}"
    return check


def _weights_check(value: Any) -> str | None:
    try:
        check_weights("--teacher-weights", value)
    except ConfigError as e:
        return str(e).removeprefix("--teacher-weights ")
    return None


SETTINGS: dict[str, Setting] = {
    "teacher_weights": Setting("--teacher-weights", "Fixed weights in teacher order, e.g. 0.5,0.3,0.2 (with "
                               "--teacher-weighting fixed).", _weights_check),
    "entropy_eps": Setting("--entropy-eps", "eps in the entropy weights 1/(H+eps), in nats: guards teachers with "
                           "near-zero entropy.", _range(*ENTROPY_EPS_RANGE)),
    "weight_beta": Setting("--weight-beta", "beta of --teacher-weighting tempered: alpha_k ∝ p_k(o)^beta "
                           f"(0: uniform; large: min-ce), in [0, {MAX_BETA:g}].", _range(0.0, MAX_BETA)),
    "weight_floor": Setting("--weight-floor", "Floor of --teacher-weighting tempered: this share of the weight "
                            "is spread uniformly over the valid teachers (0..1).", _range(0.0, 1.0)),
}
"""Every scheme setting by `WeightSettings` field; each is range-checked whatever the scheme."""


@dataclass
class WeightInputs:
    """What a scheme may read for N positions (B windows of `seq_len`, flattened) and K teachers."""

    num_teachers: int
    seq_len: int
    """L: rows b * L .. (b + 1) * L - 1 are window b (the per-sequence schemes group by it)."""
    valid: torch.Tensor | None = None
    """[N, K] bool: teachers with a target at each position (None: all)."""
    entropy: torch.Tensor | None = None
    """[N, K] float32 entropies (nats), when the scheme needs them (NaN allowed where not valid)."""
    observed: torch.Tensor | None = None
    """[N, K] float32 log p_k(o) (<= 0, -inf for p = 0; NaN where unknown), when the scheme needs it."""
    rows: int | None = None
    """N, when neither entropy nor observed gives it."""
    device: torch.device | str | None = None
    """Where the weights go when no input tensor says (None: the inputs' device, else cpu)."""

    @property
    def n(self) -> int:
        for t in (self.valid, self.entropy, self.observed):
            if t is not None:
                return int(t.shape[0])
        if self.rows is None:
            raise ValueError("WeightInputs needs a tensor or `rows` for the number of positions")
        return self.rows

    def mask(self) -> torch.Tensor:
        """[N, K] bool validity (all True when `valid` is None)."""
        if self.valid is not None:
            return self.valid.bool()
        return torch.ones((self.n, self.num_teachers), dtype=torch.bool, device=self._device())

    def _device(self) -> torch.device:
        for t in (self.valid, self.entropy, self.observed):
            if t is not None:
                return t.device
        return torch.device(self.device or "cpu")

    def dtype(self) -> torch.dtype:
        """float32, or float64 when the inputs are (references)."""
        src = self.observed if self.observed is not None else self.entropy
        return torch.float32 if src is None else torch.promote_types(torch.float32, src.dtype)


def renormalise(w: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """w [N, K] >= 0 with invalid entries zeroed, divided by its row sum (rows summing to 0 stay 0)."""
    if valid is not None:
        w = torch.where(valid, w, torch.zeros_like(w))
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def _uniform(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] 1 / K_valid at valid entries (rows without a valid teacher all 0)."""
    return renormalise(valid.to(dtype), valid)


def _best_share(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, K]: 1 / m for the m valid teachers with the highest score of their row (ties share), else 0.
    score [N, K] float (-inf allowed, NaN not); rows without a valid teacher are all 0."""
    masked = torch.where(valid, score, torch.full_like(score, -torch.inf))
    best = masked.amax(dim=1, keepdim=True)  # [N, 1]; -inf when every valid score is -inf (then all tie)
    top = valid & (masked == best)
    return renormalise(top.to(score.dtype), valid)


def _known_rows(inputs: WeightInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(o) [N, K] with NaN -> -inf, valid [N, K], rows [N] bool where every valid teacher's log p(o) is
    known and some teacher is valid): the rows the per-token observed schemes weight; the others are uniform."""
    if inputs.observed is None:
        raise ValueError("this weighting needs the observed-token log-probs")
    lp = inputs.observed.to(inputs.dtype())
    valid = inputs.mask().to(lp.device)
    unknown = torch.isnan(lp) & valid
    rows = ~unknown.any(dim=1) & valid.any(dim=1)
    lp = torch.where(torch.isnan(lp), torch.full_like(lp, -torch.inf), lp).clamp_max(0.0)
    return lp, valid, rows


class Weighting(ABC):
    """A teacher-weighting scheme (see the module docstring)."""

    name: ClassVar[str]
    """The `--teacher-weighting` value."""
    help: ClassVar[str]
    """One sentence for the CLI's help."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """What `alpha` reads besides validity: ENTROPY and/or OBSERVED."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The `WeightSettings` fields it takes."""

    def __init__(self, settings: WeightSettings = DEFAULT_SETTINGS) -> None:
        self.s = settings

    def check(self, num_teachers: int | None) -> None:  # noqa: B027 (most schemes have nothing to add)
        """ConfigError when the settings do not fit this scheme (and `num_teachers`, when known)."""

    def check_caches(self, caches: Sequence[Any]) -> None:
        """ConfigError (or a warning) when the joined caches (`storage.reader.TeacherDataset`s) cannot feed it."""
        if OBSERVED in self.needs:
            for t in caches:
                if not t.manifest.has_observed_logprob:
                    log.warning(
                        "teacher %r (%s) has no observed_logprob column (a cache written before it was stored): its "
                        "log p(o) for --teacher-weighting %s is its top-k value where o is in its top-k and the "
                        "bound log(tail) (at most its k-th probability) elsewhere; the bounded positions are "
                        "counted and logged",
                        t.manifest.teacher.name, t.path, self.name)

    @abstractmethod
    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        """[N, K] weights: 0 where a teacher is not valid, rows summing to 1 (all 0 without a valid teacher)."""


class UniformWeighting(Weighting):
    name = "uniform"
    help = "1/K over the teachers with a target"

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        return _uniform(inputs.mask(), inputs.dtype())


class FixedWeighting(Weighting):
    name = "fixed"
    help = "--teacher-weights, the same at every position"
    settings = ("teacher_weights",)

    def check(self, num_teachers: int | None) -> None:
        w = self.s.teacher_weights
        if num_teachers is not None and w is not None and len(w) != num_teachers:
            raise ConfigError(f"--teacher-weights has {len(w)} values for {num_teachers} teachers (fixed weighting "
                              "needs one weight per teacher)")

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        n, k = inputs.n, inputs.num_teachers
        if self.s.teacher_weights is None or len(self.s.teacher_weights) != k:
            raise ValueError(f"fixed weighting needs {k} weights, got {self.s.teacher_weights!r}")
        w = torch.tensor(list(self.s.teacher_weights), dtype=inputs.dtype(), device=inputs.mask().device)  # [K]
        return renormalise(w.expand(n, k), inputs.valid)


class EntropyWeighting(Weighting):
    name = "entropy"
    help = "alpha_k ∝ 1/(H_k + eps) per position (the paper's method; --entropy-eps)"
    needs = frozenset({ENTROPY})
    settings = ("entropy_eps",)

    def check_caches(self, caches: Sequence[Any]) -> None:
        for t in caches:
            if t.manifest.entropy_kind == "absent":
                raise ConfigError(
                    f"teacher {t.manifest.teacher.name!r} ({t.path}) stored no entropy (entropy_kind 'absent'), so "
                    "it cannot be entropy-weighted; use --teacher-weighting uniform or fixed")
            if t.manifest.entropy_kind == "estimate":
                log.warning("teacher %r stores an estimated entropy (top-k plus tail), not the exact one",
                            t.manifest.teacher.name)

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        if inputs.entropy is None:
            raise ValueError("entropy weighting needs entropies")
        ent = inputs.entropy.to(inputs.dtype())
        if inputs.valid is not None:
            ent = torch.where(inputs.valid, ent, torch.zeros_like(ent))
        return renormalise(1.0 / (ent.clamp_min(0.0) + self.s.entropy_eps), inputs.valid)  # [N, K]


class ConfidenceWeighting(Weighting):
    name = "confidence"
    help = ("CA-MKD: w_k = (1 - softmax_k(CE_k)) / (K - 1) with CE_k = -log p_k(o), over the K teachers with a "
            "target (K = 1: weight 1)")
    needs = frozenset({OBSERVED})

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        lp, valid, rows = _known_rows(inputs)
        ce = -lp  # [N, K] >= 0, +inf for p(o) = 0
        inf = torch.isinf(ce) & valid
        # softmax over the valid teachers of CE; teachers with CE = +inf share all of it (its limit)
        finite_ce = torch.where(valid & ~inf, ce, torch.full_like(ce, -torch.inf))
        soft = renormalise((finite_ce - finite_ce.amax(dim=1, keepdim=True).clamp_min(0.0)).exp(), valid & ~inf)
        soft = torch.where(inf.any(dim=1, keepdim=True), renormalise(inf.to(ce.dtype), inf), soft)
        k = valid.sum(dim=1, keepdim=True).to(ce.dtype)  # [N, 1]
        w = torch.where(k > 1, (1.0 - soft) / (k - 1.0).clamp_min(1.0), torch.ones_like(soft))
        w = renormalise(w, valid)  # K = 1: that teacher gets 1
        return torch.where(rows.unsqueeze(1), w, _uniform(valid, w.dtype))


class TemperedWeighting(Weighting):
    name = "tempered"
    help = ("alpha_k = floor/K + (1 - floor) p_k(o)^beta / sum_j p_j(o)^beta (--weight-beta, --weight-floor): "
            "uniform at beta 0, min-ce as beta grows")
    needs = frozenset({OBSERVED})
    settings = ("weight_beta", "weight_floor")

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        lp, valid, rows = _known_rows(inputs)
        if self.s.weight_beta == 0.0:  # p^0 = 1, also for p = 0
            a = _uniform(valid, lp.dtype)
        else:
            x = torch.where(valid, self.s.weight_beta * lp, torch.full_like(lp, -torch.inf))
            best = x.amax(dim=1, keepdim=True)
            a = renormalise((x - best.clamp_min(torch.finfo(lp.dtype).min)).exp(), valid)
            a = torch.where(torch.isinf(best), _best_share(lp, valid), a)  # every valid p(o) = 0: they tie
        uni = _uniform(valid, lp.dtype)
        w = self.s.weight_floor * uni + (1.0 - self.s.weight_floor) * a
        return torch.where(rows.unsqueeze(1), w, uni)


class MinCEWeighting(Weighting):
    name = "min-ce"
    help = "weight 1 on the teacher with the lowest -log p(o) at each position (FuseLLM's MinCE, per token)"
    needs = frozenset({OBSERVED})

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        lp, valid, rows = _known_rows(inputs)
        return torch.where(rows.unsqueeze(1), _best_share(lp, valid), _uniform(valid, lp.dtype))


class MinCESequenceWeighting(Weighting):
    name = "min-ce-seq"
    help = ("weight 1 on the teacher with the lowest mean -log p(o) over the window's positions where it has a "
            "target (FuseLLM's MinCE, per sequence); where it has none, the next best")
    needs = frozenset({OBSERVED})

    def alpha(self, inputs: WeightInputs) -> torch.Tensor:
        if inputs.observed is None:
            raise ValueError("min-ce-seq needs the observed-token log-probs")
        lp = inputs.observed.to(inputs.dtype())
        valid = inputs.mask().to(lp.device)
        n, k, seq_len = lp.shape[0], lp.shape[1], inputs.seq_len
        if n % seq_len:
            raise ValueError(f"{n} positions are not whole windows of {seq_len}")
        known = valid & ~torch.isnan(lp)  # [N, K]
        lp_b = torch.where(known, lp, torch.zeros_like(lp)).reshape(-1, seq_len, k)  # [B, L, K]
        count = known.reshape(-1, seq_len, k).sum(dim=1)  # [B, K]
        mean = lp_b.sum(dim=1) / count.clamp_min(1).to(lp.dtype)  # [B, K] mean log p(o); -inf if some p = 0
        mean = torch.where(count > 0, mean, torch.full_like(mean, -torch.inf))  # no position: ranked last
        score = mean.repeat_interleave(seq_len, dim=0)  # [N, K]
        return _best_share(score, valid)


REGISTRY: dict[str, type[Weighting]] = {cls.name: cls for cls in (
    EntropyWeighting,
    UniformWeighting,
    FixedWeighting,
    ConfidenceWeighting,
    TemperedWeighting,
    MinCEWeighting,
    MinCESequenceWeighting,
)}
"""Every scheme by name, in the order the CLI lists them (a new scheme: one line here)."""
NAMES: tuple[str, ...] = tuple(REGISTRY)


def check_settings(name: str, settings: WeightSettings, num_teachers: int | None = None) -> Weighting:
    """The scheme `name` with `settings`, after every check (ConfigError in one line): a known name, each
    setting's range, `--teacher-weights` given exactly with the schemes that take it, the scheme's own check."""
    if name not in REGISTRY:
        raise ConfigError(f"--teacher-weighting must be one of {', '.join(NAMES)}, got {name!r}")
    for field, setting in SETTINGS.items():
        value = getattr(settings, field)
        problem = None if value is None else setting.check(value)
        if problem:
            raise ConfigError(f"{setting.flag} {problem}")
    scheme = REGISTRY[name](settings)
    if ("teacher_weights" in scheme.settings) != (settings.teacher_weights is not None):
        takers = [n for n, cls in REGISTRY.items() if "teacher_weights" in cls.settings]
        raise ConfigError(f"--teacher-weights is required with --teacher-weighting {'/'.join(takers)}, and only then")
    scheme.check(num_teachers)
    return scheme


def scheme(name: str, settings: WeightSettings = DEFAULT_SETTINGS) -> Weighting:
    """The scheme `name` with `settings` (ValueError for an unknown name; no setting checks: see
    `check_settings`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown weighting {name!r}; expected one of {NAMES}")
    return REGISTRY[name](settings)


def choices_help() -> str:
    """The `--teacher-weighting` help: every scheme with its sentence."""
    return "Per-position teacher weights. " + "; ".join(f"{n}: {cls.help}" for n, cls in REGISTRY.items()) + "."


def setting_help(field: str) -> str:
    """The help of a setting's option, naming the schemes that take it."""
    users = [n for n, cls in REGISTRY.items() if field in cls.settings]
    return f"{SETTINGS[field].help} Used by: {', '.join(users)}."


def weighting_options(*, prefix: str = "", weighting_aliases: tuple[str, ...] = (),
                      weights_note: str = "") -> tuple[Opt, ...]:
    """The option rows of a command that fuses teachers: `--teacher-weighting` and one per setting (`SETTINGS`,
    in order), for the config fields `prefix + name` (train-student's `loss.`). `weighting_aliases` are
    --teacher-weighting's old spellings; `weights_note` ends --teacher-weights' help."""
    rows = [Opt(field=f"{prefix}teacher_weighting", flag="--teacher-weighting", type=click.Choice(NAMES),
                hidden_aliases=weighting_aliases, help=choices_help())]
    for name, setting in SETTINGS.items():
        note = f" {weights_note}" if name == "teacher_weights" and weights_note else ""
        rows.append(Opt(field=f"{prefix}{name}", flag=setting.flag, help=setting_help(name) + note,
                        type=FLOAT_LIST if name == "teacher_weights" else FINITE_FLOAT))
    return tuple(rows)
