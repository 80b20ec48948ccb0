"""bench.md from what bench.measure returned: the hardware and the equal-work rules, then one
markdown table per measurement that ran (render)."""


def steps_md(a, rows):
    """Ours vs TRL per step shape, and where our step's time goes."""
    lines = [
        "| step (prompts x n) | ours (s) | TRL (s) | ours "
        "steps/s ÷ TRL's | response tokens/step ours / TRL | "
        "ours tokens/s ÷ TRL's | trained pairs/groups ours / TRL | peak MB ours / TRL |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "trl_s" in r:
            speed = (r["ours_tok"] / r["ours_s"]) / (r["trl_tok"] / r["trl_s"])
            lines.append(f"| {r['what']} | {r['ours_s']:.2f} | {r['trl_s']:.2f} "
                         f"| **{r['trl_s'] / r['ours_s']:.2f}x** | "
                         f"{r['ours_tok']:.0f} / {r['trl_tok']:.0f} | {speed:.2f}x "
                         f"| {r['ours_trained']:.1f} / {r['trl_trained']} | "
                         f"{r['ours_mb']:.0f} / {r['trl_mb']:.0f} |")
            if not r["same_prompts"]:
                lines.append(f"| (TRL's prompts differed from ours at some "
                             f"step of {r['what']}: unequal work) |||||||| ")
        else:
            lines.append(f"| {r['what']} | {r['ours_s']:.2f} | n/a (TRL not "
                         f"installed) | - | {r['ours_tok']:.0f} / - | - | "
                         f"{r['ours_trained']:.1f} / - | {r['ours_mb']:.0f} / - |")
    lines += [
        "", "Where our step's time goes (seconds, mean of "
        "steps 2..; other = pairs/groups, logging):", "",
        "| step | total | generate | score | policy "
        "fwd+bwd | reference fwd | optimizer | other |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["time"]
        other = r["ours_s"] - sum(t.values())
        lines.append(f"| {r['what']} | {r['ours_s']:.2f} | {t['generate']:.2f} "
                     f"| {t['score']:.2f} | {t['policy']:.2f} | "
                     f"{t['ref']:.2f} | {t['optimizer']:.2f} | {max(0.0, other):.2f} |")
    return lines


def roofline_md(a, roof, rows):
    """The matmul roofline, and the fraction of it our rollouts and training passes reach."""
    flop = 2 * roof["params"]   # FLOPs per token of a forward pass
    lines = [
        f"Roofline: the best matmul on the model's shapes "
        f"reaches {roof['gflops_64']:.0f} GFLOP/s at 64 rows in "
        f"{a.rollout_dtype} (decode-like) and {roof['gflops_2048']:.0f} "
        f"GFLOP/s at 2048 rows in {a.train_dtype} "
        f"(training-like) on this machine, in this run. "
        f"A forward pass costs 2N = {flop / 1e9:.2f} GFLOP per "
        f"token (N = {roof['params'] / 1e6:.0f}M parameters), "
        f"forward + backward 6N.", ""]
    for r in rows:
        t = r["time"]
        gen_f = r["ours_tok"] / max(t["generate"], 1e-9) * flop / 1e9
        # only the trained pairs/groups go through
        trained_tok = r["ours_tok"] * r["ours_trained"] / r["prompts"]
        train_f = trained_tok / max(t["policy"], 1e-9) * 3 * flop / 1e9
        lines.append(f"- {r['what']}: rollout {gen_f:.1f} GFLOP/s = "
                     f"{gen_f / roof['gflops_64']:.0%} of the 64-row roofline; "
                     f"training (trained response tokens only) {train_f:.1f} GFLOP/s "
                     f"= {train_f / roof['gflops_2048']:.0%} of the 2048-row one.")
    return lines


def md_table(head, rows):
    """A markdown table: a header row and rows of cells (strings)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)
            ] + ["| " + " | ".join(r) + " |" for r in rows]


def decode_md(a, dec):
    """The decode step against the memory-bandwidth roofline (the right ceiling for a few rows)."""
    lines = [
        f"Decode against memory bandwidth: this machine reads "
        f"{dec['bandwidth_gbs']:.1f} GB/s in {a.rollout_dtype} (best of a "
        f"512 MB reduction and 8-row matmuls streaming a 256 MB matrix "
        f"as x @ W and as W @ xᵀ, this run). A decode step reads "
        f"every weight once ({dec['weights_mb']:.0f} MB) plus the "
        f"KV cache; no row stops, {a.temperature} temperature, our "
        "engine's full step (sampling, log-probs and entropy "
        "included), with decode.py's step and with the HF forward; "
        "decode.py with each of its matmul forms pinned, and with "
        "the plan auto measured here for that many rows ("
        f"{'; '.join(f'{r}: {p}' for r, p in dec.get('plan', {}).items())}; mkl packed "
        "for the largest row count of its part, a pinned mkl for that many rows); "
        "'matmuls only': the step's weight matmuls alone in that "
        "form, nothing between them, the ceiling of a step built "
        "on it.", ""]
    rows = [(rows, path, f"{1e3 * r['step_s']:.1f}", f"{r['bytes_mb']:.0f}", f"{r['gbs']:.1f}",
             f"**{r['fraction']:.0%}**", f"{by['hf']['step_s'] / r['step_s']:.2f}x")
            for rows, by in dec["rows"].items() for path, r in by.items()]
    return lines + md_table(("rows", "step", "step (ms)", "bytes read per step (MB)", "GB/s",
                             "fraction of the bandwidth", "speed vs HF forward"), rows)


def s_sweep_md(a, s_rows):
    """The cost of a step as a function of s, at equal work."""
    base = s_rows[0]["total_s"]
    return [
        f"DPO, n={a.n}, {a.batch_prompts} prompts, {a.s_steps} "
        f"optimizer steps per row (same prompts, same work):", ""
    ] + md_table(("s", "total (s)", "time ÷ s=1", "of which generation (s)", "optimizer steps/s",
                  "rollouts/s", "peak MB"),
                 [(r["s"], f"{r['total_s']:.1f}", f"{r['total_s'] / base:.2f}", f"{r['gen_s']:.1f}",
                   f"{r['steps_per_s']:.3f}", f"{r['rollouts_per_s']:.1f}", f"{r['peak_mb']:.0f}")
                  for r in s_rows])


def generate_md(a, gen):
    return [
        f"Rollout throughput, {a.batch_prompts * a.n} sequences in "
        f"one batch: our engine {gen['ours_tok_s']:.0f} tok/s, "
        f"plain `generate` {gen['plain_tok_s']:.0f} tok/s (ratio "
        f"{gen['ours_tok_s'] / gen['plain_tok_s']:.2f}); "
        f"our engine on {8 * a.batch_prompts * a.n} "
        f"sequences at once (what s=8 generates per sync): "
        f"{gen['ours_8x_tok_s']:.0f} tok/s ({gen['ours_8x_tok_s'] / gen['ours_tok_s']:.2f}x)."]


def engines_md(a, eng_rows):
    return [
        f"Rollout engines, {a.batch_prompts} prompts x {a.n} "
        f"samples, T={a.temperature}; each in a fresh process. "
        "Mismatch: |log μ − log πθ| of the sampled "
        "tokens against the fp32 trainer (nats).", ""
    ] + md_table(("engine", "start-up (s)", "tokens/s", "sync (s)", "mismatch mean", "mismatch max",
                  "peak MB"),
                 [(r["engine"], f"{r['startup_s']:.1f}", f"{r['tok_s']:.0f}", f"{r['sync_s']:.2f}",
                   f"{r['mismatch_mean']:.2g}", f"{r['mismatch_max']:.2g}", f"{r['peak_mb']:.0f}")
                  for r in eng_rows])


def logps_md(a, lp):
    return [
        f"Log-probs of one training pass (forward + backward, "
        f"{a.train_dtype}) on a vocabulary of {lp['vocab']}: {lp['rows']} "
        f"responses x {lp['tokens']} tokens, whose logits "
        f"are {lp['logits_mb_fp32']:.0f} MB in fp32: peak "
        f"{lp['peak_mb']:.0f} MB ({lp['peak_mb'] - lp['base_mb']:.0f} "
        f"MB above the model and inputs), {lp['seconds']:.1f} s."]


def render(a, env, m):
    """bench.md: the hardware and the equal-work rules, then one table per measurement that ran."""
    lines = [
        f"Hardware: {env}. Model {a.model}; {a.max_new_tokens} "
        f"new tokens, T={a.temperature}, lr {a.lr} on both "
        f"sides; median step time over steps 2..{a.steps}; tokens: "
        f"mean response tokens per step (steps 2..{a.steps}). "
        f"TRL reads our training prompts in our order, unshuffled: "
        f"both sides answer the same prompts at every step "
        f"(checked per step from the prompts TRL's reward function receives).", ""]
    for ok, section in ((m["steps"], lambda: steps_md(a, m["steps"])),
                        (m["roofline"], lambda: roofline_md(a, m["roofline"], m["steps"])),
                        (m["decode"], lambda: decode_md(a, m["decode"])),
                        (m["s"], lambda: s_sweep_md(a, m["s"])),
                        (m["generate"], lambda: generate_md(a, m["generate"])),
                        (m["engines"],
                         lambda: engines_md(a, m["engines"])), (m["logps"],
                                                                lambda: logps_md(a, m["logps"]))):
        if ok:
            lines += section() + [""]
    return "\n".join(lines)
