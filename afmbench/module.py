"""The one LightningModule that lives through a whole sequence of experiences."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from afmbench.augment import CropFlip
from afmbench.config import OptimizerConfig
from afmbench.errors import DivergenceError
from afmbench.loader import TensorLoader
from afmbench.metrics import AccuracyMatrix
from afmbench.models import ContinualModel, named_parameters
from afmbench.plugin import ContinualPlugin
from afmbench.progress import ExperienceProgressBar
from afmbench.scenarios.base import Split

T = TypeVar("T")


class ContinualModule(LightningModule):
    """Trains ``model`` on one experience per ``Trainer.fit`` and records the accuracy matrix.

    The loss is the task's cross-entropy plus the penalty of every :class:`ContinualPlugin`
    among the trainer's callbacks (penalties with a closed-form gradient enter through that
    gradient, see :meth:`loss`). The experience loop sets :attr:`experience`,
    :attr:`task_id` and :attr:`train_split` before each fit and :attr:`eval_row` before each
    evaluation; plugins read them (and :meth:`batches`) in their hooks.

    With :attr:`augment` set, training batches (and only they) are augmented on the device,
    drawn from ``(seed, experience, epoch)``. :attr:`pass_memory_mb` bounds the working memory
    of per-sample importance passes and :attr:`pass_precision` sets their arithmetic (see
    :func:`afmbench.persample.per_sample_grad_sums`).
    """

    def __init__(
        self,
        model: ContinualModel,
        n_tasks: int,
        n_rows: int,
        optimizer: OptimizerConfig | None = None,
        validation: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_config = optimizer or OptimizerConfig()
        # with validation splits, their columns follow the test tasks' (evaluation loader j)
        self.n_tasks, self.has_validation = n_tasks, validation
        self.accuracy = AccuracyMatrix(n_rows, n_tasks * (2 if validation else 1))
        self.n_experiences = n_rows - 1  # experiences this run trains (1 for joint)
        self.experience = -1
        self.task_id: int | None = 0
        self.train_split: Split | None = None
        self.eval_row = 0
        # the gradient of the penalties kept in the graph, since the last optimizer step
        self._penalty_grads: dict[str, Tensor] = {}
        self._penalty_grads_synced: dict[str, Tensor] | None = None
        self._batches_in_step = 0  # batches accumulated into the coming optimizer step
        self.restored_optimizer_state: dict | None = None  # loaded once the optimizer exists
        self.loop_state: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._epoch_params: dict[str, Tensor] | None = None
        self.augment: CropFlip | None = None
        self._unaugmented: tuple[Tensor | None] = (None,)  # a tuple: __setattr__'s fast path
        # the batch the loss is being computed on and its detached logits, as one tuple: a
        # plain value takes __setattr__'s fast path every step (see below), a tensor does not
        self._batch_record: tuple[tuple[Tensor, Tensor, Tensor] | None, Tensor | None] = (
            None,
            None,
        )
        self.seed = 0
        self.pass_memory_mb = 256.0
        self.pass_precision = "32-true"

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the hook it is in (``_current_fx_name``) before and after every
        # hook call, about 40 times a training step, and ``nn.Module.__setattr__`` vets each
        # assignment against the parameters, submodules and buffers. A name already in the
        # instance dict is none of those (torch keeps them apart), and a value that is neither
        # a tensor nor a module cannot become one, so such assignments skip the checks.
        # Saves ~4 % of a small model's step (RESULTS.md: "Where a short run's time goes").
        if name in self.__dict__ and not isinstance(value, (Tensor, torch.nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- what plugins use --------------------------------------------------------------
    @property
    def batch(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The training batch the loss is being computed on (``penalty`` may read it)."""
        return self._batch_record[0]

    @property
    def batch_logits(self) -> Tensor | None:
        """The model's detached logits of :attr:`batch`, padded to the widest head."""
        return self._batch_record[1]

    def plugins(self) -> list[ContinualPlugin]:
        """The plugins attached to the current trainer, in callback order."""
        if self._trainer is None:
            return []
        return [c for c in self.trainer.callbacks if isinstance(c, ContinualPlugin)]

    def trainable_parameters(self) -> dict[str, Tensor]:
        """``named_parameters(self.model)``: the trainable parameters by name, built once per
        training epoch for the hooks that run every step (rebuilding it costs ~10 µs, and an
        SI step asked for it four times; ~3 % of a small model's step, RESULTS.md: "Where a
        short run's time goes"). An epoch cut short by an exception leaves the cache behind,
        so it is used only while the trainer is training."""
        if self._epoch_params is not None and self._trainer is not None and self._trainer.training:
            return self._epoch_params
        return named_parameters(self.model)

    def batches(
        self,
        max_samples: int | None = None,
        batch_size: int = 256,
        label: str | None = None,
        every_rank: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This rank's share of the current experience's training data, on the module's device.

        ``max_samples`` takes a fixed random subset (the same on every rank), as importance
        estimates often do. Sums over these batches must go through :meth:`all_reduce_sum`.
        ``every_rank`` gives each rank all of it instead (a sample that must be the same on
        every rank). A ``label`` shows the pass as a bar (see :meth:`progress`).
        """
        if self.train_split is None:
            raise RuntimeError("no experience is being trained")
        split = self.train_split
        if max_samples is not None and max_samples < len(split[0]):
            generator = torch.Generator().manual_seed(1_000_003 * (self.experience + 1))
            keep = torch.randperm(len(split[0]), generator=generator)[:max_samples]
            split = tuple(t[keep] for t in split)
        loader = TensorLoader(split, batch_size, shuffle=False, pad=False, shard=not every_rank)
        # as Lightning's loops hand batches to the steps: on the device, and in the dtype of
        # the weights under a true-precision setting (trainer.precision=bf16-true, 64-true)
        convert = self.trainer.precision_plugin.convert_input if self._trainer else tuple
        for batch in self.progress(loader, label) if label else loader:
            yield convert(tuple(t.to(self.device, non_blocking=True) for t in batch))

    def progress(self, iterable: Iterable[T], label: str) -> Iterable[T]:
        """``iterable``, shown as a bar labelled ``label`` under the training bar when the run
        shows progress (on rank zero): for a plugin's long work after the last step, such as
        an importance pass or retraining. Otherwise ``iterable`` itself."""
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        if isinstance(bar, ExperienceProgressBar) and bar.is_enabled:
            return bar.passing(iterable, label, self)
        return iterable

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all processes (identity in a single process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def forward(self, x: Tensor, task: Tensor | int = 0) -> Tensor:
        return self.model(x, task)

    # -- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Several CPU processes on one machine would each start one thread per core;
        # OpenMP then spins against itself. Share the cores instead.
        if self.trainer.world_size > 1 and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, self.trainer.num_devices)))

    def loss(
        self, batch: tuple[Tensor, Tensor, Tensor], closed_form: bool = False
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(total, task loss, penalty per plugin name)`` of one batch: what training minimizes
        (plugins that train outside Lightning's loop, such as ANPyC's retraining, use it too).

        ``closed_form`` (what :meth:`training_step` uses) leaves out the penalties of plugins
        with a closed-form gradient (:attr:`ContinualPlugin.closed_form_grad`):
        :meth:`on_before_optimizer_step` adds their gradient instead, and their values are
        computed only when they are logged.
        """
        x, y, t = batch
        logits = self.model(x, t if self.task_id is None else self.task_id)
        self._batch_record = (batch, logits.detach())
        task_loss = F.cross_entropy(logits, y)
        in_graph = [p for p in self.plugins() if not (closed_form and p.closed_form_grad)]
        terms = self._penalties(in_graph)
        return (task_loss + sum(terms.values()) if terms else task_loss), task_loss, terms

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, task_loss, terms = self.loss(batch, closed_form=True)
        if not self._finite_everywhere(loss):
            value = loss.item()
            where = "non-finite on another process" if math.isfinite(value) else value
            raise DivergenceError(
                f"loss became {where} in experience {self.experience + 1}/{self.n_experiences} "
                f"(epoch {self.current_epoch}, step {batch_idx})",
                "lower optimizer.lr or the strategy's strength; results so far are kept",
            )
        self._batches_in_step += 1
        if terms and any(p.needs_penalty_grads for p in self.plugins()):
            self._add_penalty_grads(self._grads_of(sum(terms.values())))
        every = self.trainer.log_every_n_steps
        watched = self.trainer.loggers or self.trainer.progress_bar_callback is not None
        if watched and every and (self.global_step + 1) % every == 0:
            # only on the steps Lightning writes to a logger, and only if a logger or the
            # progress bar reads them: self.log costs ~0.5 ms a call
            with torch.no_grad():
                closed = self._penalties(self._closed_form_plugins())
            self.log("train/loss", loss.detach() + sum(closed.values()), prog_bar=True)
            self.log("train/task_loss", task_loss)
            for name, term in {**terms, **closed}.items():
                self.log(f"train/penalty/{name}", term)
        return loss

    def _finite_everywhere(self, loss: Tensor) -> bool:
        """Whether ``loss`` is finite on every process: a rank that stopped alone would leave
        the others waiting in the gradients' all-reduce (one small all-reduce a step, DDP only)."""
        finite = torch.isfinite(loss.detach())
        if self._trainer is None or self.trainer.world_size == 1:
            return bool(finite)
        flag = finite.to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    @property
    def graph_penalty_grads(self) -> dict[str, Tensor]:
        """The gradient of the penalties kept in the autograd graph, by parameter name, as
        ``p.grad`` holds it at this optimizer step: summed over the step's accumulated batches
        with Lightning's ``1 / accumulate_grad_batches`` and, under DDP, averaged over the
        processes like ``p.grad``. A penalty that depends on the batch (the forgetting layer's)
        differs between batches and between processes."""
        if self._penalty_grads_synced is None:
            self._penalty_grads_synced = self._averaged_over_processes(self._penalty_grads)
        return self._penalty_grads_synced

    def _add_penalty_grads(self, grads: dict[str, Tensor]) -> None:
        scale = 1.0 / self.trainer.accumulate_grad_batches
        for name, grad in grads.items():
            if name in self._penalty_grads:
                self._penalty_grads[name].add_(grad, alpha=scale)
            else:
                self._penalty_grads[name] = grad * scale if scale != 1.0 else grad

    def _averaged_over_processes(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        # every rank keeps the same penalties, so all of them take this branch or none
        if not grads or self.trainer.world_size == 1:
            return grads
        params = self.trainable_parameters()
        flat = torch.cat(
            [
                grads[n].flatten() if n in grads else torch.zeros_like(p).flatten()
                for n, p in params.items()
            ]
        )
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        return {
            n: g.view_as(params[n])
            for n, g in zip(params, flat.split([p.numel() for p in params.values()]))
        }

    def _start_step(self) -> None:
        """A new optimizer step: no batch and no graph penalty's gradient counted yet."""
        self._penalty_grads, self._penalty_grads_synced = {}, None
        self._batches_in_step = 0

    def on_train_epoch_start(self) -> None:
        # after the callbacks' epoch start, where e.g. a fine-tuning callback may (un)freeze
        self._epoch_params = named_parameters(self.model)
        self._start_step()
        if self.optimizer_config.lr_milestones and self._optimizer is not None:
            for group in self._optimizer.param_groups:
                group["lr"] = self.optimizer_config.lr_at(self.current_epoch)
        if self.augment is not None:
            self.augment.start_epoch(self.seed, self.experience, self.current_epoch, self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches, once on the device, augmented (evaluation's never are); the
        inputs as loaded stay in :attr:`unaugmented`."""
        if not self.augmenting:
            return batch
        x, *rest = batch
        self._unaugmented = (x,)
        return (self.augment(x), *rest)

    @property
    def augmenting(self) -> bool:
        """Whether training batches are being augmented now (never outside training)."""
        return self.augment is not None and self._trainer is not None and self.trainer.training

    @property
    def unaugmented(self) -> Tensor | None:
        """The current training batch's inputs as loaded, before augmentation (None without
        augmentation): what replay stores, to augment afresh whenever it is drawn."""
        return self._unaugmented[0] if self.augmenting else None

    def on_train_epoch_end(self) -> None:
        self._epoch_params = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Adds the gradients of the closed-form penalties that :meth:`loss` left out of the
        graph: once per optimizer step, after every callback's ``on_before_optimizer_step``
        and after Lightning has all-reduced (DDP) and unscaled (16-bit AMP) the gradients, and
        before gradient clipping and the step. The next step's graph penalties start afresh.

        Lightning divides each batch's loss by ``accumulate_grad_batches``, also in an epoch's
        last, partial window of m batches, where the loss then weighs m / k: the closed-form
        gradients get the same weight, as the penalties would inside the loss."""
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        # no batch counted: called outside training_step's loop, as one whole step
        weight = self._batches_in_step / accumulate if self._batches_in_step else 1.0
        self._start_step()
        plugins = self.plugins()
        closed_form = [p for p in plugins if p.closed_form_grad]
        if closed_form:
            self._add_closed_form_grads(closed_form, weight)
        for plugin in plugins:
            if plugin.changes_gradient:
                plugin.change_gradient(self)

    def _add_closed_form_grads(self, plugins: list[ContinualPlugin], weight: float) -> None:
        params = self.trainable_parameters()
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        added = grads if weight == 1 else {}  # a partial window: weigh the penalties apart
        for plugin in plugins:
            plugin.add_penalty_grad(self, added)
        if added is not grads:
            for name, grad in added.items():
                if name in grads:
                    grads[name].add_(grad, alpha=weight)
                else:
                    grads[name] = grad.mul_(weight)
        for name, grad in grads.items():
            if params[name].grad is None:
                params[name].grad = grad

    def _closed_form_plugins(self) -> list[ContinualPlugin]:
        return [p for p in self.plugins() if p.closed_form_grad]

    def _penalties(self, plugins: list[ContinualPlugin]) -> dict[str, Tensor]:
        """Each plugin's penalty for the current batch by name (plugins with none left out)."""
        values = {}
        for plugin in plugins:
            value = plugin.penalty(self)
            if value is not None:
                values[plugin.name] = value
        return values

    def _grads_of(self, value: Tensor) -> dict[str, Tensor]:
        """``∂value/∂θ`` per trainable parameter name, keeping the graph for the backward pass."""
        params = self.trainable_parameters()
        found = torch.autograd.grad(
            value, list(params.values()), retain_graph=True, allow_unused=True
        )
        return {name: grad for name, grad in zip(params, found) if grad is not None}

    def accuracies(self, rows: slice | int) -> tuple[np.ndarray, np.ndarray | None]:
        """The test accuracy matrix's ``rows``, and the validation one's (None without it)."""
        matrix = self.accuracy.compute()[rows].cpu().numpy()
        test = matrix[..., : self.n_tasks]
        return test, matrix[..., self.n_tasks :] if self.has_validation else None

    def validation_step(
        self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y, t = batch
        preds = self.model(x, t).argmax(dim=1)
        self.accuracy.update(preds, y, self.eval_row, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        reset = self.optimizer_config.reset_between_experiences
        restored, self.restored_optimizer_state = self.restored_optimizer_state, None
        if self._optimizer is None or reset:
            self._optimizer = make_optimizer(self.optimizer_config, self.parameters())
            if restored and not reset:
                # here, once the weights have their final dtype (bf16-true converts them in
                # fit): loading earlier would cast the state to the unconverted weights' dtype
                self._optimizer.load_state_dict(restored)
        return self._optimizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints also carry the experience loop's state and the persistent optimizer, and
        the accuracy counts of all processes (each holds only its own share of the test sets;
        every rank runs this hook)."""
        optimizer = self._optimizer.state_dict() if self._optimizer is not None else None
        checkpoint["afmbench"] = {**self.loop_state, "optimizer": optimizer}
        correct, total = self.accuracy.global_counts()
        checkpoint["state_dict"]["accuracy.correct"] = correct
        checkpoint["state_dict"]["accuracy.total"] = total


def make_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params``."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    kind = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return kind(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
