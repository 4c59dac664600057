"""Parameter counts and train / inference images per second of every model preset on this machine.

    python bench/model_throughput.py [--presets tiny cpu anchor] [--threads N] [--out bench/model_throughput.json]

Train = forward + backward + AdamW step on random grayscale images at the preset's size;
inference = eval-mode forward without gradients. The anchor preset (~90M parameters) is
measured forward-only with a small batch unless --anchor-train. The median of a few timed
repetitions is reported, after warm-up; on a shared CPU the numbers are noisy (load average recorded).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fedxvit.errors import ArgumentParser
from fedxvit.model import PRESETS, build_model

DEFAULT_BATCH = {"tiny": 32, "cpu": 32, "anchor": 2}


def images_per_second(step, batch: int, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def measure(preset: str, batch: int, repeats: int, train: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4).to(device)
    size = PRESETS[preset].image_size
    images = torch.rand(batch, 1, size, size, device=device)
    labels = torch.randint(0, 4, (batch,), device=device)
    row = {"preset": preset, "params": model.param_count, "image_size": size, "batch": batch}

    model.eval()

    @torch.no_grad()
    def infer():
        model(images)

    row["infer_img_s"] = images_per_second(infer, batch, repeats)
    if train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        model.train()

        def train_step():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        row["train_img_s"] = images_per_second(train_step, batch, repeats)
    else:
        row["train_img_s"] = None
    return row


def main(argv=None) -> list:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--anchor-train", action="store_true", help="also time training steps of the anchor preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).with_name("model_throughput.json")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        train = preset != "anchor" or args.anchor_train
        rows.append(measure(preset, DEFAULT_BATCH[preset], args.repeats if preset != "anchor" else 3, train, device))
    print(f"{'preset':<8} {'params':>12} {'size':>5} {'batch':>5} {'train img/s':>12} {'infer img/s':>12}")
    for r in rows:
        train = f"{r['train_img_s']:.1f}" if r["train_img_s"] else "-"
        print(
            f"{r['preset']:<8} {r['params']:>12,} {r['image_size']:>5} {r['batch']:>5} {train:>12} "
            f"{r['infer_img_s']:>12.1f}"
        )
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "device": str(device),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "presets": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
