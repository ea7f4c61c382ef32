"""The train-step benchmark end to end on CPU with a tiny config: both sides run, the table and the
ratio are printed and the rows are written."""

import json

from yarn_jax.bench import train_step_bench


def test_train_step_bench_prints_both_sides_and_the_ratio(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert train_step_bench.main(["--config", "configs/tiny.py", "--seq", "64", "--steps", "1", "--peer", "hf-torch",
                                  "--set", "model.scan_unroll=2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["remat"]) for r in rows] == [("hf-torch", "none"), ("hf-torch", "full"), ("yarn_jax", "none")]
    assert all(r["step_s"] > 0 for r in rows), rows
    assert rows[-1]["program_gib"] > 0
    printed = capsys.readouterr().out
    ours, peer = (64 / r["step_s"] for r in (rows[2], max(rows[:2], key=lambda r: 64 / r["step_s"])))
    assert f"| 64 | {ours:,.0f} | {peer:,.0f} | {ours / peer:.2f}x |" in printed
