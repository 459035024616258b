"""The HTML reports of each command, assembled from ``teacherfit.report`` pieces."""

from __future__ import annotations

from typing import Any

from teacherfit import report as R

TEACHER_COLUMNS = ["teacher", "n", "car", "car_low", "car_high", "reward", "loss_student", "grape", "grace", "length",
                   "ppl_student", "ifd_student", "ppl_ref", "ifd_ref", "reward_2", "car_2", "truncated", "empty"]


def _clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters (escaping is the table's job)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


def rank_report(results: dict[str, Any], samples: list[dict],
                texts: dict[tuple[str, str], tuple[str, str]] | None = None) -> R.Report:
    teachers = results["teachers"]
    pick = results.get("recommendation") or {}
    rep = R.Report("teacherfit rank", f"{len(teachers)} teachers, {results['n_instructions']} instructions, "
                                      f"student {results['student'].get('model')}")
    if pick:
        rep.add_heading("Which teacher to use")
        rep.add_verdict(pick["text"][0].upper() + pick["text"][1:] + ".", good=bool(pick["supported"]))
        if pick.get("beta_is_default"):
            rep.add_note(f"beta = {results['beta']} is the uncalibrated default: CAR's trade-off between reward and "
                         "student loss is a placeholder. Calibrate it with `teacherfit correlate` on teachers whose "
                         "outcome you know (or a `teacherfit study`) before trusting a close call.")
        rep.add_paragraph("Next:")
        rep.add_code("\n".join(pick.get("next", [])))
    rep.add_heading("Teachers, best CAR first")
    rep.add_table(teachers, _measured(teachers, ["teacher", "n", "car", "car_low", "car_high", "p_best"]
                                      + TEACHER_COLUMNS[5:]),
                  caption="Per-teacher means; CAR with its 95% bootstrap interval; P(best): share of paired bootstrap "
                          "resamples of the instructions in which the teacher has the highest CAR; GRAPE: share of "
                          "instructions where the student finds this teacher's response the most likely per token; "
                          "GRACE: the gradient-based score (lower is better); reward_2, car_2: under the second reward")
    rep.add_image(R.plot_metric_with_ci(teachers, "car", title="CAR per teacher (95% bootstrap interval)",
                                        ylabel="CAR"), alt="CAR per teacher")
    rep.add_image(R.plot_metric_with_ci(teachers, "reward", title="Reward per teacher", ylabel="reward"),
                  alt="reward per teacher")
    rep.add_image(R.plot_reward_vs_loss(teachers, results["beta"], title="Reward against student loss, iso-CAR curves"),
                  alt="reward against student loss")
    rep.add_heading("Per-sample scores")
    shown = _first_instructions(samples, 20)
    rows = []
    for s in shown:
        instruction, response = (texts or {}).get((s["teacher"], s["id"]), ("", ""))
        rows.append({**s, "instruction": _clip(instruction, 160), "response": _clip(response, 240)})
    rep.add_paragraph(f"The responses of every teacher to the first {len({s['id'] for s in shown})} instructions, side "
                      "by side (text shortened); every (instruction, teacher) row is in per_sample.parquet.")
    rep.add_table(rows, _measured(rows, ["id", "instruction", "teacher", "response", "reward", "loss_student", "car",
                                         "length", "ifd_student", "ifd_ref"]), caption="Per-sample scores", wide=True)
    rep.add_heading("How this was computed")
    for note in results["notes"]:
        rep.add_note(note)
    rep.add_provenance({
        "CAR": {"formula": "reward / (1 + beta * student loss)", "beta": results["beta"],
                "variant": results["car_variant"]},
        "student": results["student"],
        "reference LM": results["reference_lm"] or {"model": "none"},
        "reward": results["reward"],
        "response sets": results.get("response_sets", {}),
    })
    return rep


def _measured(rows: list[dict], columns: list[str]) -> list[str]:
    """The columns some row has a value for: a stage that did not run (no reference LM) leaves no empty column."""
    def has(value) -> bool:
        return value is not None and not (isinstance(value, float) and value != value)

    return [c for c in columns if any(has(r.get(c)) for r in rows)]


def _first_instructions(samples: list[dict], limit: int) -> list[dict]:
    """All teachers' rows of the first instructions (in the samples' order), at most ``limit`` rows."""
    order = list(dict.fromkeys(s["id"] for s in samples))
    teachers = max(1, len({s["teacher"] for s in samples}))
    keep = set(order[: max(1, limit // teachers)])
    return sorted((s for s in samples if s["id"] in keep), key=lambda s: (order.index(s["id"]), s["teacher"]))


def correlate_report(result: dict[str, Any]) -> R.Report:
    rep = R.Report("teacherfit correlate", f"{result['n_teachers']} teachers; outcome: {result['outcome_source']}")
    rep.add_heading("How well each metric predicted the outcome")
    rep.add_table(result["correlations"], ["metric", "spearman", "spearman_low", "spearman_high", "kendall", "n"],
                  caption="Spearman and Kendall correlation with the outcome (95% bootstrap interval)")
    rep.add_image(R.plot_correlations(result["correlations"], title="Spearman's rho with the outcome"),
                  alt="correlations")
    loo = result.get("beta_calibration")
    if loo:
        rep.add_heading("beta calibrated by leave-one-out")
        rep.add_kv({"beta on all teachers": loo["beta_full"], "beta per held-out teacher": loo["betas_loo"],
                    "Spearman of leave-one-out CAR": loo["corr_loo"]})
    rep.add_heading("The paper's Table 4 (Spearman rho with AP), for comparison")
    rep.add_table([{"base model": k, **v} for k, v in result["paper_table4"].items()],
                  caption="Xu et al. 2024, Table 4")
    return rep


def distill_report(summary: dict[str, Any], log: list[dict]) -> R.Report:
    rep = R.Report("teacherfit distill", f"{summary['steps']} optimizer steps, student {summary['student'].get('model')}")
    rep.add_kv({"student": summary["student"], "student layers": summary["student_layers"],
                "teacher": summary["teacher"] or "none (sequence-level KD)", "layer map": summary["layer_map"] or "-",
                "examples": summary["examples"], "final": summary["final"]})
    for note in summary["notes"]:
        rep.add_note(note)
    if log:
        steps = [r["step"] for r in log]
        series = {name: (steps, [r[name] for r in log]) for name in ("loss", "ce", "kd", "attn")
                  if any(r[name] for r in log)}
        rep.add_image(R.plot_lines(series, title="Training losses", xlabel="optimizer step", ylabel="loss"),
                      alt="loss curves")
        rep.add_image(R.plot_lines({"lr": (steps, [r["lr"] for r in log])}, title="Learning rate",
                                   xlabel="optimizer step", ylabel="lr"), alt="learning rate")
        rollouts = [r for r in log if "on_policy" in r]
        if rollouts:
            rep.add_note(on_policy_advice(rollouts))
        rep.add_table(log[-10:], ["step", "loss", "ce", "kd", "attn", "lr", "grad_norm", "tokens"]
                      + (["on_policy", "rollout_tokens", "rollout_s", "rollout_age"] if rollouts else [])
                      + (["unscored_tokens"] if any("unscored_tokens" in r for r in log) else []),
                      caption="Last logged steps")
    return rep


def on_policy_advice(rows: list[dict]) -> str:
    """What the student's sampling cost, and what to change when it dominates the run."""
    generate = sum(r["rollout_s"] for r in rows)
    share = generate / max(rows[-1]["elapsed_s"], 1e-9)  # elapsed_s: this session's time (a resume restarts it)
    tokens = sum(r["rollout_tokens"] for r in rows)  # each step's rows were sampled once
    mean_share = sum(r["on_policy"] for r in rows) / len(rows)
    text = (f"On-policy: {mean_share:.0%} of rows sampled by the student, {tokens} tokens generated in {generate:.1f} s "
            f"({share:.0%} of the run's time), rollouts at most {max(r['rollout_age'] for r in rows)} steps old.")
    if share > 0.5:
        text += (" Sampling dominates: raise rollout.buffer_steps (fewer, larger generate calls), lower "
                 "rollout.max_new_tokens, or sample with vLLM (rollout.engine vllm on a GPU, or openai with a server).")
    return text


def _interval(value: float, low: float, high: float) -> str:
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def evaluate_report(results: dict[str, Any], mtbench_rows: list[dict], pair_items: list[dict]) -> R.Report:
    judge = results["judge"]
    rep = R.Report("teacherfit evaluate", f"student {results['student'].get('model') or results['student'].get('name')}, "
                                          f"judge {judge.get('model') or judge['id']}")
    rep.add_kv({"student": results["student"], "judge": judge, "judge prompts": results["judge_prompts"],
                "judgments": results["judgments"]})
    for note in results["notes"]:
        rep.add_note(note)
    signals = []
    if "mtbench" in results:
        o = results["mtbench"]["overall"]
        signals.append({"signal": "MT-Bench score (1-10)", "value": o["score"], "low": o["low"], "high": o["high"],
                        "n": o["n"], "unparsed": o["unparsed"]})
    if "pairwise" in results:
        pw = results["pairwise"]
        signals.append({"signal": "win rate vs reference", **{k: pw["win_rate"][k] for k in ("low", "high", "n")},
                        "value": pw["win_rate"]["win_rate"], "unparsed": pw["unparsed_items"]})
        signals.append({"signal": "length-controlled win rate", "value": pw["lc_win_rate"]["lc_win_rate"],
                        "low": pw["lc_win_rate"]["low"], "high": pw["lc_win_rate"]["high"],
                        "n": pw["lc_win_rate"]["n"], "unparsed": pw["unparsed_items"]})
    if "reward_win_rate" in results:
        rw = results["reward_win_rate"]
        signals.append({"signal": "reward-model win rate", "value": rw["win_rate"], "low": rw["low"],
                        "high": rw["high"], "n": rw["n"], "unparsed": rw["unparsed"]})
    if "heldout_loss" in results:
        ho = results["heldout_loss"]
        signals.append({"signal": "held-out loss (nats/token)", "value": ho["mean"], "low": ho["low"],
                        "high": ho["high"], "n": ho["n"], "unparsed": 0})
    rep.add_heading("Summary")
    rep.add_table(signals, ["signal", "value", "low", "high", "n", "unparsed"],
                  caption="Every signal with its 95% bootstrap interval; unparsed judgments are counted, never scored")

    if "mtbench" in results:
        mt = results["mtbench"]
        rep.add_heading("MT-Bench")
        rep.add_paragraph(f"{mt['questions']} questions from {mt['source']}; single-answer grading 1-10, turn 2 judged "
                          f"with the whole conversation; of these, {mt['reference_guided']} (math, reasoning, coding) "
                          "graded against reference answers.")
        cats = mt["categories"]
        rep.add_table(cats + [{"category": "overall", **mt["overall"]}],
                      ["category", "score", "turn1", "turn2", "n", "unparsed"], caption="MT-Bench score per category")
        rep.add_image(R.plot_grouped_bars([c["category"] for c in cats],
                                          {"turn 1": [c["turn1"] for c in cats], "turn 2": [c["turn2"] for c in cats],
                                           "mean": [c["score"] for c in cats]},
                                          title="MT-Bench score per category", ylabel="score (1-10)", ylim=(0, 10)),
                      alt="MT-Bench score per category")
        rep.add_table(mtbench_rows[:16], ["item", "category", "turn", "prompt", "verdict", "status", "output"],
                      caption="Judgments (first 16; all in mtbench.parquet and judgments.jsonl)")

    if "pairwise" in results:
        pw = results["pairwise"]
        rep.add_heading("Pairwise win rate against the reference")
        rep.add_paragraph(
            "Each pair is judged twice, the student as assistant A and then as B. An item counts 1 when the student "
            "wins in both orders, 0 when it loses in both, 0.5 otherwise. The length-controlled win rate fits "
            "p(win) = sigmoid(theta + phi * tanh(d / sd(d))), d = student minus reference length in characters, and "
            "reports sigmoid(theta): the win rate at equal length (AlpacaEval 2).")
        rows = [{"metric": "win rate", "value": _interval(pw["win_rate"]["win_rate"], pw["win_rate"]["low"], pw["win_rate"]["high"])},
                {"metric": "length-controlled win rate",
                 "value": _interval(pw["lc_win_rate"]["lc_win_rate"], pw["lc_win_rate"]["low"], pw["lc_win_rate"]["high"])},
                {"metric": "wins / ties / losses",
                 "value": f"{pw['win_rate']['wins']} / {pw['win_rate']['ties']} / {pw['win_rate']['losses']}"},
                {"metric": "length coefficient phi", "value": f"{pw['lc_win_rate']['phi']:.3f}"},
                {"metric": "mean length difference (chars)", "value": f"{pw['mean_length_diff']:.1f}"},
                {"metric": "same outcome in both orders", "value": f"{pw['order_consistency']:.3f}"},
                {"metric": "verdicts for the first position (A)", "value": f"{pw['first_position_rate']:.3f}"},
                {"metric": "items / unparsed items", "value": f"{pw['items']} / {pw['unparsed_items']}"}]
        if "reward_win_rate" in results:
            rw = results["reward_win_rate"]
            rows.append({"metric": "reward-model win rate", "value": _interval(rw["win_rate"], rw["low"], rw["high"])})
        rep.add_table(rows, ["metric", "value"], caption="Win rates with 95% bootstrap intervals")
        rep.add_image(R.plot_grouped_bars(["win rate", "LC win rate"] + (["reward win rate"] if "reward_win_rate" in results else []),
                                          {"student vs reference": [pw["win_rate"]["win_rate"], pw["lc_win_rate"]["lc_win_rate"]]
                                           + ([results["reward_win_rate"]["win_rate"]] if "reward_win_rate" in results else [])},
                                          title="Win rates against the reference", ylabel="win rate", ylim=(0, 1)),
                      alt="win rates")
        rep.add_table(pair_items[:20], ["id", "category", "verdict_ab", "verdict_ba", "outcome", "student_chars",
                                        "reference_chars"], caption="Pairwise items (first 20; all in pairwise.parquet)")
    return rep


STUDY_METRICS = ["car", "reward", "grape", "grace", "length", "loss_student", "ppl_student", "ifd_student", "ppl_ref",
                 "ifd_ref", "reward_2", "car_2"]


def study_report(results: dict[str, Any]) -> R.Report:
    students = results["students"]
    outcome = results["outcome"]
    rep = R.Report("teacherfit study", f"{len(results['teacher_settings'])} teacher settings, {len(students)} student"
                                       f"{'s' if len(students) > 1 else ''}, outcome: {outcome}")
    rep.add_heading("Which metric to trust")
    for answer in results["answers"]:
        rep.add_verdict(answer["text"][0].upper() + answer["text"][1:] + ".", good=bool(answer.get("significant")))
    rep.add_table(_regret_rows(results), _regret_columns(results),
                  caption="Per metric: Spearman's rho with the outcome (oriented: positive = agreed), whether it passes "
                          "the two-sided 5% threshold for this many teachers, the teacher the metric would pick, and its "
                          "regret (outcome of the best teacher minus outcome of the pick; 0 = it found the best)")
    for st in students:
        label = st["student_spec"]
        noise, mixtures = st.get("noise"), st.get("mixtures") or []
        if noise:
            enough = noise["ratio"] < 0.5 if noise["ratio"] == noise["ratio"] else False
            rep.add_verdict(f"{label}: outcome noise across training seeds (sd {noise['seed_sd']:.3g}) is "
                            f"{noise['ratio']:.2f}x its spread across teachers (sd {noise['teacher_sd']:.3g}): "
                            + ("the fine-tunes tell teachers apart" if enough else
                               "the fine-tunes are too noisy to tell most teachers apart"), good=enough)
        for mx in mixtures:
            rep.add_verdict(f"{label}: the {mx['rule']} mixture scored {mx['outcome']:.3g} against the best single "
                            f"teacher {mx['best_teacher']}'s {mx['best_outcome']:.3g} (rank {mx['rank_among_teachers']} "
                            f"among the teachers)", good=bool(mx["beats_best"]))
    if results.get("pooled"):
        rep.add_table(results["pooled"]["rows"], ["metric", "spearman", "spearman_low", "spearman_high", "kendall",
                                                  "kendall_low", "kendall_high", "mean_regret"],
                      caption="Pooled over the students: mean Spearman's rho and Kendall's tau (95% intervals resampling "
                              "teachers, the same for every student) and mean regret")
    rep.add_paragraph(
        "The CAR paper's experiment at this scale: each teacher's responses are scored with every rank metric, the "
        "student is fine-tuned on each teacher's responses with the same budget (sequence-level KD: cross-entropy on "
        "the responses), each fine-tuned student is evaluated, and each metric's ranking of the teachers is compared "
        "with the ranking by outcome. Metrics are oriented so that a positive correlation means the metric agreed "
        "(lower loss, perplexity, IFD and GRACE are negated).")
    rep.add_heading("Teacher settings")
    rep.add_table(results["teacher_settings"], ["teacher", "backend", "model", "decoding"])
    for st in students:
        _student_section(rep, st, several=len(students) > 1)
    rep.add_heading("Stages")
    rep.add_table([{"stage": k, **v} for k, v in results["stages"].items()], ["stage", "seconds", "skipped"],
                  caption=f"Wall time per stage (for a skipped stage: when it ran); total {results['seconds']:.0f} s")
    return rep


def _regret_rows(results: dict[str, Any]) -> list[dict]:
    rows: dict[str, dict] = {}
    for k, st in enumerate(results["students"]):
        for r in st["trust"]["rows"]:
            row = rows.setdefault(r["metric"], {"metric": r["metric"]})
            row.update({f"rho {k}": r["spearman"], f"sig {k}": "yes" if r["significant"] else "no",
                        f"pick {k}": r["pick"], f"regret {k}": r["regret"]})
    for r in (results.get("pooled") or {}).get("rows", []):
        rows[r["metric"]].update({"rho pooled": r["spearman"], "mean regret": r["mean_regret"]})
    return list(rows.values())


def _regret_columns(results: dict[str, Any]) -> list[str]:
    cols = ["metric"]
    for k in range(len(results["students"])):
        cols += [f"rho {k}", f"sig {k}", f"pick {k}", f"regret {k}"]
    return cols + (["rho pooled", "mean regret"] if results.get("pooled") else [])


def _student_section(rep: R.Report, st: dict[str, Any], *, several: bool) -> None:
    outcome, teachers, corr = st["outcome"], st["teachers"], st["correlations"]
    label = st["student_spec"]
    rep.add_heading(f"Student {label}" if several else "Student")
    rep.add_kv({
        "student": st["student"], "reference LM": st["reference_lm"] or "none", "judges": st["judges"],
        "CAR": f"reward / (1 + beta * student loss), beta = {st['beta']}, variant: {st['car_variant']}",
        "GRACE": st.get("grace") or "not computed",
        "instructions": st["instructions"], "fine-tune (every arm)": st["finetune"], "evaluation": st["evaluation"],
        "outcome": f"{outcome} (heldout_loss is negated: higher = better)",
    })
    for note in st["notes"]:
        rep.add_note(note)
    cols = ["teacher", "outcome", "outcome_low", "outcome_high", "outcome_rank"] + STUDY_METRICS + [
        c for c in teachers[0] if c.startswith("outcome_") and c not in ("outcome_low", "outcome_high", "outcome_rank")
    ] + ["finetune_steps", "finetune_final_loss"]
    rep.add_table(teachers, cols, caption=f"Rank metrics (training split) and evaluated outcomes; outcome = {outcome}")
    if st.get("arms"):
        rep.add_table(st["arms"], ["arm", "outcome", "finetune_steps"],
                      caption="Fine-tunes beside the single teachers: seed repeats (noise) and per-instruction mixtures")
    if st.get("baseline"):
        rep.add_table([{"student": "untuned (context, not correlated)", **st["baseline"]}],
                      caption="The untuned student evaluated the same way")
    rep.add_image(R.plot_metric_with_ci(teachers, "outcome", title=f"{outcome} of {label} fine-tuned on each teacher",
                                        ylabel=outcome), alt="outcome per teacher")
    if "correlations" in corr:
        rep.add_table(corr["correlations"], ["metric", "spearman", "spearman_low", "spearman_high", "kendall",
                                             "kendall_low", "kendall_high", "n"],
                      caption=f"Spearman and Kendall correlation with {outcome} over {corr['n_teachers']} teachers "
                              f"(95% bootstrap intervals; significant at 5% from |rho| >= "
                              f"{st['trust']['critical_spearman']:.2f}, |tau| >= {st['trust']['critical_kendall']:.2f})")
        rep.add_image(R.plot_correlations(corr["correlations"], title=f"Spearman's rho with {outcome} (95% bootstrap CI)"),
                      alt="correlations")
        cvr = st["trust"].get("car_vs_reward")
        if cvr:
            rep.add_paragraph(f"CAR against reward alone: Spearman of CAR minus Spearman of the reward = "
                              f"{cvr['difference']:.3f}, 95% interval [{cvr['low']:.3f}, {cvr['high']:.3f}] (paired "
                              "bootstrap over teachers: both correlations on the same resampled teachers).")
        loo = corr.get("beta_calibration") or {}
        if loo:
            rep.add_kv({"beta on all teachers": loo.get("beta_full"), "beta per held-out teacher": loo.get("betas_loo"),
                        "Spearman of leave-one-out CAR": loo.get("corr_loo"), "CAR variant": loo.get("variant")})
    else:
        rep.add_note(f"no correlation: {corr.get('error')}")
    rep.add_image(R.plot_metric_scatter(teachers, STUDY_METRICS, "outcome", title=f"Each metric against {outcome}"),
                  alt="metric against outcome")
    others = {k: v for k, v in st["correlations_by_outcome"].items() if isinstance(v, list)}
    if others:
        rows = [{"metric": m, **{k: next((r["spearman"] for r in v if r["metric"] == m), None) for k, v in others.items()}}
                for m in STUDY_METRICS]
        rep.add_table(rows, ["metric", *others], caption="Spearman's rho of each metric with every evaluated signal")
    if st.get("noise"):
        rep.add_table(st["noise"]["rows"], ["teacher", "seed_a", "outcome_a", "seed_b", "outcome_b", "abs_difference"],
                      caption="The same teacher fine-tuned with two training seeds")
    if st["pairs"]:
        rep.add_paragraph("Larger versus smaller teachers of one family: did the larger teacher give the better "
                          "student, and did each metric prefer the teacher that did (right / wrong)?")
        rep.add_table(st["pairs"], ["family", "larger", "smaller", "outcome_larger", "outcome_smaller",
                                    "better_student_from"] + STUDY_METRICS, caption="Larger-versus-smaller pairs")
    if st["table4"]:
        rep.add_paragraph("Next to the paper's Table 4 (Spearman rho with AP over 19 open teachers, five base models). "
                          "'consistent': the paper's mean lies inside our 95% interval; 'differs': it does not.")
        rep.add_table(st["table4"], ["metric", "paper column", "rho (ours)", "low", "high", "kendall (ours)",
                                     "rho (paper mean)", "paper min", "paper max", "verdict"],
                      caption="Our correlations next to the paper's")
