"""Metrics of scLDM, exactly defined: reconstruction (paper Table 1) and generation (Tables 2-3).

`features` builds the 30-PC feature space, `distances` compares two sets of cells in it, `generation` runs them
overall, per class and over replicates, `reconstruction` scores a VAE's test reconstruction, `multiqc` writes
the MultiQC table. No torch here.
"""

from .distances import (
    DEFAULT_CLASS_MAX_CELLS,
    DEFAULT_K,
    DEFAULT_MAX_CELLS,
    DEFAULT_MIN_CELLS_PER_CLASS,
    DEFAULT_W2_MAX_CELLS,
    DISTRIBUTION_METRICS,
    JOINT_SEPARATOR,
    MMD_SIGMAS,
    frechet_distance,
    knn_label_f1,
    mmd2_rbf,
    one_nn_accuracy,
    prdc,
    tstr_accuracy,
    w2,
)
from .features import FEATURE_SPACE_VARIANT, align_genes, feature_space, log_normalize, pca_fit
from .generation import aggregate_replicates, distribution_metrics, effective_min_cells_per_class, evaluate, mean_sem
from .multiqc import to_mqc_tsv
from .reconstruction import reconstruction_metrics

__all__ = [
    "DEFAULT_CLASS_MAX_CELLS",
    "effective_min_cells_per_class",
    "DEFAULT_K",
    "DEFAULT_MAX_CELLS",
    "DEFAULT_MIN_CELLS_PER_CLASS",
    "DEFAULT_W2_MAX_CELLS",
    "DISTRIBUTION_METRICS",
    "FEATURE_SPACE_VARIANT",
    "JOINT_SEPARATOR",
    "MMD_SIGMAS",
    "aggregate_replicates",
    "align_genes",
    "distribution_metrics",
    "evaluate",
    "feature_space",
    "frechet_distance",
    "knn_label_f1",
    "log_normalize",
    "mean_sem",
    "mmd2_rbf",
    "one_nn_accuracy",
    "pca_fit",
    "prdc",
    "reconstruction_metrics",
    "to_mqc_tsv",
    "tstr_accuracy",
    "w2",
]
