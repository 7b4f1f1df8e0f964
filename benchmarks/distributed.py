"""Data-parallel scaling of the analysis: time per HVP and per 2-D grid point on 1 and 2 ranks.

Usage::

    python benchmarks/distributed.py                 # digits CNN, 512 samples, gloo on CPU
    python benchmarks/distributed.py --resnet50      # + ResNet-50 per-sample HVP / gradient cost
    python benchmarks/distributed.py --samples 1024 --hvps 10 --grid 5

The model is the demo CNN (``landscape.models.digits_cnn``, ~151k parameters, float32, eval-mode
BatchNorm) on the bundled digits data, split into batches of 128 and sharded with
``as_data(..., shard=True)`` (batch ``i`` on rank ``i % world``). Ranks are spawned processes
with a gloo process group; each configuration is timed in its own processes:

* 1 rank x 1 thread (the per-sample cost), 1 rank x T threads and T ranks x 1 thread for
  T = the number of cores used (default 2), so that the last two compare the same hardware;
* per HVP: ``HessianOperator @ v`` over the whole dataset (one all-reduce of ``n`` numbers);
* per gradient: one forward+backward over the dataset plus the all-reduce (the HVP/gradient
  ratio is what the ImageNet estimate of docs/benchmarks.md scales);
* per grid point: ``landscape.slice_2d`` on a ``grid x grid`` grid (one forward pass
  per point, one all-reduce per row);
* the all-reduce of an ``n``-vector alone.

With ``--resnet50`` the script also measures, on one process, the gradient and HVP time per
224x224 image of ResNet-50 (torchvision's architecture, defined here; eval-mode BatchNorm,
float32) and prints the ImageNet-1k estimate of docs/benchmarks.md (section "Distributed scaling
and an ImageNet estimate") from that ratio (from the digits CNN's ratio otherwise).

Timings on a shared 2-core machine are noisy; ratios measured in the same process are more
stable than absolute times. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published training throughput of ResNet-50 v1.5 per GPU (images/s, forward+backward+update,
# batch 256, NVIDIA DeepLearningExamples, PyTorch): A100-80GB TF32 ~1,000 (AMP ~2,500).
# A float32/TF32 HVP is assumed; a training step ~ one gradient.
A100_TF32_TRAIN_IMG_S = 1000.0
IMAGENET_TRAIN = 1_281_167
LANCZOS_MATVECS_TOP5 = 25  # 19-27 HVPs for top-5 at 1e-3 (docs/ANCHORS); 30 on the 53-param test


def _time(fn, repeats: int) -> float:
    from analysis import distributed as D

    D.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    D.barrier()
    return (time.perf_counter() - t0) / repeats


def _worker(rank: int, world: int, threads: int, cfg: dict, outdir: str, init_file: str) -> None:
    torch.set_num_threads(threads)
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=120))
    try:
        import torch.nn.functional as F

        from analysis import HessianOperator, ParameterSpace
        from analysis import distributed as D
        from analysis.data import as_data
        from landscape import slice_2d
        from landscape.datasets import load_digits
        from landscape.models import digits_cnn

        torch.manual_seed(0)
        digits = load_digits(train_size=cfg["samples"])
        x, y = digits.x_train[: cfg["samples"]], digits.y_train[: cfg["samples"]]
        model = digits_cnn().eval()
        data = as_data((x, y), batch_size=cfg["batch"], shard=True)
        op = HessianOperator(model, "cross_entropy", data)
        space = ParameterSpace(model)
        v = torch.randn(space.numel, generator=torch.Generator().manual_seed(1))
        op @ v  # warm-up
        hvp = _time(lambda: op @ v, cfg["hvps"])

        batches = [(b.inputs, b.targets, b.size) for b in data]

        def gradient():
            model.zero_grad(set_to_none=True)
            for xb, yb, n in batches:
                (F.cross_entropy(model(xb), yb) * (n / cfg["samples"])).backward()
            g = space.grad_vector()
            D.all_reduce_sum(g)
            return g

        gradient()
        grad = _time(gradient, cfg["hvps"])
        buf = torch.randn(space.numel)
        allreduce = _time(lambda: D.all_reduce_sum(buf), 20)

        d1 = torch.randn(space.numel, generator=torch.Generator().manual_seed(2)) * 1e-2
        d2 = torch.randn(space.numel, generator=torch.Generator().manual_seed(3)) * 1e-2
        coords = torch.linspace(-1, 1, cfg["grid"]).tolist()
        D.barrier()
        t0 = time.perf_counter()
        s = slice_2d(model, "cross_entropy", data, d1, d2, coords, coords, progress=False)
        D.barrier()
        point = (time.perf_counter() - t0) / (cfg["grid"] ** 2 + 1)  # + the origin
        if rank == 0:
            with open(os.path.join(outdir, f"{world}x{threads}.json"), "w") as f:
                json.dump({"hvp": hvp, "grad": grad, "allreduce": allreduce, "point": point,
                           "n": space.numel, "loss0": s.loss_at_origin}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_config(world: int, threads: int, cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if world == 1:
            _worker(0, 1, threads, cfg, tmp, init_file)
        else:
            mp.spawn(_spawn_target, args=(world, threads, cfg, tmp, init_file), nprocs=world,
                     join=True)
        with open(os.path.join(tmp, f"{world}x{threads}.json")) as f:
            return json.load(f)


def _spawn_target(rank, world, threads, cfg, outdir, init_file):  # mp.spawn target
    _worker(rank, world, threads, cfg, outdir, init_file)


def resnet50() -> torch.nn.Module:
    """ResNet-50 (v1.5: stride on the 3x3 conv; torchvision's layout, 25.56M parameters), built
    here so that the measurement does not depend on a torchvision build matching torch."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = 4 * width
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def resnet50_cost(batch: int, repeats: int) -> dict:
    """Seconds per image of a gradient and of an HVP of ResNet-50 at 224x224 (one process)."""
    import torch.nn.functional as F

    from analysis import HessianOperator, ParameterSpace

    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    space = ParameterSpace(model)

    def gradient():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    op = HessianOperator(model, "cross_entropy", (x, y))
    v = torch.randn(space.numel)
    gradient()
    op @ v
    grad = _time(gradient, repeats) / batch
    hvp = _time(lambda: op @ v, repeats) / batch
    return {"grad": grad, "hvp": hvp, "n": space.numel}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hvps", type=int, default=5, help="timed HVPs (and gradients) per config")
    p.add_argument("--grid", type=int, default=5, help="grid side of the 2-D slice")
    p.add_argument("--cores", type=int, default=2, help="cores to compare over (T)")
    p.add_argument("--resnet50", action="store_true", help="measure ResNet-50 per-image costs")
    p.add_argument("--resnet-batch", type=int, default=2)
    args = p.parse_args()
    cfg = {"samples": args.samples, "batch": args.batch, "hvps": args.hvps, "grid": args.grid}
    T = args.cores
    configs = [(1, 1), (1, T), (T, 1)]
    rows = {}
    for world, threads in configs:
        rows[(world, threads)] = run_config(world, threads, cfg)
    base = rows[(1, T)]
    print(f"\nDigits CNN ({base['n']:,} parameters, float32), {args.samples} samples in batches "
          f"of {args.batch}, gloo on CPU ({os.cpu_count()} cores visible); "
          f"grid {args.grid}x{args.grid}.\n")
    print("| ranks x threads | HVP (ms) | HVP per sample (us) | gradient (ms) | HVP / gradient "
          "| grid point (ms) | all-reduce of n (ms) | HVP speed-up vs 1 x " + str(T) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for (world, threads), r in rows.items():
        print(f"| {world} x {threads} | {1e3 * r['hvp']:.1f} | "
              f"{1e6 * r['hvp'] * threads * world / args.samples:.1f} core-us | "
              f"{1e3 * r['grad']:.1f} | {r['hvp'] / r['grad']:.2f} | {1e3 * r['point']:.2f} | "
              f"{1e3 * r['allreduce']:.2f} | {base['hvp'] / r['hvp']:.2f}x |")
    ratio = rows[(1, 1)]["hvp"] / rows[(1, 1)]["grad"]
    print(f"\nHVP / gradient on one core: {ratio:.2f}")
    if args.resnet50:
        r = resnet50_cost(args.resnet_batch, 1)
        if r:
            ratio = r["hvp"] / r["grad"]
            print(f"\nResNet-50 ({r['n']:,} parameters, 224x224, float32, batch "
                  f"{args.resnet_batch}, {torch.get_num_threads()} threads): gradient "
                  f"{r['grad']:.3f} s/image, HVP {r['hvp']:.3f} s/image, HVP / gradient "
                  f"{ratio:.2f}")
    # the ImageNet estimate (assumptions in docs/benchmarks.md#distributed-scaling-and-an-imagenet-estimate)
    hvp_img_s = A100_TF32_TRAIN_IMG_S / ratio
    per_hvp = IMAGENET_TRAIN / (8 * hvp_img_s)
    total = LANCZOS_MATVECS_TOP5 * per_hvp
    print(f"\nEstimate, top-5 lambda_max of ResNet-50 on ImageNet-1k train ({IMAGENET_TRAIN:,} "
          f"images), 8 x A100 TF32 ({A100_TF32_TRAIN_IMG_S:.0f} img/s/GPU training), HVP = "
          f"{ratio:.2f} x gradient, {LANCZOS_MATVECS_TOP5} matvecs: {hvp_img_s:.0f} img/s/GPU "
          f"per HVP, {per_hvp / 60:.1f} min per full-data HVP, {total / 3600:.1f} h in total "
          f"({total / 3600 * 50_000 / IMAGENET_TRAIN * 60:.1f} min on a 50k-image subset).")


if __name__ == "__main__":
    main()
