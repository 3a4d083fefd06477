"""Where the time of one compress() call goes (GPU): host-side cProfile and the CUDA kernels.

    python benchmarks/profile_compress.py [--group 64 --rotate 1 --ratio 0.005]
"""

import argparse
import cProfile
import pstats

import torch

import hyclora_models as H

p = argparse.ArgumentParser()
p.add_argument("--group", default="64")
p.add_argument("--rotate", type=int, default=1)
p.add_argument("--ratio", type=float, default=0.005)
a = p.parse_args()
group = a.group if a.group == "channel" else int(a.group)
x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
kw = dict(bits=2, group_size=group, rotate=bool(a.rotate), outlier_ratio=a.ratio)
for _ in range(20):
    H.compress(x, **kw).decompress()
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(100):
    H.compress(x, **kw)
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(15)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as tp:
    for _ in range(20):
        H.compress(x, **kw)
    torch.cuda.synchronize()
print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
