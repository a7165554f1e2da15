"""The plug-and-play forgetting layer (AFM paper) as a Lightning callback.

- :class:`ForgettingLayer`: per-unit switches after a hidden activation (eqs. 3-5);
- :class:`ForgettingLayerCallback`: puts them into any model, adds their losses (eqs. 6, 8, 9)
  and estimates neuron and parameter importance (eq. 2) after each experience;
- its analyses of a trained model or a finished run are in :mod:`afmbench.probes`.
"""

from afmbench.forgetting.callback import ForgettingLayerCallback
from afmbench.forgetting.importance import neuron_importance, parameter_importance, unit_means
from afmbench.forgetting.layer import (
    ForgettingLayer,
    attach,
    inhibition_loss,
    lateral_inhibition_loss,
    sites,
)

__all__ = [
    "ForgettingLayer",
    "ForgettingLayerCallback",
    "attach",
    "inhibition_loss",
    "lateral_inhibition_loss",
    "neuron_importance",
    "parameter_importance",
    "sites",
    "unit_means",
]
