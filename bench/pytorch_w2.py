#!/usr/bin/env python3
"""recur's fused layers against PyTorch on the same batches, one thread each, side by side.

    python3 bench/pytorch_w2.py            # builds and runs the recur benchmark, then PyTorch
    python3 bench/pytorch_w2.py --cells lstm gru
    python3 bench/pytorch_w2.py --device cuda     # both on the GPU (a `--features cuda` build)
    python3 bench/pytorch_w2.py --recur-bin PATH  # a prebuilt `cells` bench binary, no cargo

The recur figures come from `cargo bench -p recur-core --bench cells -- W2 <cell> fused --json
--dump-batches FILE`, which also writes the exact batches it measured (normalised values, one
row per sequence). PyTorch then trains the same model on those batches: `nn.RNN`/`nn.LSTM`/
`nn.GRU` (hidden 128, one layer) over packed sequences (`pack_sequence`, exact like recur's),
a linear head on h_n, summed squared error, backward, Adam. Packing is done before timing on
both sides. Without torch the script says so and exits 0 after printing recur's figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recur(cells, dump, device, recur_bin):
    rows = []
    for cell in cells:
        if recur_bin:
            cmd = [recur_bin, "--bench"]
        else:
            cmd = ["cargo", "bench", "-q", "-p", "recur-core", "--bench", "cells"]
            if device == "cuda":
                cmd[3:3] = ["--features", "cuda"]
            cmd.append("--")
        cmd += ["W2", cell, "fused", "--json", "--dump-batches", dump,
                "--device", "cuda:0" if device == "cuda" else "cpu"]
        env = dict(os.environ, CANDLE_NUM_THREADS="1", RAYON_NUM_THREADS="1")
        out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
            elif line.startswith("matmul peak"):
                print("recur:", line)
    return rows


def run_torch(cell, batches, warmup, hidden, device):
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_sequence

    torch.manual_seed(0)
    rnn = {"rnn_tanh": lambda: nn.RNN(1, hidden, batch_first=True),
           "lstm": lambda: nn.LSTM(1, hidden, batch_first=True),
           "gru": lambda: nn.GRU(1, hidden, batch_first=True)}[cell]().to(device)
    head = nn.Linear(hidden, 1).to(device)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=1e-3)
    prepared = []
    for batch in batches:
        seqs = [torch.tensor(r[:-1], dtype=torch.float32, device=device).unsqueeze(-1)
                for r in batch]
        target = torch.tensor([[r[-1]] for r in batch], dtype=torch.float32, device=device)
        prepared.append((pack_sequence(seqs, enforce_sorted=False), target))
    start = None
    for i, (packed, target) in enumerate(prepared):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        _, h = rnn(packed)
        h = h[0] if cell == "lstm" else h
        y = head(h[-1])
        loss = ((y - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return sum(len(b) for b in batches[warmup:]) / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["rnn_tanh", "lstm", "gru"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--recur-bin", help="the built `cells` bench binary (instead of cargo bench)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "batches.json")
        recur = run_recur(args.cells, dump, args.device, args.recur_bin)
        with open(dump) as f:
            data = json.load(f)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed here (pip install torch); recur's figures only:")
        for r in recur:
            print(f"  {r['cell']:<9} {r['fused_samples_per_s']:>10.0f} samples/s")
        return 0
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"PyTorch {torch.__version__} on {where}, {torch.get_num_threads()} thread; "
          f"W2: hidden {data['hidden']}, batch {len(data['batches'][0])}, "
          f"{len(data['batches']) - data['warmup']} measured steps after {data['warmup']} warm-up")
    print(f"{'cell':<9} {'recur/s':>10} {'PyTorch/s':>10} {'recur ÷ PyTorch':>16}")
    for r in recur:
        theirs = run_torch(r["cell"], data["batches"], data["warmup"], data["hidden"],
                           args.device)
        ours = r["fused_samples_per_s"]
        print(f"{r['cell']:<9} {ours:>10.0f} {theirs:>10.0f} {ours / theirs:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
