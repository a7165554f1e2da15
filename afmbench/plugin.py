"""The plugin protocol: a Lightning ``Callback`` that may add a term to the training loss.

A Lightning callback cannot change the loss, so :class:`ContinualModule` asks every plugin
among the trainer's callbacks for :meth:`ContinualPlugin.penalty` in ``training_step`` and adds
them up. Everything else a strategy does happens in ordinary Lightning hooks, each called once
per experience because every experience is one ``Trainer.fit``:

- :meth:`ContinualPlugin.prepare`: change the model's structure (the forgetting layer inserts
  its gates); called by the loop before anything else, and again from ``setup`` if you like
  (it must be idempotent), so weights can be restored from a checkpoint into the final shape;
- ``on_train_start``: the experience begins (e.g. remember the starting parameters);
- ``on_before_optimizer_step`` / ``on_train_batch_end``: per-step bookkeeping (SI's path
  integral); see :attr:`ContinualPlugin.closed_form_grad` for what ``p.grad`` holds there,
  and take the parameters by name from ``module.trainable_parameters()`` (built once an
  epoch, not every step);
- :meth:`ContinualPlugin.penalty` may read the batch being trained on as ``module.batch``
  (``(x, y, t)`` on the device, augmented if the run augments) and the model's detached
  logits of it as ``module.batch_logits``: replay adds its loss on stored samples there,
  distillation its term on the current inputs;
- :meth:`ContinualPlugin.change_gradient` (with :attr:`ContinualPlugin.changes_gradient`
  set) may rewrite ``p.grad`` in place right before the optimizer step: the gradient is then
  complete (DDP's all-reduce, AMP's unscaling and every closed-form penalty gradient are in)
  and the same on every rank, as A-GEM's projection needs;
- ``on_train_end``: the experience is learned; estimate importance and set anchors. This runs
  on every rank; sums over data must go through ``module.all_reduce_sum`` so all ranks agree.
  Long work here shows as a bar when given a label: ``module.batches(label=...)`` for a pass
  over the data, ``module.progress(iterable, label)`` for anything else;
- ``state_dict`` / ``load_state_dict``: everything needed to continue, saved in checkpoints.

:meth:`importance` exposes the current per-parameter importance (for histograms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from torch import Tensor

from afmbench.config import typed_arguments

if TYPE_CHECKING:
    from afmbench.models import ContinualModel
    from afmbench.module import ContinualModule


class ContinualPlugin(Callback):
    """Base class of strategy plugins and the forgetting-layer callback.

    A subclass's constructor arguments are checked against its type hints before its
    ``__init__`` runs (``EWC(lambda_="big")`` is a one-line :class:`ConfigError`, as on the
    command line); :attr:`config_group` names them in the message. They are also recorded:
    with the class, they are the plugin's :meth:`identity` in a run's config hash.
    """

    #: Where the constructor's arguments live in the CLI's configuration.
    config_group: str = "strategy"
    #: Short name used in logs (``train/penalty/<name>``), checkpoints and results.
    name: str = "plugin"
    #: Set by plugins that need the gradient of the task loss alone (SI). In a callback's
    #: ``on_before_optimizer_step``, ``p.grad`` holds the gradient of the task loss plus the
    #: penalties *without* a closed form; the module then also keeps the gradient of the
    #: latter, as ``p.grad`` holds it (accumulated batches, averaged over DDP processes), in
    #: ``module.graph_penalty_grads``, so it can be taken out.
    needs_penalty_grads: bool = False
    #: Set by plugins whose :meth:`add_penalty_grad` gives the penalty's gradient in closed
    #: form. The module then keeps their penalty out of the autograd graph and adds the
    #: gradient in its own ``on_before_optimizer_step`` (after every callback's): one fused
    #: update per parameter instead of a graph of four operations and their backward.
    closed_form_grad: bool = False
    #: Set by plugins that rewrite the gradient before each step (:meth:`change_gradient`).
    changes_gradient: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = typed_arguments(
                cls.__dict__["__init__"], cls.config_group, remember="_init_args"
            )

    def prepare(self, model: ContinualModel) -> None:
        """Change ``model``'s structure before an optimizer or a checkpoint sees it (idempotent)."""
        return None

    def penalty(self, module: ContinualModule) -> Tensor | None:
        """The term this plugin adds to the loss for the current batch (None: nothing)."""
        return None

    def add_penalty_grad(self, module: ContinualModule, grads: dict[str, Tensor]) -> None:
        """Add the gradient of :meth:`penalty` into ``grads[name]`` in place (a missing entry
        starts at zero). Only called where :attr:`closed_form_grad` is set."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form penalty gradient")

    def change_gradient(self, module: ContinualModule) -> None:
        """Rewrite ``p.grad`` of ``module.trainable_parameters()`` in place, once per optimizer
        step, after every other gradient is in. Only called where :attr:`changes_gradient`
        is set; whatever it computes must agree across DDP processes."""
        raise NotImplementedError(f"{type(self).__name__} does not change gradients")

    def run_metrics(self) -> dict[str, Any]:
        """Plain values the run's ``metrics.json`` keeps under ``plugins.<name>`` (e.g. a
        replay buffer's memory); empty: nothing."""
        return {}

    def importance(self) -> dict[str, Tensor]:
        """Current importance per parameter name (empty if the plugin keeps none)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What makes this plugin compute what it does: its class, name and constructor
        arguments (defaults filled in), as recorded when it was built."""
        cls = type(self)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "name": self.name,
            "args": dict(getattr(self, "_init_args", {})),
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
