"""reproduce.py's report: the statistics of its paired design (per seed, then over seeds), the
verdicts against the paper's findings, results.md (report) and the figures. s_curve.py uses
the same statistics."""
import os
import statistics
import sys

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import win_rate
from logs import mean_se

# "equivalent": the 2-SE interval of a difference lies within ±5 points (stated in README)
MARGIN = 0.05


# -----------------------------------------------------------------------------
# Statistics of the paired design


def chat_wins(run):
    """Per held-out chat prompt: 1 / 0.5 / 0 as the trained model's greedy response beats / ties /
    loses to the seed model's on the same prompt, both scored by the same judge (eval.win_rate)."""
    after, before = run["after"]["chat"]["scores"], run["before"]["chat"]["scores"]
    return dict(zip(after, win_rate([after[i] for i in after], [before[i] for i in after])[0]))


def scores(run, metric):
    """{row id: score} of one run: "math" greedy, "math_sampled", or "chat_win"."""
    return chat_wins(run) if metric == "chat_win" else run["after"][metric]["scores"]


def summary(per_run):
    """(mean, SE) of an arm from each run's {row: score}: over runs when there are several, else
    over rows."""
    return mean_se([sum(x.values()) / len(x)
                    for x in per_run]) if len(per_run) > 1 else mean_se(list(per_run[0].values()))


def arm_summary(runs, metric):
    """(mean, SE): over seeds when there are several, else over held-out rows."""
    return summary([scores(r, metric) for r in runs])


def paired_scores(a, b):
    """A − B from two arms' {seed: {row: score}}: (mean, SE, SD over seeds or None, how): per seed,
    then over the shared seeds; with one shared seed, over the per-row differences on its rows."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    if len(shared) > 1:
        d = [sum(a[s][i] - b[s][i] for i in a[s]) / len(a[s]) for s in shared]
        return (*mean_se(d), statistics.stdev(d), f"{len(shared)} seeds")
    sa, sb = a[shared[0]], b[shared[0]]
    return (*mean_se([sa[i] - sb[i] for i in sa]), None, f"seed {shared[0]}, {len(sa)} rows")


def paired(runs_a, runs_b, metric):
    """A − B of a held-out metric: (mean, SE, how), as paired_scores."""
    shared = set(runs_a) & set(runs_b)
    p = paired_scores(*({s: scores(runs[s], metric) for s in shared} for runs in (runs_a, runs_b)))
    return p and (p[0], p[1], p[3])


def table3_arms(res):
    """Table 3's arms whose seed 0 was scored on chat too (online DPO seed 0 is only outside
    --quick)."""
    return [
        n for n in ("online_dpo", "chat_only", "math+chat")
        if 0 in res.get(n, {}) and "chat" in res[n][0]["after"]]


def verdict(d, se, expect):
    """expect ">": reproduced when d > 2 SE; "≈": equivalent when |d| + 2 SE < MARGIN, different
    when |d| > 2 SE (the paper's ≈ not seen); "≳": > or ≈."""
    if expect in (">", "≳") and d > 2 * se:
        return "reproduced"
    if expect in (">", "≳") and d < -2 * se:
        return "reversed"
    if abs(d) + 2 * se < MARGIN:
        return "equivalent (paper: >)" if expect == ">" else "equivalent"
    return "different" if expect == "≈" and abs(d) > 2 * se else "inconclusive"


def trend(runs, key):
    """(mean of the first quarter of steps, of the last quarter), averaged over seeds."""
    first, last = [], []
    for r in runs.values():
        xs = [x[key] for x in r["records"] if x.get(key) is not None]
        q = max(1, len(xs) // 4)
        first.append(sum(xs[:q]) / q)
        last.append(sum(xs[-q:]) / q)
    return sum(first) / len(first), sum(last) / len(last)


# -----------------------------------------------------------------------------
# Figures: mean ± SE over seeds


def figures(res, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax, name, key, label=None):
        if name not in res:
            return
        curves = [[x.get(key) for x in r["records"]] for r in res[name].values()]
        steps = range(1, min(map(len, curves)) + 1)
        ms = [mean_se([c[i] for c in curves if c[i] is not None]) for i in range(len(steps))]
        m, se = [x[0] for x in ms], [x[1] for x in ms]
        ax.plot(steps, m, label=f"{label or name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.fill_between(steps, [x - e for x, e in zip(m, se)], [x + e for x, e in zip(m, se)],
                        alpha=0.2)

    def panel(names, keys, title, path):
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8))
        for ax, (key, ylabel) in zip(axes, keys):
            for n in names:
                band(ax, n, key)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, path), dpi=110)
        plt.close(fig)
    s1, s2 = a.s_values
    panel(["online_dpo", "online_dpo_no_ref_sync"], [("length", "rollout length (tokens)"),
                                                     ("reward", "rollout reward")],
          "Fig. 2 analogue: online DPO with and "
          "without reference sync (mean ± SE)", "fig2_ref_sync.png")
    panel(
        ["offline", "iterative", f"semi_online_s{s1}", f"semi_online_s{s2}", "online_dpo", "grpo"],
        [("entropy", "rollout entropy (nats/token)"), ("length", "rollout length (tokens)")],
        "Fig. 3 analogue: entropy and length per regime (mean ± SE)", "fig3_regimes.png")
    names = [n for n in res if n not in ("chat_only",)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    for j, metric in enumerate(("math", "math_sampled")):
        ms = [arm_summary(list(res[n].values()), metric) for n in names]
        ax.bar([i + 0.4 * j for i in range(len(names))], [100 * m for m, _ in ms], 0.4,
               yerr=[200 * se for _, se in ms], capsize=3,
               label={"math": "greedy", "math_sampled": f"sampled (k={a.eval_samples})"}[metric])
        b = next(iter(res[names[0]].values()))["before"][metric]["mean"]
        ax.axhline(100 * b, ls=":", color=f"C{j}",
                   label=f"seed model, {'greedy' if j == 0 else 'sampled'}")
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (%), ± 2 SE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "fig_accuracy.png"), dpi=110)
    plt.close(fig)
    t3 = table3_arms(res)
    if t3:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for j, metric in enumerate(("math", "chat_win")):
            ms = [arm_summary([res[n][0]], metric) for n in t3]
            ax.bar([i + 0.4 * j for i in range(len(t3))], [100 * m for m, _ in ms], 0.4,
                   yerr=[200 * se for _, se in ms], capsize=3, label={
                       "math": "math held-out accuracy (greedy)",
                       "chat_win": "chat win rate vs seed model"
                   }[metric])
        ax.set_xticks([i + 0.2 for i in range(len(t3))], ["math only", "chat only",
                                                          "math + chat"][:len(t3)])
        ax.set_ylabel("%, ± 2 SE (seed 0)")
        ax.set_title("Table 3 analogue")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "fig_table3.png"), dpi=110)
        plt.close(fig)


# -----------------------------------------------------------------------------
# The report: per-arm table, paired differences, verdicts


def pct(m, se):
    """A mean ± SE of fractions, in percent."""
    return f"{100 * m:.1f} ± {100 * se:.1f}"


def report(res, a, commit):
    """results.md: the arms' table, the paired differences with their verdicts, the rollouts'
    length and entropy trends, and Table 3's analogue where its arms ran."""
    return "\n".join(arms_md(res, a, commit) + differences_md(res, a) + trends_md(res, a) +
                     table3_md(res)) + "\n"


def arms_md(res, a, commit):
    """The title, the sweep's settings, the seed model's scores and a row per arm."""
    # every arm starts from the same seed model
    b = next(iter(next(iter(res.values())).values()))["before"]
    L = [
        f"# reproduce.py sweep (runs at commit {commit})", "",
        f"{a.steps} optimizer steps per arm, {a.batch_prompts_note}; "
        f"held-out: {a.eval_problems} math problems "
        f"(greedy, and {a.eval_samples} samples each at the training temperature)" +
        (f", {a.chat_problems} chat prompts" if any(n in res
                                                    for n in ("chat_only", "math+chat")) else "") +
        ". "
        "Mean ± SE: over seeds where an arm has several, else over held-out rows.", "",
        f"Seed model: greedy {pct(b['math']['mean'], b['math']['se'])} %, sampled "
        f"{pct(b['math_sampled']['mean'], b['math_sampled']['se'])} % (SE over problems).", "",
        "| arm | seeds | greedy acc. (%) | sampled acc. "
        "(%) | rollout reward, first → last quarter | "
        "length | entropy | wall (s), mean |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in res.items():
        rv = list(runs.values())
        cells = [
            pct(*arm_summary(rv, m)) if m in rv[0]["after"] else ""
            for m in ("math", "math_sampled")]
        tr = ["{:.3g} → {:.3g}".format(*trend(runs, k)) for k in ("reward", "length", "entropy")]
        L.append(f"| {name} | {len(rv)} | {' | '.join(cells)} | {' | '.join(tr)} "
                 f"| {sum(r['wall_s'] for r in rv) / len(rv):.0f} |")
    return L


def differences_md(res, a):
    """Each finding as a paired difference of two arms, greedy and sampled, with its verdict."""
    s1, s2 = a.s_values
    semi = f"semi_online_s{s1}"
    comparisons = [
        ("a", f"{semi} − offline", semi, "offline", ">"),
        ("a", "online_dpo − offline", "online_dpo", "offline", ">"),
        ("a", f"{semi} − online_dpo", semi, "online_dpo", "≈"),
        ("a", f"semi_online_s{s2} − offline", f"semi_online_s{s2}", "offline", ">"),
        ("a", "iterative − offline", "iterative", "offline", ">"),
        ("b", "online_dpo − grpo", "online_dpo", "grpo", "≳"),
        ("c", "online_dpo (ref sync) − no ref sync", "online_dpo", "online_dpo_no_ref_sync", ">"),
        ("e", "group_dpo − online_dpo", "group_dpo", "online_dpo", "≈"),
        ("e", "group_dpo+grpo − online_dpo", "group_dpo+grpo", "online_dpo", "≈"),
        ("–", "online_dpo+entropy − online_dpo", "online_dpo+entropy", "online_dpo", "≈"),
        ("–", "online_dpo+nll − online_dpo", "online_dpo+nll", "online_dpo", "≈")]
    L = [
        "", "## Paired differences (percentage points)", "",
        f"Verdicts: **reproduced** = the paper's sign and |d| > 2 "
        f"SE; **equivalent** = |d| + 2 SE < {100 * MARGIN:.0f} "
        "points (the 2-SE interval inside the margin); **reversed** = "
        "the other sign beyond 2 SE; **different** = the paper's ≈ "
        "with |d| > 2 SE; else **inconclusive**. "
        "For ≳ (the paper's gap is within its noise) either > or ≈ reproduces it.", "",
        "| finding | difference | paper | greedy d ± SE | sampled "
        "d ± SE | paired over | verdict (greedy / sampled) |", "|---|---|---|---|---|---|---|"]
    for f, label, x, y, expect in comparisons:
        if x not in res or y not in res:
            continue
        g, sm = paired(res[x], res[y], "math"), paired(res[x], res[y], "math_sampled")
        if g is None:
            continue
        v = [verdict(d, se, expect) for d, se, _ in (g, sm)]
        L.append(f"| ({f}) | {label} | {expect} | {pct(*g[:2])} "
                 f"| {pct(*sm[:2])} | {g[2]} | {' / '.join(v)} |")
    return L


def trends_md(res, a):
    """(c) length collapse without πref sync and (d) entropy: the rollouts' first and last
    quarters."""
    s1, s2 = a.s_values
    semi = f"semi_online_s{s1}"
    L = ["", "## Rollout length and entropy, first → last quarter of steps (mean over seeds)", "",
          "| arm | length | entropy | entropy change |", "|---|---|---|---|"]
    for name in [
            n for n in ("offline", "iterative", semi, f"semi_online_s{s2}", "online_dpo", "grpo",
                        "online_dpo_no_ref_sync", "online_dpo+entropy") if n in res
    ]:
        (l0, l1), (e0, e1) = trend(res[name], "length"), trend(res[name], "entropy")
        L.append(f"| {name} | {l0:.1f} → {l1:.1f} | {e0:.3f} → "
                 f"{e1:.3f} | {100 * (e1 - e0) / e0:+.0f} % |")
    if "online_dpo_no_ref_sync" in res and "online_dpo" in res:
        (n0, n1), (_, y1) = trend(res["online_dpo_no_ref_sync"],
                                  "length"), trend(res["online_dpo"], "length")
        collapsed = n1 < 0.5 * n0 and n1 < y1
        L += [
            "", f"(c) length collapse without ref sync (last-quarter "
            f"rollout length < half its first quarter and below the "
            f"synced arm's): {n0:.1f} → {n1:.1f} tokens without sync, "
            f"{y1:.1f} with: **{'reproduced' if collapsed else 'not seen'}**."]
    regimes = [
        n for n in ("iterative", semi, f"semi_online_s{s2}", "online_dpo", "grpo") if n in res]
    if "offline" in res and regimes:
        change = {
            n: (lambda e: (e[1] - e[0]) / e[0])(trend(res[n], "entropy"))
            for n in regimes + ["offline"]}
        ok = all(change[n] < -0.10 for n in regimes) and abs(change["offline"]) < 0.10
        L += [
            f"(d) entropy falls by > 10 % in every regime that "
            f"samples from the trained model, offline within ±10 % "
            f"(its rollouts are the seed model's, so its logged entropy cannot "
            f"move): **{'reproduced' if ok else 'not in every regime'}** "
            f"({', '.join(f'{n} {100 * c:+.0f} %' for n, c in change.items())})."]
    return L


def table3_md(res):
    """Table 3's analogue (math only, chat only, both) and (f)'s differences, from seed 0."""
    t3, L = table3_arms(res), []
    if len(t3) == 3:
        L += [
            "", "## Table 3 analogue (seed 0; chat: greedy response "
            "vs the seed model's on the same prompt, same judge)", "",
            "| trained on | math held-out acc. "
            "(%) | chat win rate vs seed (%) |", "|---|---|---|"]
        for n, label in zip(t3, ("math only", "chat only", "math + chat")):
            L.append(f"| {label} | {pct(*arm_summary([res[n][0]], 'math'))} "
                     f"| {pct(*arm_summary([res[n][0]], 'chat_win'))} |")
        rows = [("math: math+chat − math only", "math+chat", "online_dpo", "math", "≳"),
                ("chat: math+chat − chat only", "math+chat", "chat_only", "chat_win", "≳"),
                ("math: math only − chat only (transfer)", "online_dpo", "chat_only", "math", ">"),
                ("chat: chat only − math only (transfer)", "chat_only", "online_dpo", "chat_win",
                 ">")]
        L += [
            "", "| (f) difference | paper | d ± "
            "SE (rows of seed 0) | verdict |", "|---|---|---|---|"]
        for label, x, y, metric, expect in rows:
            d, se, _ = paired({0: res[x][0]}, {0: res[y][0]}, metric)
            L.append(f"| {label} | {expect} | {pct(d, se)} | {verdict(d, se, expect)} |")
    return L


def quick_finding(res):
    """--quick's one question, online DPO − offline DPO on the held-out set, in words: the paper's
    strongest effect, or a plain statement that this run could not show it."""
    L, shown = ["## The quick look: online ≫ offline?", ""], []
    for metric, label in (("math", "greedy"), ("math_sampled", "sampled")):
        p = paired(res.get("online_dpo", {}), res.get("offline", {}), metric)
        if p:
            shown.append(verdict(p[0], p[1], ">") == "reproduced")
            L.append(f"- held-out {label}: online DPO − offline DPO = "
                     f"{100 * p[0]:+.1f} ± {100 * p[1]:.1f} points ({p[2]}): "
                     f"**{verdict(p[0], p[1], '>')}**")
    if not shown:
        L.append("- not yet measured: online DPO and offline DPO need a seed in common")
    elif not all(shown):
        L += [
            "", "This run does **not** show online ≫ offline beyond "
            "2 SE on both metrics: at this horizon the gap is "
            "within its noise here. The full design (s_curve.py, README) is what decides it."]
    return "\n".join(L) + "\n\n"
