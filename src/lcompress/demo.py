"""The demo: LeNet300 on Fashion-MNIST under the LeNet300 schemes of the LC authors' table, each beside its
direct compression, plus the plotting shared with ``lcompress sweep``.

Each scheme is a task list in the config format; ``examples/lenet300_*.toml`` hold the same schemes as files (a test
keeps them in step).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from ._io import atomic_write, atomic_write_text
from .config import RunConfig, parse_config

__all__ = ["SCHEMES", "PEERS", "BASE", "scheme_config", "run_demo", "plot_schemes", "plot_tradeoff", "write_csv",
           "format_table"]

logger = logging.getLogger(__name__)

FC = "re:fc\\d\\.weight"
ALL = ["fc1.weight", "fc2.weight", "fc3.weight"]

#: scheme name -> (description, [[tasks]] entries)
SCHEMES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "quantize_all": (
        "quantize all layers, K=2 (1 bit)",
        [{"params": FC, "compression": {"type": "AdaptiveQuantization", "k": 2}}],
    ),
    "quantize_1_3": (
        "quantize layers 1 and 3, K=2",
        [
            {"params": "fc1.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}},
            {"params": "fc3.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}},
        ],
    ),
    "prune_5": (
        "prune all layers jointly to 5%",
        [{"params": ALL, "compression": {"type": "ConstraintL0Pruning", "fraction": 0.05}}],
    ),
    "binary_plus_sparse": (
        "one 1-bit codebook over all layers + 1% sparse correction",
        [
            {
                "params": ALL,
                "compression": [
                    {"type": "AdaptiveQuantization", "k": 2},
                    {"type": "ConstraintL0Pruning", "fraction": 0.01},
                ],
            }
        ],
    ),
    "mixed": (
        "prune layer 1 to 5%, rank 10 layer 2, K=2 layer 3",
        [
            {"params": "fc1.weight", "compression": {"type": "ConstraintL0Pruning", "fraction": 0.05}},
            {"params": "fc2.weight", "compression": {"type": "LowRank", "rank": 10}},
            {"params": "fc3.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}},
        ],
    ),
    "rank_selection": (
        "rank selection, storage criterion",
        [{"params": FC, "compression": {"type": "RankSelection", "alpha": 1e-3, "criterion": "storage"}}],
    ),
}

#: schedules of schemes that cannot use the auto schedule (penalty forms: α/μ sets the compression level)
SCHEDULES: dict[str, dict[str, Any]] = {
    "rank_selection": {"mu0": 0.2, "factor": 1.1},
}

#: auto-schedule settings measured better for a scheme than BASE's (bench/lc_seeds_2026-12-02.json, seeds 0-4):
#: joint pruning starts at μ₀ = 0.03κ (mean 10.49%, against 10.54 at 0.1κ, 10.69 at 0.3κ and 11.00 at κ); 1 bit per
#: layer holds μ₀ = κ for the first half of the C steps (mean 10.35%, against 10.65 without; K=4 and 1 bit + 1% were
#: worse with it: 10.36 against 10.11 and 10.10 against 10.01, means of seeds 0-1)
TUNED: dict[str, dict[str, Any]] = {
    "prune_5": {"penalty_fraction": 0.03},
    "quantize_all": {"hold": 0.5},
}

#: the best peer of each scheme that has one (bench/peers_2026-12-02.json: best of STE codebook / scaled-sign STE /
#: GMP / one-shot pruning / STE + GMP on LeNet300, each at its best lr of 0.1 ... 0.001 on seed 0, mean of seeds 0-4);
#: quantize_1_3 takes the 1-bit winner untuned. LowRank and RankSelection have no peer here.
PEERS: dict[str, dict[str, Any]] = {
    "quantize_all": {"method": "scaled_sign_ste", "lr": 0.003, "compression": {"type": "ScaledBinaryQuantization"}},
    "quantize_1_3": {"method": "scaled_sign_ste", "lr": 0.003, "compression": {"type": "ScaledBinaryQuantization"}},
    "prune_5": {"method": "gmp", "lr": 0.03},
    "binary_plus_sparse": {"method": "ste_codebook_gmp", "lr": 0.01},
}

#: everything but the tasks and the run name, shared by the demo schemes
BASE: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "lenet300"},
    "data": {"dataset": "fashion-mnist", "batch_size": 256},
    "reference": {"checkpoint": "runs/reference/lenet300.pt", "train_epochs": 40, "lr": 0.1, "lr_decay": 0.95},
    # 4 C steps per epoch with μ₀ = κ (the curvature estimate): 0.1-1 point lower errors than 1 C step per epoch
    # with μ₀ = 0.1κ at the same 30 epochs (bench/RESULTS.md, "LC variants")
    "schedule": {"mu": "auto", "steps": 30, "epochs_per_step": 1, "c_steps_per_step": 4, "penalty_fraction": 1.0},
    # lr ≤ 0.5/μ: room for the loss's own curvature next to μ's under Nesterov momentum (same errors at 30 epochs,
    # no late blow-up where the cap binds, e.g. at 15 epochs; bench/RESULTS.md, "A held μ₀ and a safer lr cap")
    "optimizer": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "lr_decay": 0.98, "clip_lr": True,
                  "clip_lr_scale": 0.5},
    "evaluate": {"every": 1},
    "lc": {"multipliers": True},
}


def scheme_config(name: str, reference: str | None = None, steps: int | None = None) -> dict[str, Any]:
    """The raw (TOML-shaped) config of a demo scheme."""
    if name not in SCHEMES:
        raise ValueError(f"unknown demo scheme {name!r} (known: {', '.join(SCHEMES)})")
    raw = copy.deepcopy(BASE)
    raw["name"] = f"lenet300_{name}"
    raw["tasks"] = copy.deepcopy(SCHEMES[name][1])
    if name in SCHEDULES:
        for k in ("mu", "c_steps_per_step", "penalty_fraction"):  # an explicit schedule: one μ per LC step
            raw["schedule"].pop(k)
        raw["schedule"].update(SCHEDULES[name])
    raw["schedule"].update(TUNED.get(name, {}))
    if reference is not None:
        raw["reference"]["checkpoint"] = reference
    if steps is not None:
        raw["schedule"]["steps"] = steps
    if name in PEERS:
        raw["peer"] = copy.deepcopy(PEERS[name])
    return raw


def run_demo(
    out_dir: str | Path,
    reference: str | Path,
    schemes: list[str] | None = None,
    steps: int | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    peers: bool = True,
) -> list[dict[str, Any]]:
    """Run the demo schemes; write ``summary.json``, ``summary.csv`` and ``tradeoff.png`` under ``out_dir``.

    Each scheme runs LC (in ``out_dir/<scheme>``) and, when ``peers`` and the scheme has one (:data:`PEERS`), its
    best peer on the same reference, data order and epoch budget (in ``out_dir/<scheme>_peer``).

    Returns:
        one row per scheme: scheme, description, test error, DC error, reference error, ratio, the peer's method,
        test error and ratio (None without a peer), seconds.
    """
    from .experiment import load_data, prepare_reference, run_compress
    from .peers import run_peer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SCHEMES) if schemes is None else schemes
    cfgs = {n: parse_config(scheme_config(n, str(reference), steps)) for n in names}
    first = next(iter(cfgs.values()))
    data = load_data(first, data_dir)
    prepare_reference(first, data, progress=progress, should_stop=should_stop)  # trains and caches it once, if needed
    rows = []
    for n in names:
        t = time.perf_counter()
        res = run_compress(cfgs[n], out / n, data=data, progress=progress, should_stop=should_stop)
        peer = None
        if peers and cfgs[n].peer.method:
            peer = run_peer(cfgs[n], out / f"{n}_peer", data=data, progress=progress, should_stop=should_stop)
        rows.append(
            {
                "scheme": n,
                "description": SCHEMES[n][0],
                "test_error": res["final"]["test_error"],
                "dc_error": res["direct_compression"]["test_error"],
                "reference_error": res["reference"]["test_error"],
                "ratio": res["final"]["ratio"],
                "dc_ratio": res["direct_compression"]["ratio"],
                "file_bytes": res["final"].get("file_bytes"),
                "feasible": res["final"]["feasible"],
                "peer": peer["method"] if peer else None,
                "peer_error": peer["final"]["test_error"] if peer else None,
                "peer_ratio": peer["final"]["ratio"] if peer else None,
                "seconds": time.perf_counter() - t,
            }
        )
        atomic_write_text(json.dumps(rows, indent=2), out / "summary.json")
    write_csv(rows, out / "summary.csv")
    plot_schemes(rows, out / "tradeoff.png",
                 title="LeNet300 on Fashion-MNIST: LC vs its best peer and direct compression")
    return rows


#: the short names the trade-off plot labels a peer's point with
PEER_LABELS = {"scaled_sign_ste": "sign STE", "ste_codebook": "STE", "gmp": "GMP", "oneshot_prune": "one-shot",
               "ste_codebook_gmp": "STE+GMP"}

_METHOD_MARKERS = {"LC": "o", "peer": "s", "DC": "^"}


def plot_schemes(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """The demo's trade-off plot: test error against compression ratio (log x), one colour per scheme.

    Each scheme's direct compression (triangle), best peer (square) and LC result (circle) are joined by a line in
    the scheme's colour, and every point is labelled: LC with the scheme's name, the peer with its method, DC as
    "DC". The y range is set by the LC and peer errors and the reference; a DC error above it is drawn at the top
    edge, labelled with its value and an arrow. Labels are placed where they overlap no other label or marker
    (right of the point, else left, else higher or lower).

    Args:
        rows: :func:`run_demo`'s rows (``scheme``, ``ratio``, ``test_error``, ``dc_ratio``, ``dc_error``,
            ``peer``, ``peer_ratio``, ``peer_error``, ``reference_error``); a missing value leaves its point out.
        path: the image file (its suffix picks the format), written atomically.
        title: the plot's title.
    """
    fig = _schemes_figure(rows, title)
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(png.getvalue()))


def _schemes_figure(rows: list[dict[str, Any]], title: str = ""):
    """The figure of :func:`plot_schemes` (kept open for the caller). Each point's label is an annotation whose
    ``gid`` is ``"<scheme>/<LC|peer|DC>"``; each scheme's joining line has ``gid`` ``"<scheme>"``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    def point(x, y):
        return None if x is None or y is None else (float(x), float(y))

    schemes = []  # (scheme, colour, [(method, (x, y), label)])
    for i, r in enumerate(rows):
        pts = [("DC", point(r.get("dc_ratio"), r.get("dc_error")), "DC"),
               ("peer", point(r.get("peer_ratio"), r.get("peer_error")) if r.get("peer") else None,
                PEER_LABELS.get(r.get("peer"), str(r.get("peer")))),
               ("LC", point(r.get("ratio"), r.get("test_error")), str(r["scheme"]))]
        schemes.append((str(r["scheme"]), f"C{i % 10}", [(m, xy, lab) for m, xy, lab in pts if xy is not None]))
    ref = next((r["reference_error"] for r in rows if r.get("reference_error") is not None), None)
    focus = [xy[1] for _, _, pts in schemes for m, xy, _ in pts if m != "DC"]
    everything = [xy[1] for _, _, pts in schemes for _, xy, _ in pts]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = None
    if focus:
        lo = min(everything + ([ref] if ref is not None else []))
        hi = max(focus + ([ref] if ref is not None else []))
        pad = max(0.15 * (hi - lo), 0.2)
        top = hi + 2 * pad
        ax.set_ylim(lo - pad, top)
    xs = [xy[0] for _, _, pts in schemes for _, xy, _ in pts]
    ax.set_xscale("log")
    if xs:
        x0, x1 = min(xs) / 1.35, max(xs) * 1.35
        ax.set_xlim(x0, x1)
        # plain ratios (1, 2, 5, 10, ...) instead of log-scale minor labels such as 3×10⁰, which crowd a short range
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(x0)), math.ceil(math.log10(x1)) + 1)
                 for m in (1, 2, 5) if x0 <= m * 10.0**e <= x1]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    placed = []  # (label text, x, y drawn, colour, gid)
    for name, colour, pts in schemes:
        drawn = [(m, (x, y if top is None or y <= top else top), lab, top is not None and y > top, y)
                 for m, (x, y), lab in pts]
        if len(drawn) > 1:
            ax.plot([d[1][0] for d in drawn], [d[1][1] for d in drawn], color=colour, linewidth=1, alpha=0.6,
                    clip_on=False, gid=name)
        for m, (x, y), lab, clipped, value in drawn:
            ax.plot([x], [y], linestyle="none", marker=_METHOD_MARKERS[m], color=colour, markersize=7,
                    markerfacecolor="white" if m == "DC" else colour, clip_on=False)
            placed.append((f"{lab} {value:.1f}% ↑" if clipped else lab, x, y, colour, f"{name}/{m}"))
    if ref is not None:
        ax.axhline(ref, color="gray", linestyle=":")
    ax.set_xlabel("compression ratio ρ (log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker="o", color="0.3", label="LC"),
               Line2D([], [], linestyle="none", marker="s", color="0.3", label="best peer"),
               Line2D([], [], linestyle="none", marker="^", color="0.3", markerfacecolor="white",
                      label="direct compression (DC)"),
               Line2D([], [], color="0.3", linewidth=1, alpha=0.6, label="one scheme: DC, peer, LC")]
    if ref is not None:
        handles.append(Line2D([], [], color="gray", linestyle=":", label=f"reference ({ref:.2f}%)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _place_labels(fig, ax, placed)
    return fig


def _place_labels(fig, ax, items: list[tuple[str, float, float, str, str]]) -> None:
    """Annotate each point (text, x, y, colour, gid) at the first offset whose box overlaps no label placed so far
    and no marker, and stays inside the axes (the least overlapping one when none is free). Labels sit on a
    translucent white box above the lines, so a joining line or the reference line behind one leaves it legible."""
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    markers = [to_px((x, y)) for _, x, y, _, _ in items]
    r = 6.0  # a marker's half-width in pixels, and some room
    taken: list[tuple[float, float, float, float]] = [(px - r, py - r, px + r, py + r) for px, py in markers]
    fbox = ax.get_window_extent(renderer)
    # right of the point, then left, then ever further above or below (rows of 10 points)
    candidates = [(dx, dy - 3, ha) for dy in (0, 10, -10, 20, -20, 30, -30, 40, -40, 50, -50)
                  for dx, ha in ((5, "left"), (-5, "right"))]

    def clash(b) -> float:
        """How much of ``b`` overlaps the labels and markers so far, or lies outside the axes (pixels²)."""
        inside = max(0.0, min(b.x1, fbox.x1) - max(b.x0, fbox.x0)) * max(0.0, min(b.y1, fbox.y1) - max(b.y0, fbox.y0))
        out = b.width * b.height - inside
        return out + sum(max(0.0, min(b.x1, x1) - max(b.x0, x0)) * max(0.0, min(b.y1, y1) - max(b.y0, y0))
                         for x0, y0, x1, y1 in taken)

    for text, x, y, colour, gid in items:
        best = None
        for dx, dy, ha in candidates:
            a = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color=colour,
                            ha=ha, annotation_clip=False, gid=gid, zorder=5,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.75})
            b = a.get_window_extent(renderer)
            cost = clash(b)
            a.remove()
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha)
            if cost == 0:
                break
        _, dx, dy, ha = best
        a = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color=colour, ha=ha,
                        annotation_clip=False, gid=gid, zorder=5,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75})
        b = a.get_window_extent(renderer)
        taken.append((b.x0, b.y0, b.x1, b.y1))


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """``rows`` as CSV, written atomically (the old file or the new one, never a part)."""
    if not rows:
        return
    keys = list(rows[0])
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    left = [f in ("s", "") for _, _, f in columns]  # text left, numbers right
    lines = [
        "  ".join(c.ljust(w) if left[i] else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_tradeoff(
    series: dict[str, list[tuple[float, float, str]]],
    path: str | Path,
    reference_error: float | None = None,
    title: str = "",
    connect: bool = False,
    focus: list[str] | None = None,
) -> None:
    """Test error vs compression ratio (log x), one marker series per method (joined by lines when ``connect``,
    e.g. a sweep), labels at the first series' points. ``focus`` names the series whose errors set the y range
    (with the reference); points of other series above it are drawn at the top edge, labelled with their error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = ["o", "s", "^", "D", "v"]
    for i, (label, pts) in enumerate(series.items()):
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if connect:
            order = sorted(range(len(xs)), key=lambda j: xs[j])
            xs, ys, pts = [xs[j] for j in order], [ys[j] for j in order], [pts[j] for j in order]
        ax.plot(xs, ys, linestyle="-" if connect else "none", marker=markers[i % 5], label=label)
        if i == 0:
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference_error is not None:
        ax.axhline(reference_error, color="gray", linestyle=":", label=f"reference ({reference_error:.2f}%)")
    kept = [p[1] for name in (focus or []) for p in series.get(name, []) if p[1] is not None]
    if kept:
        lo = min(kept + ([reference_error] if reference_error is not None else []))
        hi = max(kept)
        pad = max(0.15 * (hi - lo), 0.2)
        top = hi + 2 * pad
        ax.set_ylim(lo - pad, top)
        above = sorted((x, y, i) for i, pts in enumerate(series.values()) for x, y, _ in pts
                       if x is not None and y is not None and y > top)
        for j, (x, y, i) in enumerate(above):  # labels alternate in height so neighbours do not overlap
            ax.plot([x], [top], linestyle="none", marker=markers[i % 5], color=f"C{i}", clip_on=False)
            ax.annotate(f"{y:.1f}% ↑", (x, top), textcoords="offset points", xytext=(4, -10 - 10 * (j % 2)),
                        fontsize=7, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio ρ (log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(png.getvalue()))
