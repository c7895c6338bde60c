"""Calibration plots (matplotlib, PNG): Pareto fronts with the chosen tree per entropy bucket,
predicted tokens/s against tree size, and the entropy distribution per family."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from srt_entmtp.calibrate.stats import AcceptanceStats


def plot_all(stats: AcceptanceStats, report: dict, out_dir: Path, prefix: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fams = [f for f in report["families"] if f != "general"]
    paths = []

    fig, axes = plt.subplots(2, len(fams), figsize=(4.2 * len(fams), 7.5), squeeze=False)
    for j, fam in enumerate(fams):
        top, bottom = axes[0][j], axes[1][j]
        for b, bk in enumerate(report["families"][fam]["buckets"]):
            nodes = [x[0] for x in bk["front"]]
            label = f"H in [{bk['lo']:.2f}, {bk['hi']:.2f}) n={bk['positions']}"
            line, = top.plot(nodes, [x[1] for x in bk["front"]], label=label)
            bottom.plot(nodes, [x[2] for x in bk["front"]], color=line.get_color())
            chosen = int(bk["chosen"].split("-n")[-1])
            pick = next((x for x in bk["front"] if x[0] == chosen), None)
            if pick:
                top.plot([pick[0]], [pick[1]], "o", color=line.get_color())
                bottom.plot([pick[0]], [pick[2]], "o", color=line.get_color())
        top.set_title(f"{fam}: Pareto front per entropy bucket")
        top.set_xlabel("tree nodes (non-root)")
        top.set_ylabel("expected accepted drafts")
        top.legend(fontsize=7)
        bottom.set_xlabel("tree nodes (non-root)")
        bottom.set_ylabel(f"predicted tokens/s (batch {report['batch']})")
        bottom.set_title("dots: the tree chosen for the bucket", fontsize=9)
    fig.suptitle(f"{stats.drafter} heads on {stats.model}")
    paths.append(_save(fig, out_dir / f"{prefix}_pareto.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for fam in fams:
        ax.hist(stats.entropies(fam).numpy(), bins=40, histtype="step", density=True, label=fam)
    ax.set_xlabel(f"entropy estimate at step start (nats, {stats.estimator.mode} decay {stats.estimator.ema_decay})")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(f"entropy distribution per family ({stats.drafter} stats)")
    paths.append(_save(fig, out_dir / f"{prefix}_entropy.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
