"""Synthesizers (one per method) and the runner. Importing this registers every method."""

from condense.synth import (
    distribution_matching,  # noqa: F401  (dm, datadam)
    gradient_matching,  # noqa: F401  (dc, dsa)
    pruning,  # noqa: F401  (grand, el2n, forgetting)
    recovery,  # noqa: F401  (sre2l, cda, committee, rded)
    selection,  # noqa: F401  (random, herding, kcenter)
    trajectory,  # noqa: F401  (mtt, tesla, ftd, datm)
)
from condense.synth.base import SYNTHESIZERS, SynthContext, Synthesizer, register_synthesizer

__all__ = ["SYNTHESIZERS", "SynthContext", "Synthesizer", "register_synthesizer"]
