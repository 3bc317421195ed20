"""fastimp.MaskedSGD dropped into a plain PyTorch training loop (runs on a CPU in seconds).

A small MLP learns a synthetic task; after a first training phase the 80 % smallest-magnitude
weights of every Linear layer are pruned and training continues with MaskedSGD, which keeps the
pruned weights (and their momentum) at exactly 0 without any extra code in the loop.

    python examples/masked_sgd_loop.py
"""
import torch
from torch import nn

import fastimp
from fastimp._backend import resolve_name


def batches(gen, n_steps, batch=128, dim=20):
    w_true = torch.randn(dim, generator=gen)
    for _ in range(n_steps):
        x = torch.randn(batch, dim, generator=gen)
        yield x, (x @ w_true > 0).long()


def train(model, opt, sched, gen, steps):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches(gen, steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()            # torch.optim.SGD's step, then p = m ? p : 0, buf = m ? buf : 0
        sched.step()
    return loss.item()


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 2))
    opt = fastimp.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=600)
    loss = train(model, opt, sched, torch.Generator().manual_seed(1), 300)
    print(f"dense:  loss {loss:.4f}")

    # prune 80 % of each Linear weight by magnitude, keep training under the masks
    masks = {}
    for m in model:
        if isinstance(m, nn.Linear):
            k = int(0.8 * m.weight.numel())
            thresh = m.weight.detach().abs().flatten().kthvalue(k).values
            masks[m.weight] = m.weight.detach().abs() > thresh
    opt.set_masks(masks)
    loss = train(model, opt, sched, torch.Generator().manual_seed(2), 300)
    pruned_zero = all(bool((p[~m] == 0).all()) for p, m in opt.masks.items())
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(f"sparse: loss {loss:.4f}, density {density:.2f}, pruned weights exactly 0: {pruned_zero}")
    print("backend:", resolve_name("masked_sgd", "auto", "cpu"))


if __name__ == "__main__":
    main()
