"""``fastimp prune-scan DIR --level L``: the Fig. 5 experiment. At level L, prune a further
fraction f = 0.1 ... 0.9 of w^(L)'s weights with magnitude and with random pruning, retrain each
mask with the run's strategy (``run.retrain``), and record whether the result is matching
(Definition 2.2) and the distances R (the projection's ||w^(L) − m'⊙w^(L)|| and Appendix B's
||w^(L+1) − w^(L)||). The random results also give Appendix B's ε_train (train loss fitted
against test error, read at the dense error, minus w^(L)'s train loss). Plots them against the
theory curve of ``fastimp hessian`` at this level (and earlier levels in gray). Resumable: each
retraining is saved as it finishes."""
from __future__ import annotations

from pathlib import Path

DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def add_parser(sub):
    p = sub.add_parser("prune-scan", help="Fig. 5: scan pruning ratios at a level, retrain, "
                                          "compare with the Hessian theory", description=__doc__)
    p.add_argument("dir", help="IMP run folder")
    p.add_argument("--level", type=int, required=True, help="IMP level L")
    p.add_argument("--rewind-step", type=int, default=None, help="default: the run's first")
    p.add_argument("--replicate", type=int, default=0, help="replicate index (0..N-1)")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="comma-separated pruning ratios")
    p.add_argument("--methods", default="magnitude,random", help="magnitude and/or random")
    p.add_argument("--eps-matching", type=float, default=None,
                   help="matching tolerance (default: the run's, i.e. the std of the dense "
                        "replicates' test errors)")
    p.add_argument("--distance", choices=("projection", "retrained"), default="projection",
                   help="R on the plot's x axis: ||w^(L) - m'⊙w^(L)|| (Section 3.3) or "
                        "||w^(L+1) - w^(L)|| (Appendix B)")
    p.add_argument("--seed", type=int, default=0, help="random pruning seed")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's)")
    p.set_defaults(func=run)


def scan_path(run, level, tau, replicate) -> Path:
    name = f"level_{level}_rewind_{tau}_rep_{replicate}.json"
    return Path(run.analysis_dir) / "prune-scan" / name


def _dense_and_eps(r, tau, eps_matching):
    rows = [s for s in r.summary(eps=eps_matching) if s["rewind_step"] == tau]
    dense = [s for s in rows if s["level"] == 0]
    if not dense:
        raise ValueError(f"{r.dir}: no dense level (0) for rewind step {tau}")
    dense_error, eps = dense[0]["dense_error"], dense[0]["eps"]
    if eps is None:
        raise ValueError("--eps-matching: the run has one replicate, so its matching tolerance "
                         "is unknown; pass --eps-matching")
    return float(dense_error), float(eps)


def run(args) -> int:
    import torch

    from fastimp import theory
    from fastimp.imp import load_run
    from fastimp._io import load_json, save_json
    from fastimp.pruning import prune_magnitude, prune_random

    r = load_run(args.dir)
    tau = args.rewind_step if args.rewind_step is not None else r.rewind_steps[0]
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    if not ratios or any(not 0 < f < 1 for f in ratios):
        raise ValueError(f"--ratios: expected ratios in (0, 1), got {args.ratios!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("magnitude", "random") for m in methods):
        raise ValueError(f"--methods: expected magnitude and/or random, got {args.methods!r}")
    dense_error, eps_matching = _dense_and_eps(r, tau, args.eps_matching)
    solution = r.solution(args.level, rewind_step=tau, replicate=args.replicate)
    masks = r.mask(args.level, rewind_step=tau, replicate=args.replicate)
    level_stats = r.stats(args.level, rewind_step=tau, replicate=args.replicate)
    path = scan_path(r, args.level, tau, args.replicate)
    state = load_json(path) if path.exists() else {}
    done = {(e["method"], e["ratio"]): e for e in state.get("results", [])}
    weights = {n: solution[n].float() for n in masks}

    def distance(a, b):
        return float(sum((a[k].float() - b[k].float()).pow(2).sum() for k in a
                         if a[k].is_floating_point()) ** 0.5)

    results = list(done.values())
    params = {n for n, _ in r.build_model().named_parameters()}
    for method in methods:
        for f in ratios:
            if (method, f) in done:
                continue
            if method == "magnitude":
                new = prune_magnitude(weights, f, masks=masks)
            else:
                g = torch.Generator().manual_seed(args.seed * 1009 + int(round(f * 1000)))
                new = prune_random(weights, f, masks=masks, generator=g)
            R_proj = float(sum(float((w * (~new[n])).pow(2).sum())
                               for n, w in weights.items()) ** 0.5)
            trained, stats = r.retrain(new, rewind_step=tau, replicate=args.replicate,
                                       level=args.level, device=args.device)
            R_ret = distance({k: v for k, v in trained.items() if k in params},
                             {k: v for k, v in solution.items() if k in params})
            entry = {"method": method, "ratio": f, "R_projection": R_proj, "R_retrained": R_ret,
                     "test_error": stats["test_error"], "train_loss": stats.get("train_loss"),
                     "matching": bool(stats["test_error"] <= dense_error + eps_matching)}
            results.append(entry)
            print(f"{method:9s} f={f:.2f}: R={R_proj:.4g}, test error {entry['test_error']:.4f}"
                  f" -> {'matching' if entry['matching'] else 'not matching'}")
            state = {"level": args.level, "rewind_step": tau, "replicate": args.replicate,
                     "dense_error": dense_error, "eps_matching": eps_matching,
                     "results": results}
            save_json(state, path)                       # resumable after every retraining
    rand = [e for e in results if e["method"] == "random" and e.get("train_loss") is not None]
    eps_train = None
    if len(rand) >= 2 and len({e["test_error"] for e in rand}) >= 2 and \
            level_stats.get("train_loss") is not None:
        eps_train = theory.train_loss_epsilon_appendix_b([e["train_loss"] for e in rand],
                                                         [e["test_error"] for e in rand],
                                                         dense_error, level_stats["train_loss"])
    state = {"level": args.level, "rewind_step": tau, "replicate": args.replicate,
             "dense_error": dense_error, "eps_matching": eps_matching, "eps_train": eps_train,
             "distance": args.distance, "results": sorted(results, key=lambda e: (e["method"],
                                                                                   e["ratio"]))}
    save_json(state, path)
    png = path.with_suffix(".png")
    plot_scan(r, state, png, args.distance)
    print(f"eps_train (Appendix B) = {eps_train}; wrote {path} and {png}")
    return 0


def theory_curve(r, level, tau, replicate, eps=None):
    """(R, f_max) of level ``level`` from its ``fastimp hessian`` output, or None."""
    import numpy as np

    from fastimp import theory
    from fastimp.cli.hessian import out_dir
    from fastimp.hessian import SpectralDensity
    from fastimp._io import load_json
    d = out_dir(r, level, tau, replicate)
    if not (d / "hessian.json").exists():
        return None
    h = load_json(d / "hessian.json")
    if eps is None or not eps > 0:
        return np.asarray(h["curve"]["R"]), np.asarray(h["curve"]["f_max"])
    dens = SpectralDensity.load(d / h["density"])
    R = np.asarray(h["curve"]["R"])
    return R, theory.max_pruning_ratio(dens, eps, R, n_prunable=h["n_prunable_remaining"])


def plot_scan(r, state, path, distance="projection"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastimp.hessian.density import _save_fig
    level, tau, rep = state["level"], state["rewind_step"], state["replicate"]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for prev in range(level):
        c = theory_curve(r, prev, tau, rep)
        if c is not None:
            ax.plot(c[0], c[1], color="0.8", lw=1)
    c = theory_curve(r, level, tau, rep, state.get("eps_train"))
    if c is not None:
        ax.plot(c[0], c[1], "k-", lw=1.5, label="theory (Lemma 3.1)")
    key = "R_projection" if distance == "projection" else "R_retrained"
    styles = {("random", True): ("o", "tab:green", "random, matching"),
              ("random", False): ("x", "tab:red", "random, not matching"),
              ("magnitude", True): ("o", "tab:blue", "magnitude, matching"),
              ("magnitude", False): ("x", "tab:orange", "magnitude, not matching")}
    for (method, match), (marker, color, label) in styles.items():
        pts = [e for e in state["results"] if e["method"] == method and e["matching"] == match]
        if pts:
            ax.scatter([e[key] for e in pts], [e["ratio"] for e in pts], marker=marker,
                       color=color, label=label, facecolors="none" if marker == "o" else None)
    ax.set_xlabel("R = ||w(L) - m'⊙w(L)||" if distance == "projection"
                  else "R = ||w(L+1) - w(L)||")
    ax.set_ylabel("pruning ratio f")
    ax.set_ylim(0, 1)
    ax.set_title(f"level {level}: pruning-ratio scan")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
