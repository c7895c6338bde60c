"""Compiles the forward's Triton kernels for sm_90 with PDL on, with no GPU (triton.compile to a
GPUTarget; ptxas ships with triton), and prints per variant how many griddepcontrol.wait,
prefetch.global.L2 and atom instructions the PTX holds. Run by test_kernels_compile_sm90.py in a
process of its own: under TRITON_INTERPRET=1 (the CPU tests) @triton.jit builds no compilable
kernels, and the interpreter never runs the PDL branches at all."""
from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton
from triton.backends.compiler import GPUTarget

from srt_entmtp.model import fused, small_linear
from srt_entmtp.model.attention import tree_triton
from srt_entmtp.spec import verify_kernels
from srt_entmtp.spec.drafters import fused_draft

TARGET = GPUTarget("cuda", 90, 32)


def counts(jf, types: dict, consts: dict, **opts) -> dict:
    names = list(inspect.signature(jf.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
    src = triton.compiler.ASTSource(fn=jf, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=TARGET, options={"launch_pdl": True, **opts}).asm["ptx"]
    return {"wait": ptx.count("griddepcontrol.wait"), "launch": ptx.count("griddepcontrol.launch_dependents"),
            "prefetch": ptx.count("prefetch.global.L2"), "atomic": ptx.count("atom.")}


def main() -> None:
    out = {}
    _, slk = small_linear._kernel()
    base = {"NORM": True, "SILU": False, "RESIDUAL": False, "HAS_BIAS": False, "X_ROWS": False, "X2": False,
            "X2_ROWS": False,
            "RES_ROWS": False, "TOPK": False, "ROPE": False, "HEAD_D": 64, "PDL": True, "K_LINES": 16, "BLOCK_M": 16, "BLOCK_N": 16,
            "BLOCK_K": 256}
    ty = {"eps": "fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
          "rows2_ptr": "*i64", "xrows_ptr": "*i64", "topv_ptr": "*fp32", "topi_ptr": "*i32"}
    for name, change in {"norm_qkv_rope": {"ROPE": True, "HAS_BIAS": True}, "norm_linear": {},
                         "norm_gate_silu": {"SILU": True, "BLOCK_N": 32}, "linear_residual": {"NORM": False, "RESIDUAL": True},
                         "norm2_linear": {"X2": True, "X2_ROWS": True},
                         "norm_linear_add_rows": {"RESIDUAL": True, "RES_ROWS": True},
                         "norm_linear_add_rows x_rows": {"RESIDUAL": True, "RES_ROWS": True, "X_ROWS": True},
                         "norm_linear_topk": {"TOPK": True, "BLOCK_N": 128, "BLOCK_K": 64}}.items():
        out[name] = counts(slk, ty, {**base, **change}, num_warps=4, num_stages=4)
    _, attn, merge = tree_triton._kernels()
    ty = {"kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32", "anc_ptr": "*i64", "skip_ptr": "*i32",
          "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "ticket_ptr": "*i32", "scale_log2": "fp32"}
    for ml in (False, True):
        out[f"tree_attn merge_last={ml}"] = counts(attn, ty, {"S": 5, "H": 9, "KH": 3, "D": 64, "BLOCK_M": 16, "BLOCK_N": 64,
                                                                  "SPLIT": True, "SKIP": True, "MERGE_LAST": ml, "PDL": True},
                                                   num_warps=4)
    for block_r in (4, 64):  # tree_triton.merge_rows: 4 rows a program for small steps, up to 64
        out[f"merge block_r={block_r}"] = counts(merge, {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32"},
                                                 {"D": 64, "NSPLIT": 8, "BLOCK_R": block_r, "PDL": True})
    _, pick, dinp = fused_draft._kernel()
    for rows in (False, True):
        out[f"pick sel_rows={rows}"] = counts(pick, {"topv_ptr": "*fp32", "topi_ptr": "*i32", "parent_ptr": "*i64",
                                                     "rank_ptr": "*i64", "sel_row_ptr": "*i64", "vocab_ptr": "*i64",
                                                     "out_ptr": "*i64", "out2_ptr": "*i64"},
                                              {"HAS_VOCAB": True, "SEL_ROWS": rows, "OUT2": rows, "BLOCK_C": 64,
                                               "PDL": True})
    out["draft_inputs"] = counts(dinp, {n: "*i64" for n in ("req_ptr", "root_in_ptr", "roots_ptr", "row_ptr", "pil_ptr",
                                                            "slot_ptr", "tok_out_ptr", "tok0_ptr", "xrows_ptr")},
                                 {"S": 27, "SP": 32, "PDL": True}, num_warps=1)
    k = fused._triton()
    out["add_rms_norm"] = counts(k.add_rms_norm_kernel, {"eps": "fp32"}, {"HAS_RES": True, "BLOCK": 1024, "PDL": True})
    out["rope_store"] = counts(k.rope_store_kernel, {"pos_ptr": "*i64", "slot_ptr": "*i64", "cos_ptr": "*fp32",
                                                     "sin_ptr": "*fp32"}, {"D": 64, "HALF": 32, "PDL": True})
    _, am, acc, vin = verify_kernels._kernels()
    out["argmax_entropy"] = counts(am, {"ent_ptr": "*fp32", "pred_ptr": "*i64"}, {"BLOCK_V": 2048, "PDL": True},
                                   num_warps=8)
    for ch in (0, 12):  # 0: argmax_entropy's pred and ent; 12: the chunks' partials (SPLIT_ARGMAX)
        ty = {"ent_ptr": "*fp32", "eout_ptr": "*fp32", "valid_ptr": "*u8", "mask_ptr": "*u8", "layer_stride": "i64",
              **{n: "*i64" for n in ("tok_ptr", "pred_ptr", "row_ptr", "req_ptr", "oslot_ptr", "par_ptr", "depth_ptr",
                                     "roots_ptr", "kept_ptr", "res_ptr")}}
        if ch:
            ty["pred_ptr"] = "*fp32"
        out[f"accept ch={ch}"] = counts(acc, ty, {"S": 23, "D": 5, "CH": ch, "CHP": 16 if ch else 1, "SP": 32, "DP": 8,
                                                  "ROW": 192, "ROWP": 256, "HP": 1024, "PDL": True}, num_warps=4)
    out["argmax_parts"] = counts(verify_kernels._argmax_parts_kernel(), {"part_ptr": "*fp32"},
                                 {"BLOCK_V": 4096, "PDL": True}, num_warps=8)
    out["verify_inputs"] = counts(vin, {n: "*i64" for n in ("tok_ptr", "depth_ptr", "anc_tab_ptr", "row_ptr", "req_ptr",
                                                            "known_ptr", "ahead_ptr", "kept_ptr", "ids_ptr", "pos_ptr",
                                                            "anc_ptr")} | {"skip_ptr": "*i32"},
                                  {"S": 23, "SP": 32, "PDL": True}, num_warps=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
