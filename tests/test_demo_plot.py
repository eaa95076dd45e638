"""The demo's trade-off plot: each scheme's DC, peer and LC points joined and labelled, no label on another."""
import random

import pytest

from lcompress.demo import PEER_LABELS, _schemes_figure, plot_schemes

# the demo's rows of 2026-12-02 (README table), with made-up small differences between the ratios
ROWS = [
    {"scheme": "quantize_all", "test_error": 10.31, "dc_error": 34.80, "ratio": 31.26, "dc_ratio": 31.11,
     "peer": "scaled_sign_ste", "peer_error": 10.52, "peer_ratio": 31.12},
    {"scheme": "quantize_1_3", "test_error": 10.01, "dc_error": 25.13, "ratio": 7.09, "dc_ratio": 7.08,
     "peer": "scaled_sign_ste", "peer_error": 10.56, "peer_ratio": 7.08},
    {"scheme": "prune_5", "test_error": 10.36, "dc_error": 58.37, "ratio": 16.86, "dc_ratio": 16.81,
     "peer": "gmp", "peer_error": 10.86, "peer_ratio": 16.75},
    {"scheme": "binary_plus_sparse", "test_error": 9.95, "dc_error": 17.25, "ratio": 22.60, "dc_ratio": 22.58,
     "peer": "ste_codebook_gmp", "peer_error": 10.46, "peer_ratio": 22.55},
    {"scheme": "mixed", "test_error": 10.78, "dc_error": 46.60, "ratio": 14.7, "dc_ratio": 14.7,
     "peer": None, "peer_error": None, "peer_ratio": None},
    {"scheme": "rank_selection", "test_error": 11.65, "dc_error": 10.30, "ratio": 5.8, "dc_ratio": 1.0,
     "peer": None, "peer_error": None, "peer_ratio": None},
]
for r in ROWS:
    r["reference_error"] = 10.30


def _boxes(fig):
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return ax, {t.get_gid(): (t.get_text(), t.get_window_extent(renderer)) for t in ax.texts}


def _overlap(a, b) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def test_each_scheme_is_joined_and_every_point_labelled_without_overlaps():
    import matplotlib.pyplot as plt

    fig = _schemes_figure(ROWS, "t")
    try:
        ax, labels = _boxes(fig)
        top = ax.get_ylim()[1]
        # one label per point, naming what the point is (the issue: a peer square sat beside another scheme's
        # label, and the clipped DC triangles carried bare percentages)
        expected = {}
        for r in ROWS:
            s = r["scheme"]
            expected[f"{s}/LC"] = s
            if r["peer"]:
                expected[f"{s}/peer"] = PEER_LABELS[r["peer"]]
            expected[f"{s}/DC"] = f"DC {r['dc_error']:.1f}% ↑" if r["dc_error"] > top else "DC"
        assert {g: t for g, (t, _) in labels.items()} == expected
        assert labels["quantize_all/DC"][0] == "DC 34.8% ↑" and labels["rank_selection/DC"][0] == "DC"
        assert "mixed/peer" not in labels  # no peer for mixed: no square and no label
        # each scheme's line joins its own DC, peer and LC points (DC above the range drawn at the top edge)
        lines = {ln.get_gid(): ln for ln in ax.lines if ln.get_gid()}
        assert set(lines) == {r["scheme"] for r in ROWS}
        for r in ROWS:
            pts = [(r["dc_ratio"], min(r["dc_error"], top))]
            if r["peer"]:
                pts.append((r["peer_ratio"], r["peer_error"]))
            pts.append((r["ratio"], r["test_error"]))
            ln = lines[r["scheme"]]
            assert list(ln.get_xdata()) == pytest.approx([p[0] for p in pts])
            assert list(ln.get_ydata()) == pytest.approx([p[1] for p in pts])
        # a label neither covers another label nor any point's marker, and stays inside the axes
        box = ax.get_window_extent(fig.canvas.get_renderer())
        items = list(labels.items())
        for i, (g, (_, b)) in enumerate(items):
            assert box.x0 <= b.x0 and b.x1 <= box.x1 and box.y0 <= b.y0 and b.y1 <= box.y1, g
            for h, (_, c) in items[i + 1:]:
                assert _overlap(b, c) == 0, (g, h)
        to_px = ax.transData.transform
        for r in ROWS:
            for x, y in ((r["ratio"], r["test_error"]), (r["peer_ratio"], r["peer_error"]),
                         (r["dc_ratio"], min(r["dc_error"], top))):
                if x is None:
                    continue
                px, py = to_px((x, y))
                for g, (_, b) in items:
                    assert not (b.x0 < px < b.x1 and b.y0 < py < b.y1), (g, r["scheme"], x, y)
    finally:
        plt.close(fig)


def test_plot_writes_a_png_and_takes_rows_with_missing_values(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "tradeoff.png"
    plot_schemes(ROWS, path, title="LeNet300")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]  # written atomically: no temporary left
    # random rows, some points missing: every point present is labelled, and nothing raises
    rng = random.Random(0)
    rows = []
    for i in range(8):
        ratio = 10 ** rng.uniform(0, 2)
        rows.append({"scheme": f"s{i}", "test_error": rng.choice([None, rng.uniform(9, 12)]),
                     "ratio": ratio, "dc_error": rng.uniform(9, 70), "dc_ratio": ratio * rng.uniform(0.9, 1.1),
                     "peer": rng.choice([None, "gmp", "ste_codebook"]), "peer_error": rng.uniform(9, 12),
                     "peer_ratio": ratio * rng.uniform(0.98, 1.02), "reference_error": 10.0})
    fig = _schemes_figure(rows)
    try:
        _, labels = _boxes(fig)
        want = {f"{r['scheme']}/DC" for r in rows} | {f"{r['scheme']}/LC" for r in rows if r["test_error"] is not None}
        want |= {f"{r['scheme']}/peer" for r in rows if r["peer"]}
        assert set(labels) == want
    finally:
        plt.close(fig)
    plot_schemes([], tmp_path / "empty.png")  # no rows: an empty plot, not an error
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
