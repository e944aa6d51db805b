"""Using directions: linear probes, CCS, geometry and rank-one model editing (ROME)."""

# Linear probes, geometry and CCS: docs/probes.md. ROME: rome*.py.
from mechscope.probes.activations import ProbeError, gather_activations
from mechscope.probes.calendar import CalendarResult, analyse_calendar
from mechscope.probes.ccs import CCSConfig, CCSProbe, ccs_layers, train_ccs
from mechscope.probes.geometry import (
    CircleFit,
    Projection,
    concept_directions,
    cosine_matrix,
    fit_circle,
    hierarchy_cosines,
    pca,
    project,
    whitening,
)
from mechscope.probes.linear import LinearProbe, ProbeConfig, ProbeResult, probe_layers, train_probes
from mechscope.probes.rome import Edit, EditError, EditRequest, RomeConfig, rank_one_update, rome
from mechscope.probes.rome_eval import EditEvaluation, evaluate_edit

__all__ = [
    "Edit",
    "EditError",
    "EditEvaluation",
    "EditRequest",
    "RomeConfig",
    "evaluate_edit",
    "rank_one_update",
    "rome",
    # probes
    "CCSConfig",
    "CCSProbe",
    "CalendarResult",
    "CircleFit",
    "LinearProbe",
    "ProbeConfig",
    "ProbeError",
    "ProbeResult",
    "Projection",
    "analyse_calendar",
    "ccs_layers",
    "concept_directions",
    "cosine_matrix",
    "fit_circle",
    "gather_activations",
    "hierarchy_cosines",
    "pca",
    "probe_layers",
    "project",
    "train_ccs",
    "train_probes",
    "whitening",
]
