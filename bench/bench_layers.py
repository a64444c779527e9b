"""Where the CPU step loses FLOP/s, layer by layer (flying-shapes network, B * K = 192 images).

    .venv/bin/python bench/bench_layers.py [--threads 2] [--repeats 20]

Eight questions, each answered by timing one layer or kernel, forward + backward unless said
(median of ``--repeats`` after a warm-up):

1. LayerNorm + activation, the networks' most common elementwise pair: eager against
   ``torch.compile`` of the pair alone (the fusion inductor would do inside the cell).
2. The first conv (1 -> 32 channels, 4x4 stride 2): its forward, the gradient of its input
   and of its weight apart, against the same input gradient as a matmul + ``F.fold``.
3. The up-conv (NEM_SPEC.md §3; upsample x 2 then a 4x4 conv): the model's sub-pixel conv
   (``UpConv``) against the equivalent stride-2 transposed conv with a 5x5 kernel.
4. The wide layers (the 32 -> 64 conv, the 3136 <-> 512 linears, the 64 -> 32 up-conv) as a
   fraction of the dense matmul peak of the same precision, measured in the same run.
5. Why inductor's ReLU is slow: compiled kernels that write a bool tensor (the mask ReLU saves
   for its backward) against the same kernels writing floats.
6. Every conv of the network apart (the two strided convs and the two up-convs' 3x3 convs):
   forward, input gradient and weight gradient, each as a fraction of the matmul peak.
7. The network alone (T = 20 cell calls, backward, Adam) as the model builds it, against the
   two layout knobs eager PyTorch offers: channels-last memory format and in-place activations.
8. Why the compiled cell loses: the network alone (as in 7), eager against ``torch.compile`` of
   the cell with inductor's defaults, without its layout optimisation (which turns conv tensors
   channels-last), and in max-autotune; then the slowest fused kernels of the default build.

    .venv/bin/python bench/bench_layers.py --parts 5      # one part

Each row prints milliseconds and achieved GFLOP/s where the layer has FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import NetworkStep, matmul_peak  # noqa: E402
from nem_study.config import RunConfig  # noqa: E402
from nem_study.networks import UpConv  # noqa: E402

N = 192  # batch 64 x K = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ms(f, repeats: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ln_relu(x, w, b):
    return F.relu(F.layer_norm(x, w.shape, w, b))


def ln_elu(x, w, b):
    return F.elu(F.layer_norm(x, w.shape, w, b))


def transposed_up_conv(x, weight, bias):
    """Upsample x 2 + 4x4 SAME conv as one stride-2 transposed conv: the 5x5 kernel sums each
    2x2 block of taps that fall on the same source pixel."""
    O, I = weight.shape[:2]
    box = torch.ones(1, 1, 2, 2, dtype=weight.dtype)
    v = F.conv2d(weight.reshape(O * I, 1, 4, 4), box, padding=1).view(O, I, 5, 5)
    return F.conv_transpose2d(x, v.flip(-1, -2).transpose(0, 1), bias, stride=2, padding=2, output_padding=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--parts", type=int, nargs="+", default=list(range(1, 9)), choices=range(1, 9))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, N = {N} images; ms per forward + backward")

    parts = [layer_norm_activation, first_conv, up_conv, wide_layers, bool_outputs, every_conv,
             network_layouts, compiled_cell]
    for number in sorted(set(args.parts)):
        parts[number - 1](args)


def layer_norm_activation(args) -> None:
    print("\n1. LayerNorm + activation: eager against torch.compile of the pair")
    print("| shape | pair | precision | eager ms | compiled ms | compiled / eager |\n|---|---|---|---|---|---|")
    for shape in [(32, 14, 14), (64, 7, 7), (3136,)]:
        for fn in (ln_relu, ln_elu):
            compiled = torch.compile(fn, dynamic=False)
            for name, dtype in DTYPES.items():
                x = torch.randn(N, *shape, dtype=dtype, requires_grad=True)
                w, b = torch.ones(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
                g = torch.randn(N, *shape, dtype=dtype)
                t = [ms(lambda f=f: f(x, w.to(dtype), b.to(dtype)).backward(g), args.repeats) for f in (fn, compiled)]
                print(f"| {shape} | {fn.__name__} | {name} | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f} |", flush=True)


def first_conv(args) -> None:
    print("\n2. The first conv, 1 -> 32 channels, 4x4 stride 2, 28 x 28 -> 14 x 14")
    print("| precision | part | ms | GFLOP/s |\n|---|---|---|---|")
    grad = torch.ops.aten.convolution_backward
    for name, dtype in DTYPES.items():
        x = torch.randn(N, 1, 28, 28, dtype=dtype)
        w = 0.1 * torch.randn(32, 1, 4, 4, dtype=dtype)
        g = torch.randn(N, 32, 14, 14, dtype=dtype)
        flops = 2 * N * 32 * 14 * 14 * 16
        parts = {
            "forward (mkldnn conv)": lambda: F.conv2d(x, w, None, 2, 1),
            "input gradient (convolution_backward)":
                lambda: grad(g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]),
            "weight gradient (convolution_backward)":
                lambda: grad(g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]),
            "input gradient as matmul + fold":
                lambda: F.fold(w.view(32, 16).t() @ g.view(N, 32, 196), (28, 28), 4, padding=1, stride=2),
        }
        for part, f in parts.items():
            t = ms(f, args.repeats)
            print(f"| {name} | {part} | {t:.2f} | {flops / t / 1e6:.0f} |", flush=True)


def up_conv(args) -> None:
    print("\n3. Up-conv: sub-pixel conv (UpConv) against a stride-2 transposed conv")
    print("| layer | precision | UpConv ms | transposed ms | transposed / UpConv | max abs difference |")
    print("|---|---|---|---|---|---|")
    for c_in, c_out, size in [(64, 32, 7), (32, 1, 14)]:
        up = UpConv(c_in, c_out)
        x = torch.randn(N, c_in, size, size, requires_grad=True)
        with torch.no_grad():
            diff = (up(x) - transposed_up_conv(x, up.weight, up.bias)).abs().max().item()
        for name, dtype in DTYPES.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                t = [ms(lambda: up(x).sum().backward(), args.repeats),
                     ms(lambda: transposed_up_conv(x, up.weight, up.bias).sum().backward(), args.repeats)]
            print(f"| {c_in} -> {c_out}, {size} -> {2 * size} | {name} | {t[0]:.2f} | {t[1]:.2f} | "
                  f"{t[1] / t[0]:.2f} | {diff:.1e} |", flush=True)


def wide_layers(args) -> None:
    print("\n4. The wide layers against the matmul peak (forward + backward FLOPs = 3x forward)")
    print("| layer | precision | ms | GFLOP/s | % of peak |\n|---|---|---|---|---|")
    up = UpConv(64, 32)
    layers = {  # name -> (module, input shape, forward FLOPs)
        "conv 32 -> 64, 4x4 stride 2, 14 -> 7": (torch.nn.Conv2d(32, 64, 4, 2, 1), (32, 14, 14), 2 * N * 64 * 49 * 32 * 16),
        "linear 3136 -> 512": (torch.nn.Linear(3136, 512), (3136,), 2 * N * 3136 * 512),
        "linear 512 -> 3136": (torch.nn.Linear(512, 3136), (512,), 2 * N * 3136 * 512),
        "up-conv 64 -> 32, 7 -> 14 (UpConv)": (up, (64, 7, 7), 2 * N * 4 * 32 * 49 * 64 * 9),
    }
    for name, dtype in DTYPES.items():
        peak = matmul_peak(dtype)
        print(f"| dense matmul peak | {name} | | {peak / 1e9:.0f} | 100 |", flush=True)
        for layer, (module, shape, flops) in layers.items():
            x = torch.randn(N, *shape, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                t = ms(lambda: module(x).float().sum().backward(), args.repeats)
            print(f"| {layer} | {name} | {t:.2f} | {3 * flops / t / 1e6:.0f} | {100 * 3 * flops / (t / 1e3) / peak:.0f} |",
                  flush=True)


def bool_outputs(args) -> None:
    print("\n5. Compiled kernels writing a bool tensor against the same kernels writing floats")
    print("| kernel (N x 32 x 14 x 14 elements) | eager ms | compiled ms | compiled / eager |\n|---|---|---|---|")
    x = torch.randn(N, 32, 14, 14, requires_grad=True)
    g = torch.randn(N, 32, 14, 14)
    with torch.no_grad():
        for name, fn in [("x > 0 (bool out)", lambda x: x > 0), ("(x > 0).float() (float out)", lambda x: (x > 0).float())]:
            compiled = torch.compile(fn, dynamic=False)
            t = [ms(lambda f=f: f(x), args.repeats) for f in (fn, compiled)]
            print(f"| {name}, no grad | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f} |", flush=True)
    for name, fn in [("relu (saves a bool mask)", F.relu), ("elu (saves its output)", F.elu)]:
        compiled = torch.compile(fn, dynamic=False)
        t = [ms(lambda f=f: f(x).backward(g), args.repeats) for f in (fn, compiled)]
        print(f"| {name}, forward + backward | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f} |", flush=True)


def every_conv(args) -> None:
    print("\n6. Every conv apart: forward, input gradient, weight gradient (+ bias), % of the matmul peak")
    print("| conv (as computed) | precision | forward ms (%) | input grad ms (%) | weight grad ms (%) |")
    print("|---|---|---|---|---|")
    grad = torch.ops.aten.convolution_backward
    convs = {  # name -> (c_in, c_out, kernel, stride, input size); padding 1 throughout
        "1 -> 32, 4x4 stride 2, 28 -> 14": (1, 32, 4, 2, 28),
        "32 -> 64, 4x4 stride 2, 14 -> 7": (32, 64, 4, 2, 14),
        "up-conv 64 -> 32: 64 -> 128, 3x3, 7 x 7": (64, 128, 3, 1, 7),
        "up-conv 32 -> 1: 32 -> 4, 3x3, 14 x 14": (32, 4, 3, 1, 14),
    }
    for name, dtype in DTYPES.items():
        peak = matmul_peak(dtype)
        for conv, (c_in, c_out, k, s, size) in convs.items():
            x = torch.randn(N, c_in, size, size, dtype=dtype)
            w = 0.1 * torch.randn(c_out, c_in, k, k, dtype=dtype)
            y = F.conv2d(x, w, None, s, 1)
            g = torch.randn_like(y)
            flops = 2 * y.numel() * c_in * k * k  # the same for each of the three
            t = [ms(lambda: F.conv2d(x, w, None, s, 1), args.repeats)]
            for mask in ([True, False, False], [False, True, True]):
                t.append(ms(lambda m=mask: grad(g, x, w, [c_out], [s, s], [1, 1], [1, 1], False, [0, 0], 1, m),
                            args.repeats))
            cells = " | ".join(f"{v:.2f} ({100 * flops / (v / 1e3) / peak:.0f} %)" for v in t)
            print(f"| {conv} | {name} | {cells} |", flush=True)


def network_layouts(args, rounds: int = 7) -> None:
    print("\n7. The network alone (T = 20 cell calls, backward, Adam): the model as built, channels-last,")
    print("   in-place activations; the three alternate, median of the rounds, s per step")
    print("| precision | as built | channels-last | in-place activations | channels-last / as built | "
          "in-place / as built |\n|---|---|---|---|---|---|")
    cfg = RunConfig.model_validate({"data": {"name": "flying_shapes"}})
    for precision in DTYPES:
        steps = {layout: NetworkStep(cfg, 64, precision=precision) for layout in ("as built", "channels-last", "in-place")}
        # the input, B*K one-channel images, is channels-last already; the weights change in place
        steps["channels-last"].model.to(memory_format=torch.channels_last)
        for m in steps["in-place"].model.modules():
            if isinstance(m, (torch.nn.ReLU, torch.nn.ELU)):
                m.inplace = True  # safe here: each follows a LayerNorm, whose backward needs its input
        times = {layout: [] for layout in steps}
        for step in steps.values():
            step.run()  # warm-up; the same weights give the same loss
        losses = [step.loss for step in steps.values()]
        assert max(losses) - min(losses) < 1e-3 * abs(losses[0]), losses
        for _ in range(rounds):
            for layout, step in steps.items():
                times[layout].append(step.run())
        t = {layout: statistics.median(v) for layout, v in times.items()}
        print(f"| {precision} | {t['as built']:.3f} | {t['channels-last']:.3f} | {t['in-place']:.3f} | "
              f"{t['channels-last'] / t['as built']:.2f} | {t['in-place'] / t['as built']:.2f} |", flush=True)


def compiled_cell(args, rounds: int = 7) -> None:
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile

    print("\n8. The network alone (T = 20 cell calls, backward, Adam): eager against torch.compile builds of the cell")
    print("| build | eager s | compiled s | compiled / eager |\n|---|---|---|---|")
    cfg = RunConfig.model_validate({"data": {"name": "flying_shapes"}})
    eager = NetworkStep(cfg, 64)
    eager.run()
    builds = {"default": ({}, "default"), "layout_optimization off": ({"layout_optimization": False}, "default"),
              "max-autotune": ({}, "max-autotune-no-cudagraphs")}
    for build, (patch, mode) in builds.items():
        torch._dynamo.reset()
        with inductor.patch(patch | {"cpp.enable_kernel_profile": True}):
            compiled = NetworkStep(cfg, 64, compile=mode)
            compiled.run()  # compiles: one graph for the first call (h = 0), one for the others
            times = {"eager": [], "compiled": []}
            for _ in range(rounds):
                times["eager"].append(eager.run())
                times["compiled"].append(compiled.run())
            e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
            print(f"| {build} | {e:.3f} | {c:.3f} | {c / e:.2f} |", flush=True)
            if build == "default":
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    compiled.run()
                kernels = defaultdict(float)  # kernel -> us, over both graphs
                for k in prof.key_averages():
                    if "cpp_fused" in k.key:
                        kernels[k.key.split("_", 2)[2]] += k.self_cpu_time_total
    print("\nThe default build's slowest fused kernels (ms per cell call):")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:4]:
        print(f"- {us / 1e3 / cfg.steps:.1f} ms: {name}")


if __name__ == "__main__":
    main()
