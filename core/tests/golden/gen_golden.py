"""Generates the PyTorch golden values that recur-core's tests compare against.

Run from the repository root with PyTorch and safetensors installed (CPU is enough):

    python core/tests/golden/gen_golden.py

It writes, next to this file:
- cells/<kind>_l<layers>_<uni|bi>.safetensors: parameters (state_dict names), a padded input
  batch with garbage in the padding, the lengths, targets, and PyTorch's outputs (padded
  per-step output, h_n, c_n, the head's y) and every parameter's gradient (`grad.<name>`) of
  loss = sum_i mean_j (y_ij - target_ij)^2, with packed sequences (enforce_sorted=False);
- optim.json: torch.optim trajectories over 3 steps with fixed gradients;
- plateau.json: ReduceLROnPlateau's learning rates for a fixed loss sequence;
- pytorch_tutorial.safetensors: a tutorial model's state_dict saved by safetensors.torch, with
  pytorch_tutorial.json holding inputs and the predictions PyTorch makes with it;
- heads/<name>.safetensors: a recurrent layer under an MLP head (`nn.Sequential` of Linear,
  ReLU, Dropout, …, Linear), its state_dict, a batch, dropout masks, the training-mode outputs
  with those masks, the eval-mode outputs (nn.Dropout off), the loss (MSE or BCE with logits)
  and every parameter's gradient;
- every_step/<name>.safetensors: a two-layer model whose head runs on every real step's output,
  the targets of every step (padded), the padded outputs (zero past each length), the loss (MSE
  or BCE with logits, each sample's the mean over its real steps and outputs, summed) and every
  parameter's gradient;
- stateful/<name>.safetensors: truncated backpropagation through time. Streams of one series
  (a series cut into contiguous spans) run chunk by chunk, each chunk starting from the state
  its stream ended the previous chunk with, detached (`h = h.detach()`), the head at every step
  and an SGD step after each chunk: the state_dict before training (`init.<name>`), the whole
  streams' inputs and targets, each chunk's loss (the mean over streams, steps and outputs),
  gradients (`chunk<j>.grad.<name>`), outputs and final states (`chunk<j>.h`, `chunk<j>.c`:
  `(layers, streams, hidden)`), and the parameters after the last step (`final.<name>`).
"""

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(1234)


class Model(nn.Module):
    def __init__(self, kind, input_size, hidden, layers, bi, out):
        super().__init__()
        self.kind = kind
        self.bi = bi
        args = dict(input_size=input_size, hidden_size=hidden, num_layers=layers,
                    batch_first=True, bidirectional=bi)
        if kind == "lstm":
            self.rnn = nn.LSTM(**args)
        elif kind == "gru":
            self.rnn = nn.GRU(**args)
        else:
            self.rnn = nn.RNN(nonlinearity=kind.split("_")[1], **args)
        self.linear = nn.Linear(hidden * (2 if bi else 1), out)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        c = None
        if self.kind == "lstm":
            h, c = h
        top = torch.cat([h[-2], h[-1]], 1) if self.bi else h[-1]
        y = self.linear(top)
        out, _ = pad_packed_sequence(out, batch_first=True)
        return y, out, h, c


def cells():
    os.makedirs(os.path.join(HERE, "cells"), exist_ok=True)
    lengths = torch.tensor([3, 5, 1, 5])
    input_size, hidden, out_size = 2, 3, 2
    for kind in ["rnn_tanh", "rnn_relu", "lstm", "gru"]:
        for layers in [1, 2]:
            for bi in [False, True]:
                model = Model(kind, input_size, hidden, layers, bi, out_size)
                x = torch.randn(len(lengths), int(lengths.max()), input_size)
                for i, n in enumerate(lengths):
                    x[i, n:] = 100.0 + torch.randn(int(lengths.max()) - n, input_size)
                target = torch.randn(len(lengths), out_size)
                y, out, h, c = model(x, lengths)
                loss = ((y - target) ** 2).mean(dim=1).sum()
                loss.backward()
                t = {name: p.detach().clone() for name, p in model.state_dict().items()}
                t.update({"grad." + name: p.grad.clone() for name, p in model.named_parameters()})
                t.update({"input": x, "lengths": lengths.float(), "target": target,
                          "y": y.detach(), "output": out.detach(), "h_n": h.detach()})
                if c is not None:
                    t["c_n"] = c.detach()
                name = f"{kind}_l{layers}_{'bi' if bi else 'uni'}.safetensors"
                save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(HERE, "cells", name))


def optim():
    p0 = [0.5, -1.0, 2.0, 0.0, -0.25]
    grads = [[0.1, -0.2, 0.3, 0.0, 1.0], [-0.5, 0.4, 0.0, 0.2, 0.1], [0.3, 0.3, -0.3, -0.1, 0.0]]
    cases = {
        "sgd": (torch.optim.SGD, dict(lr=0.1)),
        "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
        "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
        "adam": (torch.optim.Adam, dict(lr=0.01)),
        "adam_wd": (torch.optim.Adam, dict(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
        "adamw": (torch.optim.AdamW, dict(lr=0.01)),
        "adamw_wd": (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.5)),
        "adadelta": (torch.optim.Adadelta, dict(lr=1.0)),
        "adadelta_wd": (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1)),
    }
    out = {"params": p0, "grads": grads, "cases": {}}
    for name, (cls, kwargs) in cases.items():
        p = torch.tensor(p0, requires_grad=True)
        opt = cls([p], **kwargs)
        steps = []
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
            steps.append(p.detach().tolist())
        kw = dict(kwargs)
        if "betas" in kw:
            kw["beta1"], kw["beta2"] = kw.pop("betas")
        out["cases"][name] = {"optimizer": cls.__name__, "kwargs": kw, "steps": steps}
    with open(os.path.join(HERE, "optim.json"), "w") as f:
        json.dump(out, f, indent=1)


def plateau():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1, min_lr=0.1)
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85,
              0.85, 0.85, 0.85, 0.85, 0.7999]
    lrs = []
    for loss in losses:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    with open(os.path.join(HERE, "plateau.json"), "w") as f:
        json.dump({"factor": 0.5, "patience": 2, "cooldown": 1, "min_lr": 0.1,
                   "losses": losses, "lrs": lrs}, f, indent=1)


def tutorial_state_dict():
    model = Model("rnn_tanh", 1, 8, 1, False, 1)
    save_file(model.state_dict(), os.path.join(HERE, "pytorch_tutorial.safetensors"))
    histories = [[1, 2, 3], [3, 5, 7], [9, 7, 5, 3], [2, 0, -2], [0, -3, -6]]
    lengths = torch.tensor([len(h) for h in histories])
    x = torch.zeros(len(histories), int(lengths.max()), 1)
    for i, h in enumerate(histories):
        x[i, : len(h), 0] = torch.tensor(h, dtype=torch.float) / 50
    with torch.no_grad():
        y, _, _, _ = model(x, lengths)
    with open(os.path.join(HERE, "pytorch_tutorial.json"), "w") as f:
        json.dump({"scale": 50, "histories": histories, "predictions": (y[:, 0] * 50).tolist()}, f, indent=1)


class HeadModel(nn.Module):
    """One recurrent layer and an MLP head: what recur's `ModelConfig.head` names."""

    def __init__(self, kind, input_size, hidden, widths, out, p):
        super().__init__()
        self.kind = kind
        args = dict(input_size=input_size, hidden_size=hidden, batch_first=True)
        if kind == "lstm":
            self.rnn = nn.LSTM(**args)
        elif kind == "gru":
            self.rnn = nn.GRU(**args)
        else:
            self.rnn = nn.RNN(nonlinearity=kind.split("_")[1], **args)
        layers, prev = [], hidden
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU(), nn.Dropout(p)]
            prev = w
        layers.append(nn.Linear(prev, out))
        self.head = nn.Sequential(*layers)

    def top(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        if self.kind == "lstm":
            h = h[0]
        return h[-1]

    def forward(self, x, lengths):
        return self.head(self.top(x, lengths))

    def forward_masked(self, x, lengths, masks):
        """Training mode with given dropout masks (0 or 1/(1-p)) in place of nn.Dropout's draws."""
        z = self.top(x, lengths)
        mods = list(self.head)
        for i, m in enumerate(masks):
            z = mods[3 * i + 1](mods[3 * i](z)) * m
        return mods[-1](z)


def heads():
    os.makedirs(os.path.join(HERE, "heads"), exist_ok=True)
    lengths = torch.tensor([3, 5, 1, 5, 2])
    input_size, hidden, out = 2, 3, 2
    cases = [("gru_mse", "gru", [5, 4], 0.5, "mse"), ("lstm_bce", "lstm", [6], 0.25, "bce"),
             ("rnn_tanh_bce", "rnn_tanh", [4, 3], 0.0, "bce")]
    for name, kind, widths, p, loss_kind in cases:
        model = HeadModel(kind, input_size, hidden, widths, out, p)
        x = torch.randn(len(lengths), int(lengths.max()), input_size)
        for i, n in enumerate(lengths):
            x[i, n:] = 100.0 + torch.randn(int(lengths.max()) - n, input_size)
        masks = [(torch.rand(len(lengths), w) >= p).float() / (1 - p) for w in widths]
        if loss_kind == "bce":
            target = (torch.rand(len(lengths), out) > 0.5).float()
        else:
            target = torch.randn(len(lengths), out)
        model.train()
        y = model.forward_masked(x, lengths, masks)
        if loss_kind == "bce":
            loss = nn.functional.binary_cross_entropy_with_logits(y, target, reduction="sum") / out
        else:
            loss = ((y - target) ** 2).mean(dim=1).sum()
        loss.backward()
        model.eval()
        with torch.no_grad():
            y_eval = model(x, lengths)
        t = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t.update({"grad." + k: v.grad.clone() for k, v in model.named_parameters()})
        t.update({"input": x, "lengths": lengths.float(), "target": target, "y": y.detach(),
                  "y_eval": y_eval, "loss": loss.detach().reshape(1)})
        t.update({f"mask.{i}": m for i, m in enumerate(masks)})
        save_file({k: v.contiguous() for k, v in t.items()},
                  os.path.join(HERE, "heads", f"{name}.safetensors"))


def every_step():
    """A target at every step: the head on the padded output of every real step, each sample's
    loss the mean over its real steps and outputs, summed over the batch."""
    os.makedirs(os.path.join(HERE, "every_step"), exist_ok=True)
    input_size, hidden, out = 2, 3, 2
    # The last case has rows of equal length, as a series' windows: recur's training step runs
    # on it whole.
    for kind, bi, loss_kind, lengths in [
            ("gru", False, "mse", [3, 5, 1, 5, 2]), ("lstm", True, "bce", [3, 5, 1, 5, 2]),
            ("rnn_tanh", False, "bce", [4, 4, 4])]:
        lengths = torch.tensor(lengths)
        model = Model(kind, input_size, hidden, 2, bi, out)
        b, t_max = len(lengths), int(lengths.max())
        x = torch.randn(b, t_max, input_size)
        for i, n in enumerate(lengths):
            x[i, n:] = 100.0 + torch.randn(t_max - n, input_size)
        if loss_kind == "bce":
            target = (torch.rand(b, t_max, out) > 0.5).float()
        else:
            target = torch.randn(b, t_max, out)
        _, outputs, _, _ = model(x, lengths)
        y = model.linear(outputs)  # (b, t_max, out); padded steps are masked out below
        mask = (torch.arange(t_max)[None, :] < lengths[:, None]).float()[:, :, None]
        if loss_kind == "bce":
            per = nn.functional.binary_cross_entropy_with_logits(y, target, reduction="none")
        else:
            per = (y - target) ** 2
        loss = ((per * mask).sum(dim=(1, 2)) / (lengths.float() * out)).sum()
        loss.backward()
        t = {name: p.detach().clone() for name, p in model.state_dict().items()}
        t.update({"grad." + name: p.grad.clone() for name, p in model.named_parameters()})
        t.update({"input": x, "lengths": lengths.float(), "target": target,
                  "y": (y * mask).detach(), "loss": loss.detach().reshape(1)})
        equal = "_equal" if len(set(lengths.tolist())) == 1 else ""
        name = f"{kind}_l2_{'bi' if bi else 'uni'}_{loss_kind}{equal}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(HERE, "every_step", name))


def stateful():
    """Truncated backpropagation through time over streams cut into chunks; see the docstring."""
    os.makedirs(os.path.join(HERE, "stateful"), exist_ok=True)
    input_size, hidden, out, streams, window, chunks, lr = 2, 3, 2, 3, 4, 3, 0.1
    for kind, loss_kind in [("gru", "bce"), ("lstm", "mse"), ("rnn_tanh", "mse")]:
        model = Model(kind, input_size, hidden, 2, False, out)
        t = {"init." + k: v.detach().clone() for k, v in model.state_dict().items()}
        x = torch.randn(streams, window * chunks, input_size)
        if loss_kind == "bce":
            target = (torch.rand(streams, window * chunks, out) > 0.5).float()
        else:
            target = torch.randn(streams, window * chunks, out)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        state = None
        for j in range(chunks):
            xs = x[:, j * window:(j + 1) * window]
            ts = target[:, j * window:(j + 1) * window]
            outputs, state = model.rnn(xs, state)
            y = model.linear(outputs)
            if loss_kind == "bce":
                loss = nn.functional.binary_cross_entropy_with_logits(y, ts)
            else:
                loss = nn.functional.mse_loss(y, ts)
            opt.zero_grad()
            loss.backward()
            t.update({f"chunk{j}.grad.{n}": p.grad.clone() for n, p in model.named_parameters()})
            t[f"chunk{j}.loss"] = loss.detach().reshape(1)
            t[f"chunk{j}.y"] = y.detach().clone()
            if kind == "lstm":
                state = (state[0].detach(), state[1].detach())
                t[f"chunk{j}.h"], t[f"chunk{j}.c"] = state[0].clone(), state[1].clone()
            else:
                state = state.detach()
                t[f"chunk{j}.h"] = state.clone()
            opt.step()
        t.update({"final." + k: v.detach().clone() for k, v in model.state_dict().items()})
        t.update({"input": x, "target": target})
        name = f"{kind}_l2_{loss_kind}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(HERE, "stateful", name))


if __name__ == "__main__":
    cells()
    optim()
    plateau()
    tutorial_state_dict()
    heads()
    every_step()
    stateful()
