"""What happens around the training loop's steps and epochs: resume, training state, checkpoints, evaluation,
TensorBoard, progress bar, logging.

A hook is a `TrainHook` whose methods the loop (`loop.TrainLoop`) calls, in the order of its hook list, at
five points: `before_train` (after the model is on its device, before the first step), `before_epoch`
(after the epoch's schedule and sampler are set: `loop.n_iters`, `loop.start_batch`), `after_step` (after
each optimiser step; `loop.step_stats` holds the running averages every SOLVER.LOG_PERIOD iterations, else
None), `after_epoch` (the epoch's row is `loop.result.history[-1]`), and `after_train` (at the end, or when
`stop_after_steps` stopped the run: `loop.result.stopped`). `do_train` builds the list from its arguments
(`default_hooks`); a library user may add their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from .distributed import all_gather_objects
from .train_state import STATE_FILE, capture_rng, restore_rng, save_state_dict, save_train_state

if TYPE_CHECKING:
    from .loop import TrainLoop

logger = logging.getLogger("reid_lite.train")

__all__ = ["CheckpointHook", "EpochCallbackHook", "EvalHook", "EvaluateFn", "LogHook", "ProgressHook", "ResumeHook",
           "TensorBoardHook", "TrainHook", "TrainStateHook"]

#: `evaluate_fn(epoch, model) -> metrics` (at least 'mAP'), called on every process (extraction is shared).
EvaluateFn = Callable[[int, nn.Module], dict[str, float]]

#: The evaluation metrics written to TensorBoard (when the evaluator returns them).
EVAL_SCALARS = ("mAP", "rank1", "rank5", "rank10", "mINP")


class TrainHook:
    """Does nothing at every point of the loop; subclasses override the points they need."""

    def before_train(self, loop: TrainLoop) -> None:
        """Called once, before the first epoch."""

    def before_epoch(self, loop: TrainLoop) -> None:
        """Called at the start of every epoch (also one resumed inside)."""

    def after_step(self, loop: TrainLoop) -> None:
        """Called after every optimiser step."""

    def after_epoch(self, loop: TrainLoop) -> None:
        """Called after every completed epoch (`loop.epoch` is still that epoch)."""

    def after_train(self, loop: TrainLoop) -> None:
        """Called once, when the run finishes or stops early."""


class ResumeHook(TrainHook):
    """Restores a state from `load_train_state` before the first step: the run continues bit for bit."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def before_train(self, loop: TrainLoop) -> None:
        """Load the model, optimiser, schedule, scaler, position, meters, history and random streams."""
        loop.load_state(self.state)
        rngs = self.state["rng"]
        if len(rngs) == loop.ctx.world_size:
            restore_rng(rngs[loop.ctx.rank])
        else:
            logger.warning("resuming %d process(es) from a state of %d: model-side random draws (drop path) "
                           "restart from a new stream, so the run is not bit-identical", loop.ctx.world_size,
                           len(rngs))
        logger.info("resumed at epoch %d, batch %d (step %d)", loop.epoch, loop.start_batch, loop.result.global_step)


class TrainStateHook(TrainHook):
    """Writes the resumable state (`last_checkpoint.pth`, rank 0) after every epoch, every `every_steps` steps
    (0: never inside an epoch) and when the run stops early."""

    def __init__(self, every_steps: int = 0) -> None:
        self.every_steps = every_steps

    def after_step(self, loop: TrainLoop) -> None:
        """Save inside the epoch when stopping or at the step period."""
        if loop.stopping or (self.every_steps > 0 and loop.result.global_step % self.every_steps == 0):
            self.save(loop, loop.epoch, loop.n_iter + 1, fresh_epoch=False)

    def after_epoch(self, loop: TrainLoop) -> None:
        """Save the start of the next epoch (so a resume never repeats this one)."""
        self.save(loop, loop.epoch + 1, 0, fresh_epoch=True)

    @staticmethod
    def save(loop: TrainLoop, at_epoch: int, at_batch: int, fresh_epoch: bool) -> None:
        """Write the state at (`at_epoch`, `at_batch`); every process takes part (random streams, barrier)."""
        rngs = all_gather_objects(capture_rng())  # every process's streams, so each resumes its own
        if loop.ctx.is_main:
            save_train_state(loop.out_dir / STATE_FILE, loop.state_dict(at_epoch, at_batch, rngs, fresh_epoch))
        loop.ctx.barrier()


class CheckpointHook(TrainHook):
    """Writes `<MODEL.NAME>_<epoch>.pth` (plain state dict, rank 0) every `period` epochs and after the last."""

    def __init__(self, period: int) -> None:
        self.period = period

    def after_epoch(self, loop: TrainLoop) -> None:
        """Save the weights when the epoch is due."""
        epoch = loop.epoch
        if loop.ctx.is_main and ((self.period > 0 and epoch % self.period == 0) or epoch == loop.epochs):
            path = save_state_dict(loop.model, loop.out_dir / f"{loop.cfg.MODEL.NAME}_{epoch}.pth")
            loop.result.checkpoints.append(path)
            logger.info("saved %s", path)


class EvalHook(TrainHook):
    """Evaluates every `period` epochs and after the last; keeps the best mAP's weights as
    `<MODEL.NAME>_best.pth` (rank 0)."""

    def __init__(self, evaluate_fn: EvaluateFn, period: int) -> None:
        self.evaluate_fn = evaluate_fn
        self.period = period

    def after_epoch(self, loop: TrainLoop) -> None:
        """Evaluate when due, record the metrics in `loop.result.evals`, update `loop.result.best`."""
        epoch, result = loop.epoch, loop.result
        if not (self.period > 0 and (epoch % self.period == 0 or epoch == loop.epochs)):
            return
        metrics = {"epoch": epoch, **self.evaluate_fn(epoch, loop.model)}
        result.evals.append(metrics)
        logger.info("Validation epoch %d: mAP %.1f%%, Rank-1 %.1f%%", epoch, 100 * metrics["mAP"],
                    100 * metrics.get("rank1", float("nan")))
        if result.best is None or metrics["mAP"] > result.best["mAP"]:
            result.best = metrics
            if loop.ctx.is_main:
                path = loop.out_dir / f"{loop.cfg.MODEL.NAME}_best.pth"
                save_state_dict(loop.model, path)
                logger.info("new best mAP %.1f%% at epoch %d: %s", 100 * metrics["mAP"], epoch, path)


class TensorBoardHook(TrainHook):
    """Scalars under `<output_dir>/tensorboard/`: train loss/acc/lr at log steps, epoch loss/acc, evaluations."""

    def __init__(self) -> None:
        self.writer: Any = None

    def before_train(self, loop: TrainLoop) -> None:
        """Open the writer; a resumed run drops the events past its step (they were never saved)."""
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package loads only when used

        self.writer = SummaryWriter(log_dir=str(loop.out_dir / "tensorboard"),
                                    purge_step=loop.result.global_step or None)

    def after_step(self, loop: TrainLoop) -> None:
        """The running averages at log steps."""
        if loop.step_stats is not None:
            for key in ("loss", "acc", "lr"):
                self.writer.add_scalar(f"train/{key}", loop.step_stats[key], loop.result.global_step)

    def after_epoch(self, loop: TrainLoop) -> None:
        """The epoch's averages, and the evaluation when there was one this epoch."""
        row = loop.result.history[-1]
        self.writer.add_scalar("epoch/loss", row["loss"], loop.epoch)
        self.writer.add_scalar("epoch/acc", row["acc"], loop.epoch)
        evals = loop.result.evals
        if evals and evals[-1]["epoch"] == loop.epoch:
            for key in EVAL_SCALARS:
                if key in evals[-1]:
                    self.writer.add_scalar(f"eval/{key}", evals[-1][key], loop.epoch)

    def after_train(self, loop: TrainLoop) -> None:
        """Close the writer."""
        self.writer.close()


class ProgressHook(TrainHook):
    """A tqdm bar per epoch with the running loss and accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None

    def before_epoch(self, loop: TrainLoop) -> None:
        """Open the epoch's bar at the resumed position."""
        from tqdm.auto import tqdm  # loads only when a bar is shown

        self.bar = tqdm(total=loop.n_iters, initial=loop.start_batch, desc=f"epoch {loop.epoch}/{loop.epochs}",
                        unit="batch", dynamic_ncols=True, leave=False)

    def after_step(self, loop: TrainLoop) -> None:
        """Advance the bar; show the running averages at log steps."""
        self.bar.update(1)
        if loop.step_stats is not None:
            self.bar.set_postfix(loss=f"{loop.step_stats['loss']:.3f}", acc=f"{loop.step_stats['acc']:.3f}")

    def after_epoch(self, loop: TrainLoop) -> None:
        """Close the epoch's bar."""
        self.close()

    def after_train(self, loop: TrainLoop) -> None:
        """Close the bar of an epoch stopped early."""
        self.close()

    def close(self) -> None:
        """Close the open bar, if any."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogHook(TrainHook):
    """The training log: running averages every SOLVER.LOG_PERIOD iterations, each epoch's summary, the end."""

    def after_step(self, loop: TrainLoop) -> None:
        """Log the running averages at log steps."""
        if loop.step_stats is not None:
            stats = loop.step_stats
            logger.info("Epoch[%d] Iteration[%d/%d] Loss: %.3f, Acc: %.3f, Base Lr: %.2e", loop.epoch, loop.n_iter + 1,
                        loop.n_iters, stats["loss"], stats["acc"], stats["lr"])

    def after_epoch(self, loop: TrainLoop) -> None:
        """Log the epoch's averages and speed."""
        row = loop.result.history[-1]
        logger.info("Epoch %d done: loss %.3f, acc %.3f, lr %.2e, %.1f s (%.1f img/s)", loop.epoch, row["loss"],
                    row["acc"], row["lr"], row["seconds"], row["images"] / max(row["seconds"], 1e-9))

    def after_train(self, loop: TrainLoop) -> None:
        """Say how the run ended."""
        if loop.result.stopped:
            logger.info("stopped after %d step(s) at epoch %d, batch %d: resume with --resume", loop.steps_this_call,
                        loop.epoch, loop.n_iter + 1)
        else:
            logger.info("training done in %.1f min", loop.result.seconds / 60)


class EpochCallbackHook(TrainHook):
    """Calls `callback(epoch, model)` after every epoch (after evaluation, before the state is saved)."""

    def __init__(self, callback: Callable[[int, nn.Module], None]) -> None:
        self.callback = callback

    def after_epoch(self, loop: TrainLoop) -> None:
        """Call the callback."""
        self.callback(loop.epoch, loop.model)


def default_hooks(cfg: Any, *, is_main: bool, resume: dict[str, Any] | None = None,
                  evaluate_fn: EvaluateFn | None = None, epoch_callback: Callable[[int, nn.Module], None] | None = None,
                  state_every_steps: int = 0, progress: bool = False, tensorboard: bool = True,
                  extra: tuple[TrainHook, ...] | list[TrainHook] = ()) -> list[TrainHook]:
    """The hooks `do_train`'s arguments ask for, in the order they must run.

    Resume first (the others see the restored position); the bar and the log before the checkpoint and the
    evaluation (their lines read in that order); TensorBoard after the evaluation (it writes its metrics); the
    `extra` hooks after the epoch callback; the training state last, so that it holds everything the other
    hooks recorded for the epoch.
    """
    hooks: list[TrainHook] = [ResumeHook(resume)] if resume is not None else []
    if progress and is_main:
        hooks.append(ProgressHook())
    hooks += [LogHook(), CheckpointHook(int(cfg.SOLVER.CHECKPOINT_PERIOD))]
    if evaluate_fn is not None:
        hooks.append(EvalHook(evaluate_fn, int(cfg.SOLVER.EVAL_PERIOD)))
    if tensorboard and is_main:
        hooks.append(TensorBoardHook())
    if epoch_callback is not None:
        hooks.append(EpochCallbackHook(epoch_callback))
    hooks += [*extra, TrainStateHook(state_every_steps)]
    return hooks

