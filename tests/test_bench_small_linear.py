"""scripts/bench_small_linear.py's choice of wide tiles, on sweep rows as the GPU sweep writes them
(the timing itself needs CUDA; the selection is plain Python)."""
from tests.conftest import load_script


def _script():
    return load_script("bench_small_linear")


def _rows(mod, us_of):
    """Sweep rows in sweep()'s order (op by op, then config), 16-row candidates marked as sweep_wide marks them."""
    wide = [(32, 16, 256, 4, 3), (32, 16, 256, 8, 4)]
    sixteen = [(16, 16, 256, 4, 4), (16, 32, 256, 4, 4)]
    rows = [{"op": op, "config": list(c), "us": {24: us_of(op, c), 32: us_of(op, c)}}
            for op in mod.OPS for c in wide + sixteen]
    for r in rows:
        if tuple(r["config"]) in sixteen:
            r["tile_for"] = 32
    return rows


def test_sweep_wide_compares_sixteen_row_tiles_for_every_op(monkeypatch):
    """sweep_wide with the timing faked (sweep() replaced, rows in its op-by-op order): where the
    16-row tiles win for every op, as on the H100 on 2026-12-07, they are what it picks for every
    config key; the version before marked the 16-row rows by list position and compared them for
    the last op only."""
    mod = _script()
    monkeypatch.setattr(mod.small_linear, "WIDE", {})
    best16 = {"norm_linear/qkv": (16, 16, 256, 4, 4), "norm_gate_silu/gate_up": (16, 32, 256, 4, 4),
              "linear_residual/o": (16, 16, 256, 2, 4), "linear_residual/down": (16, 16, 256, 2, 4)}

    def fake_sweep(W, dt, grid, rows):
        return [{"op": op, "config": list(c), "us": {m: 1.0 if c == best16[op] else 2.0 if c[0] == 16 else 1.5
                                                     for m in rows}}
                for op in mod.OPS for c in grid]

    monkeypatch.setattr(mod, "sweep", fake_sweep)
    rows, best = mod.sweep_wide(None, None, (32,))
    assert best == {32: {"norm_linear": (16, 16, 256, 4, 4), "norm_gate_silu": (16, 32, 256, 4, 4),
                         "linear_residual": (16, 16, 256, 2, 4)}}
    assert mod.small_linear.WIDE == best
    assert {r["tile_for"] for r in rows if r["config"][0] == 16} == {32}


def test_pick_wide_takes_a_wide_tile_where_it_wins_over_both_ops_of_a_key():
    mod = _script()

    def us_of(op, c):
        if op.startswith("linear_residual"):  # o and down share a key: the wide tile wins over their sum
            return {"linear_residual/o": 1.0 if c == (32, 16, 256, 8, 4) else 1.2,
                    "linear_residual/down": 1.1 if c == (16, 32, 256, 4, 4) else 1.15}[op]
        return 1.0 if c == (32, 16, 256, 4, 3) else 1.3

    best = mod.pick_wide(_rows(mod, us_of), [32])[32]
    assert best["norm_linear"] == best["norm_gate_silu"] == (32, 16, 256, 4, 3)
    assert best["linear_residual"] == (32, 16, 256, 8, 4)  # 1.0 + 1.15 against 1.2 + 1.1


def test_pick_wide_skips_a_config_not_timed_for_every_op_of_its_key():
    mod = _script()
    rows = _rows(mod, lambda op, c: 1.0)
    rows = [r for r in rows if not (r["op"] == "linear_residual/down" and r["config"] == [32, 16, 256, 4, 3])]
    for r in rows:
        if r["op"] == "linear_residual/o" and r["config"] == [32, 16, 256, 4, 3]:
            r["us"] = {24: 0.1, 32: 0.1}  # fastest for o, but down never ran it (a failed build)
    assert mod.pick_wide(rows, [32])[32]["linear_residual"] != (32, 16, 256, 4, 3)
