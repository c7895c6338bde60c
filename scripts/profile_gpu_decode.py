#!/usr/bin/env python3
"""Where a GPU decode forward spends its time: wall time against GPU-busy time and kernel launches
(torch.profiler), batch 1, 512-token context. Run on a CUDA machine: python scripts/profile_gpu_decode.py"""
import time

import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner

r = ModelRunner(device="cuda", kv_slots=8192)
ctx = r.kv.alloc(513)
r.forward(ForwardBatch.build([torch.randint(100,1000,(512,))],[torch.empty(0,dtype=torch.long)],[ctx[:512]],device="cuda",logits_indices=torch.tensor([0])))
fb = ForwardBatch.build([torch.tensor([5])],[ctx[:512]],[ctx[512:]],device="cuda")
for _ in range(5): r.forward(fb)
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5): r.forward(fb)
    torch.cuda.synchronize()
ev = prof.key_averages()
cuda_us = sum(e.self_device_time_total for e in ev) / 5
n_kernels = sum(e.count for e in ev if e.self_device_time_total > 0) / 5
t0 = time.perf_counter()
for _ in range(20): r.forward(fb)
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / 20
print(f"decode forward batch 1: wall {wall*1e3:.2f} ms, GPU busy {cuda_us/1e3:.2f} ms, {n_kernels:.0f} kernels per forward")
print(ev.table(sort_by="self_cpu_time_total", row_limit=12))
