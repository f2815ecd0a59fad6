"""safenorm's evaluation harness: how much does a normalization layer memorize and leak?

For each normalization variant (``bn``, ``ghost``, ``clipped``, ``dp``, ``opacus-fix``,
``groupnorm``, ``instancenorm``, ``layernorm``, ``none``; more via :func:`register_variant`) on
the same data, model family, seeds and schedule, it measures

1. canary memorization: exposure of out-of-distribution canaries and the in-out gap of LiRA's
   logit-scaled confidence;
2. influence: per-sample gradient norms of typical samples vs canaries, and the influence a
   sample exerts through the batch statistics on its batch mates;
3. membership inference: LOSS, LiRA (offline/online, fixed variance), RMIA with AUC and TPR at
   low FPR (confidence intervals, log-log ROC); eval-mode queries, and train-mode queries as a
   separate threat model;
4. for DP variants: the one-run audit's empirical epsilon lower bound beside the accountant's.

Command line: ``safenorm-eval run --profile quick``. Python::

    >>> from safenorm.evaluation import Harness, get_profile, write_report
    >>> cfg = get_profile("quick")
    >>> h = Harness(cfg, "out")            # or Harness(cfg, "out", model_fn=..., data=...)
    >>> h.run()
    >>> write_report("out", cfg, h.analyze(), h.unavailable())
"""

from safenorm.evaluation.attacks import ATTACKS, Attack, run_attack
from safenorm.evaluation.audit import (
    epsilon_lower_bound,
    max_visible_epsilon,
    one_run_audit,
    p_value,
)
from safenorm.evaluation.canaries import CANARIES, Universe, build_universe, membership_masks
from safenorm.evaluation.config import (
    PROFILES,
    AnalysisConfig,
    AttackConfig,
    CanaryConfig,
    DataConfig,
    DPConfig,
    EvalConfig,
    TrainConfig,
    VariantOptions,
    apply_overrides,
    get_profile,
)
from safenorm.evaluation.data import DATASETS, ImageDataset, load_dataset
from safenorm.evaluation.harness import Harness, Shard, VariantResult, merge_outputs
from safenorm.evaluation.metrics import (
    CI_METHODS,
    exposure,
    extrapolated_exposure,
    reference_exposure,
    roc_curve,
    summarize_roc,
    tpr_at_fpr,
)
from safenorm.evaluation.models import MODELS, ResNet, SmallCNN, build_model
from safenorm.evaluation.registry import Registry
from safenorm.evaluation.report import write_report
from safenorm.evaluation.training import TRAINERS
from safenorm.evaluation.variants import VARIANTS, Variant, get_variant, register_variant

__all__ = [
    "ATTACKS",
    "CANARIES",
    "CI_METHODS",
    "DATASETS",
    "MODELS",
    "PROFILES",
    "TRAINERS",
    "VARIANTS",
    "AnalysisConfig",
    "Attack",
    "AttackConfig",
    "CanaryConfig",
    "DPConfig",
    "DataConfig",
    "EvalConfig",
    "Harness",
    "ImageDataset",
    "Registry",
    "ResNet",
    "Shard",
    "SmallCNN",
    "TrainConfig",
    "Universe",
    "Variant",
    "VariantOptions",
    "VariantResult",
    "apply_overrides",
    "build_model",
    "build_universe",
    "epsilon_lower_bound",
    "exposure",
    "extrapolated_exposure",
    "get_profile",
    "get_variant",
    "load_dataset",
    "max_visible_epsilon",
    "membership_masks",
    "merge_outputs",
    "one_run_audit",
    "p_value",
    "reference_exposure",
    "register_variant",
    "roc_curve",
    "run_attack",
    "summarize_roc",
    "tpr_at_fpr",
    "write_report",
]
