"""Plots from the leaderboard CSVs: every figure produced, fronts drawn from the CSV flags, byte-identical reruns."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from recordfixtures import P1, P2, write_fixture_store

from bench.report.leaderboard import build_leaderboards, protocol_id
from bench.report.plots import (
    BOARD_COLUMNS,
    DPI,
    RUN_COLUMNS,
    PlotWarning,
    label_of,
    make_plots,
    pareto_figure,
    read_csv,
    styles_for,
)

REPO = Path(__file__).resolve().parent.parent
BENCH_A, BENCH_B = "novel-a--DiT-T-2", "novel-b--DiT-T-2"


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    base = tmp_path_factory.mktemp("plots")
    write_fixture_store(base / "results")
    build_leaderboards(base / "results", base / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlotWarning)  # every input the fixture promises is there
        written = make_plots(base / "out", base / "figs")
    return base, written


def test_every_figure_is_written_as_png_and_pdf(plotted):
    base, written = plotted
    names = {p.relative_to(base / "figs").as_posix() for p in written}
    expected = set()
    for bench, protocols in ((BENCH_A, (P1, P2)), (BENCH_B, (P1,))):
        stems = [f"{bench}/loss_curves"] + [f"{bench}/{protocol_id(p)}/{kind}" for p in protocols
                                            for kind in ("pareto_params", "pareto_compute", "summary", "samples")]
        expected |= {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    expected |= {"questions/transfer.png", "questions/transfer.pdf"}  # both benchmarks ask question (a)
    assert names == expected
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n" if path.suffix == ".png" else b"%PDF-")
        if path.suffix == ".pdf":
            assert b"CreationDate" not in data and b"/Producer" not in data  # nothing that changes run to run
    # fixed sizes: a six-metric Pareto figure is 3 x 2 panels of 3.4 x 2.8 in, plus legend and title room
    with Image.open(base / "figs" / BENCH_A / protocol_id(P1) / "pareto_params.png") as image:
        assert image.size == (round((3 * 3.4 + 1.6) * DPI), round((2 * 2.8 + 0.6) * DPI))
        assert not any(key.lower() in ("software", "creation time") for key in image.info)


def test_pareto_front_is_the_csv_front(plotted):
    base = plotted[0]
    rows = [r for r in read_csv(base / "out" / BENCH_A / "leaderboard.csv", BOARD_COLUMNS)
            if r["protocol_id"] == protocol_id(P1)]
    figure = pareto_figure(rows, "params", styles_for(rows))
    fid_axes = figure.axes[0]
    assert fid_axes.get_ylabel() == "FID ↓" and fid_axes.get_xscale() == "log"
    (front,) = [line for line in fid_axes.get_lines() if line.get_linestyle() == "--"]
    # the leaderboard's flags: lora (30K, 26), kind (120K, 21), full_ft (800K, 19); bitfit is dominated
    assert list(front.get_xdata()) == [30_000, 120_000, 800_000]
    assert list(front.get_ydata()) == pytest.approx([26.0, 21.0, 19.0])
    precision = figure.axes[3]
    assert precision.get_ylabel() == "Precision ↑"


def test_same_csv_gives_identical_files(plotted, tmp_path):
    """Rerun (in a fresh process, through the CLI) on one benchmark's CSVs: every byte must match."""
    base = plotted[0]
    subset = base / "out_b"  # a sibling of out/, so the runs CSV's relative paths still resolve
    shutil.copytree(base / "out" / BENCH_B, subset / BENCH_B, dirs_exist_ok=True)
    shutil.copy(base / "out" / "leaderboard_runs.csv", subset / "leaderboard_runs.csv")
    first = make_plots(subset, tmp_path / "one")
    env = {**os.environ, "PYTHONHASHSEED": "123", "MPLBACKEND": "pdf"}  # a different hash seed and backend env
    proc = subprocess.run([sys.executable, "-m", "bench.report.plots", "--leaderboard", str(subset), "--out",
                           str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(first) == 12
    for path in first:
        again = tmp_path / "two" / path.relative_to(tmp_path / "one")
        assert path.read_bytes() == again.read_bytes(), f"{path.name} differs between runs"
        if "questions" not in path.parts:  # a question's figure holds every benchmark of it: here only one
            assert path.read_bytes() == (base / "figs" / path.relative_to(tmp_path / "one")).read_bytes()


def test_missing_inputs_warn_and_skip(plotted, tmp_path):
    base = plotted[0]
    out = base / "out_missing"
    shutil.copytree(base / "out" / BENCH_B, out / BENCH_B, dirs_exist_ok=True)
    with (base / "out" / "leaderboard_runs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["grid_png"] = "../results/runs/nowhere/grid.png"
    with (out / "leaderboard_runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.warns(PlotWarning, match="sample grid of .* not found"):
        written = make_plots(out, tmp_path / "figs")
    assert not [p for p in written if p.stem == "samples"]
    assert {p.stem for p in written} == {"loss_curves", "pareto_params", "pareto_compute", "summary", "transfer"}


def test_bad_leaderboard_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `kindbench leaderboard` first"):
        make_plots(tmp_path, tmp_path / "figs")
    (tmp_path / "leaderboard_runs.csv").write_text(",".join(RUN_COLUMNS) + "\n")  # leaderboard ran, nothing finished
    with pytest.warns(PlotWarning, match="no benchmark yet"):
        assert make_plots(tmp_path, tmp_path / "figs") == []
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "leaderboard.csv").write_text("method,fid\nkind,3.0\n")
    with pytest.raises(ValueError, match=r"leaderboard.csv lacks columns \['benchmark', 'protocol_id'"):
        make_plots(tmp_path, tmp_path / "figs")


def test_colour_says_the_family_and_no_style_is_reused():
    """Every registered method of the tiny suite in one figure: one colour per family, never the same (colour,
    marker) twice, even for a family with more members than there are markers."""
    from methods import get_method_class, list_methods

    rows = [{"method": m, "variant": "default", "family": get_method_class(m).family} for m in list_methods()]
    rows += [{"method": "lora", "variant": f"r{r}", "family": "peft"} for r in (4, 8, 16, 32, 64, 128)]
    styles = styles_for(rows)
    pairs = [(tuple(style["color"]), style["marker"]) for style in styles.values()]
    assert len(styles) == len(rows) and len(set(pairs)) == len(pairs)
    base = {}  # each family's colour: that of its first ten members (sorted), distinct across families
    for family in sorted({row["family"] for row in rows}):
        members = sorted(label_of(r) for r in rows if r["family"] == family)[:10]
        assert len({styles[m]["color"] for m in members}) == 1, family
        base[family] = styles[members[0]]["color"]
    assert len(set(base.values())) == len(base) <= 10
    assert styles_for(list(reversed(rows))) == styles  # the order rows arrive in changes nothing


def test_class_grid_puts_each_class_on_its_own_row(tmp_path):
    from bench.report import grids

    images = np.stack([np.full((4, 4, 3), 10 * (i + 1), dtype=np.uint8) for i in range(7)])
    labels = np.array([1, 0, 1, 2, 0, 1, 1])
    grid = grids.class_grid(images, labels, per_class=2, classes=4)
    step = 4 + grids.GAP
    assert grid.shape == (4 * step - grids.GAP, 2 * step - grids.GAP, 3)
    cell = lambda r, c: grid[r * step: r * step + 4, c * step: c * step + 4]  # noqa: E731
    assert (cell(0, 0) == 20).all() and (cell(0, 1) == 50).all()  # class 0: images 1 and 4, in order
    assert (cell(1, 0) == 10).all() and (cell(1, 1) == 30).all()  # class 1: its first two of four
    assert (cell(2, 0) == 40).all() and (cell(2, 1) == 255).all()  # class 2 has one image: white beside it
    assert (cell(3, 0) == 255).all()  # no image of class 3
    np.savez(tmp_path / "samples.npz", arr_0=images)
    assert grids.read_labelled(tmp_path / "samples.npz") is None  # no labels anywhere: not a class grid
    np.save(tmp_path / "labels.npy", labels)
    read_images, read_labels = grids.read_labelled(tmp_path / "samples.npz")
    assert (read_labels == labels).all() and read_images.shape == images.shape


def test_samples_figure_shows_real_images_first_and_labels_class_rows(tmp_path):
    from bench.report.plots import samples_figure

    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    np.savez(tmp_path / "floor.npz", arr_0=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), labels=labels)
    (tmp_path / "s").mkdir()
    np.savez(tmp_path / "s" / "samples.npz", arr_0=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "s" / "labels.npy", labels)
    run = {"benchmark": "b", "protocol_id": "p", "method": "kind", "variant": "default", "seed": "0", "run_id": "r",
           "grid_png": "", "samples_npz": "s/samples.npz", "real_npz": "floor.npz"}
    figure = samples_figure([run], tmp_path)
    real, kind = figure.axes[:2]
    assert real.get_title() == "real images (held-out)" and kind.get_title() == "kind"
    for ax in (real, kind):
        assert [t.get_text() for t in ax.get_yticklabels()] == ["class 0", "class 1", "class 2"]
    labels = np.arange(96) % 48  # the small suite's 48 pre-training classes: the panel grows with its rows
    np.savez(tmp_path / "floor.npz", arr_0=rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8), labels=labels)
    np.savez(tmp_path / "s" / "samples.npz", arr_0=rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "s" / "labels.npy", labels)
    tall = samples_figure([run], tmp_path)
    points_per_row = tall.axes[0].get_window_extent().height / 48 * 72 / tall.dpi
    assert points_per_row >= 8  # at least a 6-point label's height per class row (it was 3 points: unreadable)


def test_summary_figure_orders_by_rank_with_intervals_ties_and_the_floor(plotted):
    from bench.report.plots import summary_figure

    base = plotted[0]
    rows = [r for r in read_csv(base / "out" / BENCH_A / "leaderboard.csv", BOARD_COLUMNS)
            if r["protocol_id"] == protocol_id(P1)]
    ranked = sorted(rows, key=lambda r: int(r["rank"]))
    rows[0]["tied_fid"] = "True" if rows[0]["rank"] != "1" else rows[0]["tied_fid"]
    floor = dict(rows[0], method="real images", family="floor", variant="held-out", rank="", fid_mean="4.0")
    figure = summary_figure(rows + [floor], styles_for(rows))
    fid = figure.axes[0]
    ticks = sorted(zip(fid.get_yticks(), [t.get_text() for t in fid.get_yticklabels()]), reverse=True)
    names = [name for _, name in ticks]  # top to bottom
    assert [n.removeprefix("=1 ").split("/")[0] for n in names] == [r["method"] for r in ranked]
    assert any(n.startswith("=1 ") for n in names) == any(r["tied_fid"] == "True" for r in rows)
    assert fid.get_xlabel() == "FID ↓"
    assert [line.get_xdata()[0] for line in fid.get_lines() if line.get_linestyle() == ":"] == [4.0]
    # kind's error bar spans its interval over seeds and samples
    kind = next(r for r in rows if r["method"] == "kind")
    spans = [seg for coll in fid.collections for seg in coll.get_segments()]
    assert any(seg[0][0] == pytest.approx(float(kind["fid_ci_low"])) and
               seg[1][0] == pytest.approx(float(kind["fid_ci_high"])) for seg in spans)


def test_rows_tied_at_rank_1_keep_the_leaderboards_order_by_mean():
    from bench.report.plots import summary_figure

    def row(method, rank, fid):
        return {"method": method, "variant": "default", "family": "peft", "rank": rank, "tied_fid": "True",
                "fid_mean": fid, "fid_ci_low": str(float(fid) - 1), "fid_ci_high": str(float(fid) + 1),
                "fid_higher_is_better": "False", "benchmark": "b", "protocol_id": "p"}

    rows = [row("zeta", "1", "5.0"), row("alpha", "1", "5.5"), row("mid", "1", "6.0"), row("last", "4", "9.0")]
    fid = summary_figure(rows, styles_for(rows)).axes[0]
    ticks = sorted(zip(fid.get_yticks(), [t.get_text() for t in fid.get_yticklabels()]), reverse=True)
    assert [name.removeprefix("=1 ") for _, name in ticks] == ["zeta", "alpha", "mid", "last"]  # not by name


def test_one_figure_per_paper_question_has_a_panel_per_benchmark_of_its_stage(plotted):
    from bench.report.plots import question_figure

    base = plotted[0]
    boards = [read_csv(base / "out" / bench / "leaderboard.csv", BOARD_COLUMNS) for bench in (BENCH_A, BENCH_B)]
    assert {row["stage"] for board in boards for row in board} == {"transfer"}
    figure = question_figure("transfer", boards)
    assert [ax.get_title() for ax in figure.axes] == [BENCH_A, BENCH_B]
    assert figure.axes[0].get_xlabel() == "FID ↓" and "(a) novel classes" in figure.texts[0].get_text()
