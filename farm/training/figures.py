"""Pictures of a training run for its artifact: a TensorBoard log and loss.png, both from the loop's history.

The loop (farm.training.loop) keeps one record per step: step, epoch, loss, lr, tokens_per_s, grad_norm, and
eval_loss / perplexity at evaluation steps. Nothing here touches the model; it runs once, after training.
"""

from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
# history key -> TensorBoard tag
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss", "perplexity": "eval/perplexity"}


def write_tensorboard(history: list[dict], log_dir: Path) -> Path:
    """Scalars of every step into TensorBoard event files under `log_dir` (opens with `tensorboard --logdir`)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=".farm")
    try:
        for record in history:
            for key, tag in SCALARS.items():
                if record.get(key) is not None:
                    writer.add_scalar(tag, float(record[key]), global_step=int(record["step"]))
    finally:
        writer.close()
    return log_dir


def plot_loss(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Train and eval loss by step as a PNG; None when the history has no loss to draw."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        # No timestamps in the PNG metadata: the same history gives the same bytes (and the same sha256).
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return Path(path)
