"""The protocol of the reproduction: its constants, one run's settings (``RunSpec``) and the grids of
every table (``Protocol``): what is trained, nothing about how."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "paper_repro"
RISK_MODEL = ROOT / "hf_rksp" / "data" / "risk_model.json"
BLOCKS = "gpt.blocks"


# --- the protocol's constants -----------------------------------------------------------------------------------

LOSS_LIMIT, GRAD_LIMIT = 50.0, 500.0  # the paper's divergence label
OLD_WINDOW, OLD_MARGIN = 10, 0.5  # our old label (the retired v1 sweep's)
SPIKE_WINDOW, SPIKE_FACTOR, SPIKE_STEPS = 20, 1.5, 500  # a spike: loss > 1.5 x median of the previous 20 steps
GRAD_STEP, GRAD_VAR_STEPS = 100, 100
BIG = 1e30  # a non-finite baseline value ranks as this (the most alarming)
PROFILE_TOKENS = 2048  # held-out token states per block for RKSP at init and at the end
ACC_SEQUENCES = {"recall": 512, "lm": 64}
RECALL = {"n_pairs": 4, "seq_len": 64, "vocab": 256}
LM = {"seq_len": 128, "vocab": 1000}
HELDOUT_PROFILE, HELDOUT_ACC = 10_000, 20_000  # seed offsets of the held-out streams
SEEDS3 = (42, 123, 456)
SEEDS8 = SEEDS3 + (789, 1001, 2002, 3003, 4004)
NORMS = ("pre", "post", "rms", "deepnorm", "subln", "none")
@dataclass(frozen=True)
class Method:
    """One row of Tables 3/6 (or a pilot variant): gradient clipping and the KSS settings."""

    clip: float = 0.0  # the Trainer's max_grad_norm (0: no clipping)
    alpha: float | None = None  # KSS weight (None: KSS off)
    terms: str = "both"  # KSSConfig.terms: both, unstable, near_unit
    every: int = 10  # KSS every n optimizer steps (the paper: 10-20)
    rank: int = 32  # rank of KSS's randomized DMD; >= the whitened rank k gives the full operator
    layers: float = 0.5  # share of the blocks drawn per KSS step (the paper: 50%)
    beta: float = 1.0  # weight of the near-unit target (the paper: not given; KSSConfig's default) [ours]
    gamma: float = 0.4  # target soft near-unit mass (the paper: in [0.3, 0.5]; KSSConfig's default)
    grad_ratio: float | None = None  # KSSConfig.max_grad_ratio: KSS gradient <= this x the task's [ours]
    sketch: str = "random"  # KSSConfig.sketch: the rank-r subspace, "random" or "pod" [ours, issue 24]
    snapshots: int | None = None  # token states per KSS step (None: KSSConfig's 512; "batch": all of them)

    @property
    def kss(self) -> bool:
        return self.alpha is not None


METHODS = {  # the paper's Tables 3 and 6
    "none": Method(),
    "clip_0.5": Method(clip=0.5),
    "clip_1.0": Method(clip=1.0),
    "alpha_0.10": Method(alpha=0.10),
    "alpha_0.15": Method(alpha=0.15),
    "alpha_0.20": Method(alpha=0.20),
    "unstable_only": Method(alpha=0.15, terms="unstable"),
    "near_unit_only": Method(alpha=0.15, terms="near_unit"),
}
#: variants outside the paper's tables, for ``pilot --methods`` [ours: why KSS does not prevent divergence]
PILOT_METHODS = {
    "alpha_0.15_every_1": Method(alpha=0.15, every=1),  # KSS on every step, not every 10th
    "alpha_0.15_full_dmd": Method(alpha=0.15, rank=511),  # the full operator (k <= 511), not a rank-32 sketch
    # the strongest reading: every step, every block, the full operator
    "alpha_0.15_every_1_full_dmd_all_layers": Method(alpha=0.15, every=1, rank=511, layers=1.0),
    # the near-unit target's unknowns (issue 15: "beta, gamma"): its weight beta and its target gamma
    "alpha_0.15_beta_0.1": Method(alpha=0.15, beta=0.1),
    "alpha_0.15_beta_10": Method(alpha=0.15, beta=10.0),
    "alpha_0.15_gamma_0.3": Method(alpha=0.15, gamma=0.3),
    "alpha_0.15_gamma_0.5": Method(alpha=0.15, gamma=0.5),
    # the KSS gradient bounded relative to the task's (measured: 10-1e7x the task's after a spike or at high lr)
    "alpha_0.15_ratio_1": Method(alpha=0.15, grad_ratio=1.0),
    "alpha_0.15_ratio_0.3": Method(alpha=0.15, grad_ratio=0.3),
    # KSS under the Trainer's default clipping (max_grad_norm 1.0), as a user of KSSTrainer gets it
    "alpha_0.15_clip_1.0": Method(clip=1.0, alpha=0.15),
    # issue 24: the sketch the paper's cost O(dNr + r^3) suggests (the top-r POD subspace), and every token
    # state of the batch (16 x 64 = 1024) instead of 512
    "alpha_0.15_pod": Method(alpha=0.15, sketch="pod"),
    "alpha_0.15_batch": Method(alpha=0.15, snapshots=1024),
    # the paper's N = 2048 token states per KSS step: the whole batch of the synthetic LM (16 x 128)
    "alpha_0.15_2048": Method(alpha=0.15, snapshots=2048),
}
ALL_METHODS = {**METHODS, **PILOT_METHODS}
PAPER = {  # the numbers to compare with (the paper's Tables 1-6 and Appendix H)
    "table1": {"pre": (25, 0.0, 0.16, 0.54, 2.29), "post": (69, 0.0, 0.66, 0.31, 7.48),
               "rms": (12, 0.0, 0.16, 0.54, 2.28), "deepnorm": (12, 0.0, 0.00, 1.00, 3.94),
               "subln": (12, 0.0, 0.13, 0.54, 2.23), "none": (84, 96.4, 0.80, 0.19, 1.11)},
    "auroc": {"near_unit_mass": 0.995, "near_unit_mass_x_log10_kappa": 0.873, "spectral_radius": 0.845,
              "eigvec_condition": 0.687, "grad_norm_step1": 0.621, "grad_norm_step100": 0.685,
              "grad_var_1_100": 0.702, "loss_spikes_1_500": 0.758},
    "kss": {"none": 0.667, "clip_0.5": 0.500, "clip_1.0": 0.583, "alpha_0.10": 0.250, "alpha_0.15": 0.125,
            "alpha_0.20": 0.083, "unstable_only": 0.333, "near_unit_only": 0.417},
    "max_stable_lr": {"pre": (0.005, 0.008), "rms": (0.003, 0.005), "none": (0.002, 0.005)},
    "ece_raw_score": 0.283,
}
SUMMARY_METHOD_KEYS = {"none": "no_control", **{m: m for m in METHODS if m != "none"}}


# --- one run's settings -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """Everything that changes a run's numbers; ``key`` (sha256 of these) identifies the run on disk."""

    task: str = "recall"  # "recall" | "lm"
    norm: str = "none"
    d_model: int = 128
    n_layers: int = 4
    lr: float = 1e-3
    seed: int = 42
    method: str = "none"  # a key of METHODS
    steps: int = 500
    warmup: int = 100
    batch: int = 16
    weight_decay: float = 0.01
    schedule: str = "linear"  # transformers' lr_scheduler_type (after the linear warm-up)
    seq_len: int = RECALL["seq_len"]
    vocab: int = RECALL["vocab"]
    version: int = 1  # bump when what run_one measures changes
    # False (pilots only): train on past the label, to see whether a run the label stopped would recover
    stop_at_label: bool = True
    # [ours, issue 24] the norm before the LM head: None = the block norm's (none for "none", what every run
    # before this field had); True = a LayerNorm after No-Norm blocks too (GPT-2-style code keeps ln_f)
    final_norm: bool | None = None
    # [ours, issue 24] DeepNorm's variant: None = DeepNet's post-placed x = LN(a x + f(x)) (every run before this
    # field); "pre" = x = a x + f(LN(x)) with beta on W_o, W_2, the variant whose init matches Table 1's row
    # (benchmarks/paper_table1.py --variants: M_~1 0.00, M_>1 1.00, rho 3.88 vs the paper's 3.94)
    deepnorm: str | None = None
    # [ours, issue 25] profile every block's whitened spectrum every N steps during training with the library's
    # RKSPMonitorCallback (the monitor study's traces); None = no monitor (every run before this field)
    monitor_every: int | None = None

    def __post_init__(self):
        if self.norm not in NORMS or self.method not in ALL_METHODS or self.task not in ("recall", "lm") or \
                self.deepnorm not in (None, "pre") or (self.deepnorm is not None and self.norm != "deepnorm"):
            raise ValueError(f"bad run spec {self}")

    @property
    def n_heads(self) -> int:
        return max(1, self.d_model // 32)

    @property
    def key(self) -> str:
        d = asdict(self)
        if d["stop_at_label"]:  # the protocol's runs: keys from before this field existed stay valid
            del d["stop_at_label"]
        for k in ("final_norm", "deepnorm", "monitor_every"):  # likewise
            if d[k] is None:
                del d[k]
        if ALL_METHODS[self.method].kss:
            # KSS runs since the label reads the task gradient on KSS steps (earlier KSS runs read the total
            # gradient, which the KSS term's own gradient crossed: they are retrained, the others kept)
            d["kss_label"] = "task_grad"
            # KSS runs since the whitening is in the gradient (whitening.py, Gradients): earlier KSS runs
            # had a stop-gradient through it, whose gradient upstream of each block was wrong
            d["kss_grad"] = "whitening_in_graph"
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        final = {None: "", True: " +final_norm", False: " -final_norm"}[self.final_norm] + \
            (f" ({self.deepnorm}-placed)" if self.deepnorm else "")
        return (f"{self.task} {self.norm}{final} d{self.d_model} L{self.n_layers} lr {self.lr:g} seed {self.seed} "
                f"{self.method}")


@dataclass(frozen=True)
class Protocol:
    """The grids of every group: which runs make each table."""

    name: str
    steps: int = 500
    warmup: int = 100
    batch: int = 16
    main: tuple[int, int] = (128, 4)  # (d, L) of the KSS and max-lr tables
    sizes: tuple[tuple[int, int], ...] = ((128, 4), (128, 6), (256, 4), (256, 6))
    table1_seeds: tuple[int, ...] = SEEDS3
    table1_lrs: dict = field(default_factory=dict)  # norm -> lrs (d 128)
    table1_lrs_large: dict | None = None  # norm -> lrs at d >= 256 (None: table1_lrs)
    kss_lrs: tuple[float, ...] = ()
    kss_seeds: tuple[int, ...] = SEEDS8
    kss_methods: tuple[str, ...] = tuple(METHODS)
    maxlr_lrs: dict = field(default_factory=dict)  # norm -> lrs
    maxlr_seeds: tuple[int, ...] = SEEDS8
    maxlr_method: str = "alpha_0.15"
    lm_norms: tuple[str, ...] = NORMS
    lm_lrs: tuple[float, ...] = ()
    lm_seeds: tuple[int, ...] = SEEDS3
    #: issue 24's calibration of the regime: No-Norm blocks under a final LayerNorm, no control and clip 1.0
    #: over an lr grid, looking for the paper's signature (no control diverges 50-70%, clip 1.0 still >= 40%)
    regime_lrs: tuple[float, ...] = ()
    regime_methods: tuple[str, ...] = ("none", "clip_1.0")
    regime_seeds: tuple[int, ...] = SEEDS8
    #: issue 24, step 3: Tables 3/6 in that regime (24 trials per method: 3 lrs x 8 seeds)
    regime_kss_lrs: tuple[float, ...] = ()
    regime_kss_methods: tuple[str, ...] = ("none", "clip_0.5", "clip_1.0", "alpha_0.10", "alpha_0.15", "alpha_0.20",
                                           "alpha_0.15_pod", "alpha_0.15_batch", "unstable_only", "near_unit_only")
    #: issue 24, step 3: Table 5 in that regime (No-Norm + final norm; the regime groups' lrs are reused)
    regime_maxlr_lrs: tuple[float, ...] = ()
    regime_maxlr_methods: tuple[str, ...] = ("none", "alpha_0.15")
    #: issue 24, step 5: a learning regime, the synthetic LM task where models learn before they diverge:
    #: (norm, final_norm) -> lrs, each without and with KSS
    learning_lrs: dict = field(default_factory=dict)
    learning_methods: tuple[str, ...] = ("none", "alpha_0.15")
    learning_seeds: tuple[int, ...] = SEEDS8
    #: the KSS variants (POD sketch, the paper's N = 2048) where the learning group diverges: (norm, final_norm, lr)
    learning_variants_at: tuple = ()
    learning_variant_methods: tuple[str, ...] = ("alpha_0.15_pod", "alpha_0.15_2048")
    #: issue 25, the monitor study: (norm, final_norm, d, L, lr) traced with the monitor every monitor_every steps
    monitor_at: tuple = ()
    monitor_seeds: tuple[int, ...] = (42, 123)
    monitor_every: int = 5

    def spec(self, **kw) -> RunSpec:
        return RunSpec(steps=self.steps, warmup=self.warmup, batch=self.batch, **kw)

    def table1_grid(self, d: int) -> dict:
        return self.table1_lrs if d < 256 or self.table1_lrs_large is None else self.table1_lrs_large

    def table1(self) -> list[RunSpec]:
        return [self.spec(norm=n, d_model=d, n_layers=L, lr=lr, seed=s)
                for d, L in self.sizes for n, lrs in self.table1_grid(d).items() for lr in lrs
                for s in self.table1_seeds]

    def kss(self, method: str | None = None) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(norm="none", d_model=d, n_layers=L, lr=lr, seed=s, method=m)
                for m in (self.kss_methods if method is None else (method,)) for lr in self.kss_lrs
                for s in self.kss_seeds]

    def maxlr(self, norm: str | None = None, method: str | None = None) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(norm=n, d_model=d, n_layers=L, lr=lr, seed=s, method=m)
                for n, lrs in self.maxlr_lrs.items() if norm in (None, n)
                for m in ("none", self.maxlr_method) if method in (None, m) for lr in lrs for s in self.maxlr_seeds]

    def lm(self) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(task="lm", norm=n, d_model=d, n_layers=L, lr=lr, seed=s, **LM)
                for n in self.lm_norms for lr in self.lm_lrs for s in self.lm_seeds]

    def regime(self) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(norm="none", final_norm=True, d_model=d, n_layers=L, lr=lr, seed=s, method=m)
                for lr in self.regime_lrs for m in self.regime_methods for s in self.regime_seeds]

    def regime_kss(self, method: str | None = None) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(norm="none", final_norm=True, d_model=d, n_layers=L, lr=lr, seed=s, method=m)
                for m in (self.regime_kss_methods if method is None else (method,)) for lr in self.regime_kss_lrs
                for s in self.regime_seeds]

    def regime_maxlr(self, method: str | None = None) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(norm="none", final_norm=True, d_model=d, n_layers=L, lr=lr, seed=s, method=m)
                for m in self.regime_maxlr_methods if method in (None, m) for lr in self.regime_maxlr_lrs
                for s in self.regime_seeds]

    def learning(self) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(task="lm", norm=n, final_norm=final, d_model=d, n_layers=L, lr=lr, seed=s, method=m, **LM)
                for (n, final), lrs in self.learning_lrs.items() for lr in lrs for m in self.learning_methods
                for s in self.learning_seeds]

    def learning_variants(self) -> list[RunSpec]:
        d, L = self.main
        return [self.spec(task="lm", norm=n, final_norm=final, d_model=d, n_layers=L, lr=lr, seed=s, method=m, **LM)
                for n, final, lr in self.learning_variants_at for m in self.learning_variant_methods
                for s in self.learning_seeds]

    def monitor(self) -> list[RunSpec]:
        return [self.spec(norm=n, final_norm=final, d_model=d, n_layers=L, lr=lr, seed=s,
                          monitor_every=self.monitor_every)
                for n, final, d, L, lr in self.monitor_at for s in self.monitor_seeds]

    def paper_design_lr(self, norm: str, d: int) -> float | None:
        """Table 2 under the paper's design [ours, issue 24]: every normalization at the smallest lr of its
        Table 1 grid (stable at every size), No-Norm at the largest (where it diverges); None: not in the grid."""
        lrs = self.table1_grid(d).get(norm)
        if not lrs:
            return None
        return max(lrs) if norm == "none" else min(lrs)

    def table2_paper(self) -> list[RunSpec]:
        """The runs the paper's design needs beyond Table 1's: DeepNorm pre-placed (the variant matching
        Table 1's row) at the design's lr, every size and seed."""
        return [self.spec(norm="deepnorm", deepnorm="pre", d_model=d, n_layers=L,
                          lr=self.paper_design_lr("deepnorm", d), seed=s)
                for d, L in self.sizes for s in self.table1_seeds if self.paper_design_lr("deepnorm", d) is not None]

    def group(self, name: str) -> list[RunSpec]:
        return {"table1": self.table1, "kss": self.kss, "maxlr": self.maxlr, "lm": self.lm,
                "regime": self.regime, "regime_kss": self.regime_kss, "table2_paper": self.table2_paper,
                "regime_maxlr": self.regime_maxlr, "learning": self.learning,
                "learning_variants": self.learning_variants, "monitor": self.monitor}[name]()

    def no_control(self) -> list[RunSpec]:
        """Every no-control recall run of the protocol (the pooled population of the risk model)."""
        return unique([s for s in self.table1() + self.kss("none") + self.maxlr(method="none")])


def unique(specs: list[RunSpec]) -> list[RunSpec]:
    seen, out = set(), []
    for s in specs:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


#: the reproduction [ours: the lr grids come from the pilots at d 128, L 4 (docs/results/paper_repro.md,
#: "Pilot findings"): No-Norm diverged 0/2 at lr 2e-3, 1/3 at 3e-3, 3/3 at 4e-3, 2/2 at 5e-3 and 1e-2; Pre-LN 0/1 at
#: 0.03 and 0.1, 1/1 at 0.3 and 1.0; RMSNorm, Post-LN and SubLN 1/1 at 1.0; Post-LN and DeepNorm 0/1 at 0.1].
#: At d 256 (3-5x the cost per step) Table 1 keeps each grid's two ends, stable and divergent.
PAPER_PROTOCOL = Protocol(
    name="paper",
    table1_lrs={**{n: (1e-2, 1e-1, 1.0) for n in NORMS if n != "none"}, "none": (1e-3, 3e-3, 1e-2)},
    table1_lrs_large={**{n: (1e-1, 1.0) for n in NORMS if n != "none"}, "none": (1e-3, 1e-2)},
    kss_lrs=(3e-3, 3.5e-3, 4e-3),
    maxlr_lrs={"pre": (0.1, 0.2, 0.3, 0.5), "rms": (0.1, 0.2, 0.3, 0.5),
               "none": (2e-3, 3e-3, 3.5e-3, 4e-3, 5e-3, 7e-3)},
    lm_lrs=(1e-3, 3e-3, 1e-2),
    # [ours] around the edge a pilot found (issue 24): 0/2 diverged at 7.5e-3, 3/3 at 1e-2, clip 1.0 2/2 at 1e-2
    regime_lrs=(7.5e-3, 8.5e-3, 1e-2, 1.2e-2),
    # [ours] from the regime calibration (docs/results/paper_repro.md): at d 128, L 4 no control diverged 3/8,
    # 5/8 and 5/7 at these lrs while clip 1.0 diverged 6/8, 6/8 and 7/7 (first 45 runs)
    regime_kss_lrs=(7.5e-3, 8.5e-3, 1e-2),
    # [ours] below the regime's lrs, down to where no pilot diverged (3e-3); 7.5e-3 and up are the regime's runs
    regime_maxlr_lrs=(3e-3, 5e-3, 6e-3, 7.5e-3, 8.5e-3, 1e-2),
    # [ours] from the LM pilots (pilot/runs.jsonl, 2 seeds): No-Norm + final norm learns at 3e-3 (acc 0.28-0.32)
    # and diverges at 8.5e-3; Pre-LN learns at 0.03 (acc 0.28-0.32) and stalls at 0.1
    learning_lrs={("none", True): (3e-3, 8.5e-3), ("pre", None): (0.03,)},
    learning_variants_at=(("none", True, 8.5e-3),),
    # [ours, issue 25] the monitor study: each normalization's stable and divergent lrs from the runs above
    # (d 128, L 4 unless stated), plus the configurations benchmarks/preflight.py holds out (lrs 3.5e-3, 8.5e-3,
    # 0.2 and d 256 L 6), which benchmarks/monitor_warning.py holds out too
    monitor_at=tuple(("none", None, 128, 4, lr) for lr in (2e-3, 3e-3, 4e-3, 5e-3, 7e-3))
    + tuple(("none", True, 128, 4, lr) for lr in (3e-3, 6e-3, 7.5e-3, 1e-2, 1.2e-2))
    + tuple(("pre", None, 128, 4, lr) for lr in (0.1, 0.3, 0.5))
    + tuple(("rms", None, 128, 4, lr) for lr in (0.1, 0.3, 0.5, 1.0))
    + tuple((n, None, 128, 4, lr) for n in ("post", "deepnorm", "subln") for lr in (0.1, 1.0))
    + tuple(("none", None, 128, 6, lr) for lr in (1e-3, 3e-3))
    # held out
    + (("none", None, 128, 4, 3.5e-3), ("none", True, 128, 4, 8.5e-3), ("pre", None, 128, 4, 0.2),
       ("rms", None, 128, 4, 0.2), ("none", None, 256, 6, 1e-3), ("none", None, 256, 6, 1e-2),
       ("pre", None, 256, 6, 0.1), ("pre", None, 256, 6, 1.0)),
)
#: a pipeline check in seconds (tests/test_paper_repro.py): tiny models, 20 steps
SMOKE_PROTOCOL = Protocol(
    name="smoke", steps=20, warmup=5, batch=8, main=(32, 2), sizes=((32, 2),), table1_seeds=(42,),
    table1_lrs={"pre": (1e-3,), "none": (0.3,)}, kss_lrs=(0.01,), kss_seeds=(42,),
    kss_methods=("none", "clip_1.0", "alpha_0.15"), maxlr_lrs={"none": (0.01,)}, maxlr_seeds=(42,),
    lm_norms=("none",), lm_lrs=(1e-3,), lm_seeds=(42,), regime_lrs=(0.01,), regime_seeds=(42,),
    regime_kss_lrs=(0.01,), regime_kss_methods=("none", "alpha_0.15_pod"), regime_maxlr_lrs=(0.01,),
    learning_lrs={("none", True): (0.01,)}, learning_seeds=(42,), learning_variants_at=(("none", True, 0.01),),
    learning_variant_methods=("alpha_0.15_2048",), monitor_at=(("none", None, 32, 2, 0.3),), monitor_seeds=(42,),
    monitor_every=5,
)
PROTOCOLS = {"paper": PAPER_PROTOCOL, "smoke": SMOKE_PROTOCOL}
GROUPS = ("table1", "kss", "maxlr", "lm", "regime", "regime_kss", "table2_paper", "regime_maxlr", "learning",
          "learning_variants", "monitor")
ALL = ("kss", "maxlr", "table1")  # "all": the paper's tables (lm is optional)
