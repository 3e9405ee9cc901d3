"""Koopman Spectral Shaping (KSS), the paper's Definition 2: its settings and the loss of one layer.

At a KSS step, for a seeded random share (``layer_fraction``, the paper's
50%) of the selected blocks, on ``subsample`` random token positions of the
current training batch (the same positions in every block):

    X, Y     = the block's input and output token states (with grad)
    A~       = the paper's whitened DMD operator of (X, Y), seeded rank-r
               randomized DMD (hf_rksp.spectral: whiten -> dmd_operator,
               the audit's own functions; r = 32)
    lam      = eigenvalues of A~ (hf_rksp.spectral.differentiable_eigenvalues)
    L_l      = kss_penalty(lam)   (Eq. 14: unstable penalty above tau_u, and
               beta (m_soft - gamma)^2 pulling the soft near-unit mass, Eq. 15,
               toward gamma)

and the trainer adds ``alpha * mean_l L_l`` to the task loss.

**What carries gradient, what is detached.** Gradients reach the weights of
the block and of everything upstream of it through the centered snapshots:
the moments C = (Yc V)^T (Xc V), Syy and X's Gram H = (Xc V)^T (Xc V), and the
whitening matrix W_V = f(H) by its divided differences (whitening.py,
Gradients), hence through A~ and its eigenvalues.  Detached: the basis V
itself (any orthonormal basis gives the same W at full rank) and the random
range basis of the randomized DMD (a sampling device, not part of the model).
With full DMD the gradient is exact; a stop-gradient through the whole
whitening, our first version, was wrong upstream of the block by orders of
magnitude.  The eigenvalue derivatives need no eigenvector derivative; a
layer whose eigenvalues are ill-conditioned (condition number above
``max_condition``, e.g. a Jordan block) is skipped for the step and counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from hf_rksp.capture.hooks import hidden_in, hidden_out
from hf_rksp.errors import ConfigError, InertKSSError, SnapshotError
from hf_rksp.models.init import group_seed
from hf_rksp.spectral import (
    MAX_CONDITION,
    RKSPConfig,
    differentiable_eigenvalues,
    dmd_operator,
    kss_penalty,
    mass_partition,
    soft_near_unit_mass,
    unstable_penalty,
    whiten,
)
from hf_rksp.spectral.operator import SKETCHES
from hf_rksp.spectral.whitening import EPS

__all__ = ["KSSConfig", "LayerKSS", "layer_kss", "select_layers", "SnapshotSampler", "KSSStep", "KSSResult",
           "gradient_norms"]


@dataclass
class KSSConfig:
    """Settings of Koopman Spectral Shaping (saved with every checkpoint).

    The loss added to the task loss at optimizer step t is
    ``alpha * schedule(t) * mean_l L_l`` on steps where ``t % every_n_steps == 0``;
    defaults are the paper's (T, tau_u, tau_l, alpha = 0.15, r = 32, 50% of
    layers, every 10 steps) or, where it gives none, ours (docs/method.md, "KSS (Definition 2) and our choices").
    """

    mode: str = "on"  # "on" | "off" | "auto" (RKSP before the first step decides, paper Fig. 7)
    alpha: float = 0.15  # weight of the KSS term (paper: 0.15 main setting)
    every_n_steps: int = 10  # paper: every 10-20 steps
    layer_fraction: float = 0.5  # share of the selected blocks drawn (seeded) at each KSS step (paper: 50%)
    blocks: list[int] | None = None  # block indices (negative allowed) to draw from; None: all blocks
    block_path: str | None = None  # block list of a model whose family hf-rksp does not know ("blocks")
    subsample: int = 512  # token positions of the training batch per KSS step [ours]
    rank: int = 32  # rank r of the randomized DMD (paper: 32)
    #: the rank-r subspace [ours, issue 24]: "random" (seeded randomized range of the whitened snapshots, the
    #: original choice) or "pod" (the top-r principal directions of the raw snapshots, whitened there)
    sketch: str = "random"
    T: float = 20.0  # sigmoid sharpness (Eqs. 14-15)
    tau_u: float = 1.05  # upper edge of the near-unit band; modes above are penalized
    tau_l: float = 0.90  # lower edge of the near-unit band
    gamma: float = 0.4  # target soft near-unit mass (paper: in [0.3, 0.5])
    beta: float = 1.0  # weight of the near-unit target (paper: not given) [ours]
    terms: str = "both"  # "both" | "unstable" | "near_unit": the paper's Table 6 ablations
    eps: float = EPS  # whitening regularizer, as in the audit
    max_condition: float = MAX_CONDITION  # skip a layer whose eigenvalue condition number exceeds this [ours]
    #: on KSS steps, also measure the task gradient's norm and alpha * grad L_KSS's norm separately (two extra
    #: partial backward passes), logged as kss/task_grad_norm and kss/grad_norm: for divergence monitors that
    #: must not count the regularizer's own gradient
    measure_grad_norms: bool = False
    #: [ours, not the paper's] scale the KSS term on a step so that its gradient's norm is at most this times
    #: the task gradient's (measured as above; logged as kss/grad_scale); None: the paper's plain sum
    max_grad_ratio: float | None = None
    warmup_steps: int = 0  # linear ramp of alpha over these optimizer steps (0: the paper's constant alpha)
    decay: str = "constant"  # "constant" | "linear" | "cosine" (to 0 after warm-up)
    decay_steps: int | None = None  # None: decay over the rest of training (max_steps)
    seed: int = 0  # layer draw, token subsample and random basis (seeded per step: resumable)
    auto_threshold: float = 0.5  # mode="auto": KSS on when the mean near-unit mass M exceeds this
    auto_low: float = 0.3  # mode="auto": below this M (and modest kappa) KSS stays off
    auto_kappa: float = 1e4  # mode="auto": layer-mean kappa(V) above this counts as "large" [ours]
    auto_tokens: int = 2048  # mode="auto": tokens of the first training batches profiled
    #: mode="auto": "paper" = the paper's init-only rule (Fig. 7); "preflight" = KSS on when hf_rksp.preflight
    #: gives P(divergence) >= 0.5 for the planned run (the paper's rule where it gives no probability) [ours]
    auto_rule: str = "paper"

    def __post_init__(self):
        checks = (
            ("mode", self.mode in ("on", "off", "auto"), f"mode must be 'on', 'off' or 'auto', got {self.mode!r}"),
            ("alpha", _finite(self.alpha) and self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            ("every_n_steps", _int(self.every_n_steps) and self.every_n_steps >= 1,
             f"every_n_steps must be an integer >= 1, got {self.every_n_steps}"),
            ("layer_fraction", _finite(self.layer_fraction) and 0 < self.layer_fraction <= 1,
             f"layer_fraction must be in (0, 1], got {self.layer_fraction}"),
            ("rank", _int(self.rank) and self.rank >= 2, f"rank must be an integer >= 2, got {self.rank}"),
            ("sketch", self.sketch in SKETCHES, f"sketch must be one of {', '.join(SKETCHES)}, got {self.sketch!r}"),
            ("subsample", _int(self.subsample) and self.subsample > self.rank,
             f"subsample must be an integer > rank ({self.rank}), got {self.subsample}"),
            ("T", _finite(self.T) and self.T > 0, f"T must be > 0, got {self.T}"),
            ("tau_l", _finite(self.tau_l) and _finite(self.tau_u) and 0 < self.tau_l < 1 < self.tau_u,
             f"need 0 < tau_l < 1 < tau_u (a band around |lambda| = 1), got tau_l = {self.tau_l}, "
             f"tau_u = {self.tau_u}"),
            ("gamma", _finite(self.gamma) and 0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}"),
            ("beta", _finite(self.beta) and self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            ("terms", self.terms in ("both", "unstable", "near_unit"),
             f"terms must be 'both', 'unstable' or 'near_unit', got {self.terms!r}"),
            ("eps", _finite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}"),
            ("max_condition", self.max_condition > 1, f"max_condition must be > 1, got {self.max_condition}"),
            ("max_grad_ratio", self.max_grad_ratio is None or (_finite(self.max_grad_ratio) and self.max_grad_ratio > 0),
             f"max_grad_ratio must be None or > 0, got {self.max_grad_ratio}"),
            ("warmup_steps", _int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an integer >= 0, got {self.warmup_steps}"),
            ("decay", self.decay in ("constant", "linear", "cosine"),
             f"decay must be constant, linear or cosine, got {self.decay!r}"),
            ("auto_threshold", 0 < self.auto_low <= self.auto_threshold < 1,
             f"need 0 < auto_low <= auto_threshold < 1, got {self.auto_low}, {self.auto_threshold}"),
            ("auto_kappa", self.auto_kappa > 1, f"auto_kappa must be > 1, got {self.auto_kappa}"),
            ("auto_tokens", _int(self.auto_tokens) and self.auto_tokens >= 2,
             f"auto_tokens must be an integer >= 2, got {self.auto_tokens}"),
            ("auto_rule", self.auto_rule in ("paper", "preflight"),
             f"auto_rule must be 'paper' or 'preflight', got {self.auto_rule!r}"),
        )
        for param, ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (KSSConfig)", param=param)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KSSConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def schedule(self, step: int, max_steps: int | None) -> float:
        """alpha at optimizer step ``step`` (0-based), before every_n_steps."""
        w = self.alpha
        if self.warmup_steps > 0:
            w *= min(1.0, (step + 1) / self.warmup_steps)
        if self.decay != "constant":
            span = self.decay_steps
            if span is None:
                span = (max_steps or 0) - self.warmup_steps
            if span and span > 0:
                p = min(1.0, max(0.0, (step - self.warmup_steps) / span))
                w *= (1.0 - p) if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return w

    def penalty(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        """L_l of Eq. 14 (or one of its two terms, ``terms``) for one layer's eigenvalues."""
        if self.terms == "unstable":
            return unstable_penalty(eigenvalues, T=self.T, tau_u=self.tau_u)
        if self.terms == "near_unit":
            m_soft = soft_near_unit_mass(eigenvalues, T=self.T, tau_u=self.tau_u, tau_l=self.tau_l)
            return self.beta * (m_soft - self.gamma) ** 2
        return kss_penalty(eigenvalues, T=self.T, tau_u=self.tau_u, tau_l=self.tau_l, gamma=self.gamma,
                           beta=self.beta)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def select_layers(n: int, fraction: float, generator: torch.Generator) -> list[int]:
    """A seeded random ceil(fraction * n) of range(n), sorted (at least one)."""
    k = max(1, math.ceil(fraction * n - 1e-9))
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


@dataclass
class LayerKSS:
    """L_l of one layer and what it measured (hard masses from the same eigenvalues, detached)."""

    loss: torch.Tensor  # L_l; differentiable unless skipped
    soft_near_unit_mass: float
    near_unit_mass: float
    expansive_mass: float
    spectral_radius: float
    condition: float  # largest eigenvalue condition number
    rank: int  # r actually used (min(r, k))
    skipped: bool  # no gradient from this layer: see skip_reason
    #: why it was skipped: "ill_conditioned" (eigenvalue condition number above max_condition), "non_finite"
    #: (a NaN/inf value), "no_grad" (neither snapshot carries gradient: nothing trains at or upstream of the
    #: block, or its forward ran without grad); None when used
    skip_reason: str | None = None


def layer_kss(x: torch.Tensor, y: torch.Tensor, config: KSSConfig, *,
              generator: torch.Generator | None = None) -> LayerKSS:
    """L_l (Eq. 14) of one block from its (n x d) snapshots, with grad; see the module docstring.

    Raises SnapshotError when the snapshots cannot be whitened (a constant stream).
    """
    wh = whiten(x, y, eps=config.eps, dtype=torch.float64)
    op = dmd_operator(wh, config.rank if config.rank < wh.k else None, generator=generator, sketch=config.sketch)
    spec = differentiable_eigenvalues(op.matrix, max_condition=config.max_condition)
    lam = spec.eigenvalues
    loss = config.penalty(lam)
    reason = None
    if not (x.requires_grad or y.requires_grad):
        reason = "no_grad"
    elif not spec.differentiable:
        reason = "ill_conditioned"
    elif not bool(torch.isfinite(loss.detach())):
        reason = "non_finite"
    skipped = reason is not None
    if skipped:
        loss = loss.detach()
    bands = RKSPConfig(band_upper=config.tau_u, band_lower=config.tau_l,
                       contractive=min(RKSPConfig.contractive, config.tau_l))
    hard = mass_partition(lam.detach(), bands) if bool(torch.isfinite(lam.detach()).all()) else {}
    with torch.no_grad():
        soft = float(soft_near_unit_mass(lam.detach(), T=config.T, tau_u=config.tau_u, tau_l=config.tau_l))
    return LayerKSS(loss=loss, soft_near_unit_mass=soft, near_unit_mass=hard.get("near_unit_mass", math.nan),
                    expansive_mass=hard.get("expansive_mass", math.nan),
                    spectral_radius=float(lam.detach().abs().max()), condition=spec.condition, rank=op.m,
                    skipped=skipped, skip_reason=reason)


class SnapshotSampler:
    """Forward hooks that keep, with grad, a token subsample of each block's input and output.

    The same ``n`` random non-padding positions are taken in every block.  Use
    as a context manager around the training forward pass; hooks are removed
    on exit.

    Only the first forward run with grad enabled is kept: a trainer that runs a second, no-grad forward
    inside the same ``compute_loss`` (TRL's ``SFTTrainer`` does, for its metrics or logits) must not replace
    the snapshots of the forward whose loss is backpropagated.  A no-grad forward is kept only while no grad
    forward has been seen (then the step is inert, and :meth:`KSSStep.result` says so).
    ``forwards_with_grad`` / ``forwards_without_grad`` count the forwards the first block saw.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        n: int,
        generator: torch.Generator,
        valid: torch.Tensor | None = None,
    ):
        self.blocks = blocks
        self.n = n
        self.generator = generator
        self.valid = valid  # flattened bool mask of non-padding positions, or None
        self.inputs: list[torch.Tensor | None] = [None] * len(blocks)
        self.outputs: list[torch.Tensor | None] = [None] * len(blocks)
        self._idx: torch.Tensor | None = None
        self._handles = []
        self._grad_seen = False
        self.forwards_with_grad = 0
        self.forwards_without_grad = 0

    def _index(self, n_positions: int, device) -> torch.Tensor:
        if self._idx is None:
            if self.valid is not None and self.valid.numel() == n_positions:
                pos = torch.nonzero(self.valid.reshape(-1).cpu(), as_tuple=False).squeeze(1)
            else:
                pos = torch.arange(n_positions)
            perm = torch.randperm(pos.numel(), generator=self.generator)[: self.n]
            self._idx = pos[perm].sort().values
        return self._idx.to(device)

    def _take(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        return flat.index_select(0, self._index(flat.shape[0], flat.device))

    def _keep(self, i: int, slot: list) -> bool:
        """Whether this call of block i's hook stores its snapshot (see the class docstring)."""
        if torch.is_grad_enabled():
            if not self._grad_seen:  # the first forward with grad: drop what no-grad forwards left
                self._grad_seen = True
                self.inputs = [None] * len(self.blocks)
                self.outputs = [None] * len(self.blocks)
                self._idx = None
            return slot[i] is None
        return not self._grad_seen and slot[i] is None

    def __enter__(self) -> "SnapshotSampler":
        for i, block in enumerate(self.blocks):

            def pre(_m, args, kwargs, i=i):
                if i == 0:
                    if torch.is_grad_enabled():
                        self.forwards_with_grad += 1
                    else:
                        self.forwards_without_grad += 1
                if self._keep(i, self.inputs):
                    self.inputs[i] = self._take(hidden_in(args, kwargs))

            def post(_m, args, kwargs, out, i=i):
                if self._keep(i, self.outputs):
                    self.outputs[i] = self._take(hidden_out(out))

            self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(block.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if any(t is None for t in self.inputs + self.outputs):
            raise SnapshotError("KSS hooks did not see every selected block in the forward pass")
        return list(zip(self.inputs, self.outputs))


@dataclass
class KSSResult:
    """What one KSS evaluation (:class:`KSSStep`) produced."""

    term: torch.Tensor | None  # alpha * mean_l L_l (times grad_scale), to add to the task loss; None: no usable layer
    layers: list[LayerKSS]  # one per drawn block whose snapshots could be whitened
    chosen: list[int]  # the drawn blocks (indices into the blocks given)
    degenerate: int = 0  # drawn blocks whose snapshots could not be whitened (a constant stream)
    degenerate_reason: str | None = None  # the first such block's message
    #: layers skipped (no gradient from them), by LayerKSS.skip_reason: ill_conditioned, non_finite, no_grad
    skips: dict[str, int] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)  # measure_grad_norms / max_grad_ratio


def gradient_norms(params: list[torch.Tensor], task_loss: torch.Tensor, term: torch.Tensor) -> dict[str, float]:
    """Norms of the task loss's gradient and of the KSS term's, over ``params``, taken apart.

    The graph is kept for the real backward.  Keys: ``kss/task_grad_norm``, ``kss/grad_norm``.
    """
    out = {}
    for name, value in (("kss/task_grad_norm", task_loss), ("kss/grad_norm", term)):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        out[name] = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None))
    return out


class KSSStep:
    """One KSS evaluation around one forward pass: the one implementation every training loop uses.

    ::

        with KSSStep(blocks, config, step=step) as kss:
            loss = model(**batch).loss                 # the hooks keep each drawn block's snapshots
        out = kss.result(loss, alpha, params)          # out.term is None when no layer was usable
        if out.term is not None:
            loss = loss + out.term
        loss.backward()

    The draws are seeded from ``config.seed``: the blocks from the optimizer ``step`` (one draw for all
    micro-batches of a step), the token positions from ``step`` and the micro-batch number ``micro``, each
    block's randomized-DMD basis from ``step`` and the block's index.  ``attention_mask`` keeps padding out
    of the sample.  ``params`` (the parameters that train) is needed only with ``measure_grad_norms`` or
    ``max_grad_ratio``; the term's gradient is then bounded by ``max_grad_ratio`` times the task's.
    """

    def __init__(self, blocks: list[nn.Module], config: KSSConfig, *, step: int, micro: int = 0,
                 attention_mask: torch.Tensor | None = None):
        self.config, self.step = config, step
        self.chosen = select_layers(len(blocks), config.layer_fraction,
                                    torch.Generator().manual_seed(group_seed(config.seed, step)))
        gen = torch.Generator().manual_seed(group_seed(config.seed + 1, step * 1009 + micro % 1009))
        valid = attention_mask.reshape(-1).bool() if isinstance(attention_mask, torch.Tensor) else None
        self.sampler = SnapshotSampler([blocks[i] for i in self.chosen], config.subsample, gen, valid)

    def __enter__(self) -> "KSSStep":
        self.sampler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.__exit__(*exc)

    def result(self, task_loss: torch.Tensor, alpha: float, params: list[torch.Tensor] | None = None) -> KSSResult:
        cfg = self.config
        layers, degenerate, reason = [], 0, None
        with torch.autocast(device_type=task_loss.device.type, enabled=False):
            for i, (x, y) in zip(self.chosen, self.sampler.pairs()):
                basis = torch.Generator().manual_seed(group_seed(cfg.seed + 2, self.step * 1009 + i))
                try:
                    layers.append(layer_kss(x, y, cfg, generator=basis))
                except SnapshotError as e:  # a collapsed (constant) residual stream: nothing to shape
                    degenerate += 1
                    reason = reason or str(e)
        skips: dict[str, int] = {}
        for r in layers:
            if r.skip_reason is not None:
                skips[r.skip_reason] = skips.get(r.skip_reason, 0) + 1
        out = KSSResult(term=None, layers=layers, chosen=self.chosen, degenerate=degenerate, degenerate_reason=reason,
                        skips=skips)
        if layers and skips.get("no_grad", 0) == len(layers):
            raise self._inert_error()
        used = [r.loss for r in layers if not r.skipped]
        if not used:
            return out
        term = alpha * torch.stack(used).mean()
        if cfg.measure_grad_norms or cfg.max_grad_ratio is not None:
            if params is None:
                raise ConfigError("KSSStep.result needs the trained parameters to measure or bound gradients",
                                  param="params")
            out.grad_norms = gradient_norms(params, task_loss, term)
        if cfg.max_grad_ratio is not None:
            bound = cfg.max_grad_ratio * out.grad_norms["kss/task_grad_norm"]
            total = out.grad_norms["kss/grad_norm"]
            out.grad_norms["kss/grad_scale"] = scale = min(1.0, bound / total) if total > 0 else 1.0
            term = term * scale
        out.term = term
        return out

    def _inert_error(self) -> InertKSSError:
        s = self.sampler
        if s.forwards_with_grad == 0:
            reason = "no_grad_forward"
            why = (f"the forward inside the KSS step ran without grad ({s.forwards_without_grad} no-grad "
                   "forward(s), none with grad): the loss that is backpropagated was computed outside it, or "
                   "under torch.no_grad / inference_mode (with a Trainer subclass, put KSSMixin first so that "
                   "its compute_loss wraps the parent's; the TRL recipe is in docs/guides/training.md)")
        else:
            reason = "nothing_trains"
            why = ("no parameter at or upstream of the drawn blocks requires grad (frozen blocks, or adapters "
                   "only on later blocks): restrict `blocks` to blocks that train, or unfreeze them")
        return InertKSSError(f"KSS step {self.step} is inert: none of the {len(self.chosen)} drawn blocks' "
                             f"snapshots carries gradient; {why}", reason=reason)
