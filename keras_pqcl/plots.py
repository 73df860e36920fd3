"""Plots of a run's ``log.csv``: shared by ``pretrain`` and the CLI, reading the model's
declared log names, never a method's."""


def plot_log(history, path, terms=()):
    """Loss and its terms, teacher entropy, query agreement and schedules per epoch as a PNG.

    ``terms``: the per-term log names to draw with the loss (the model's ``loss_terms``);
    those that have a panel of their own (``query_agreement``) or are absent are skipped.

    Returns the path, or None when the log holds no loss.
    """
    if not history.get("loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(e) + 1 for e in history.get("epoch", range(len(history["loss"])))]
    keys = ("loss", "knn_top1", "teacher_entropy", "query_agreement", "learning_rate", "teacher_temp")
    panels = [k for k in keys if k in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        # The loss panel also shows each term, so a term that stalls (MIM, queries) is visible.
        lines = [key] + ([t for t in terms if t in history and t not in panels] if key == "loss" else [])
        for line in lines:
            values = history[line]
            if key == "knn_top1":  # evaluated every few epochs: join the points that exist
                kept = [(e, v) for e, v in zip(epochs, values) if v == v]
                ax.plot([e for e, _ in kept], [v for _, v in kept], marker="o", markersize=3, label=line)
                continue
            ax.plot(epochs, values, marker="o", markersize=3, label=line)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
