"""The HTML reports of each command, assembled from ``teacherfit.report`` pieces."""

from __future__ import annotations

from typing import Any

from teacherfit import report as R

TEACHER_COLUMNS = ["teacher", "n", "car", "car_low", "car_high", "reward", "loss_student", "length",
                   "ppl_student", "ifd_student", "ppl_ref", "ifd_ref", "truncated", "empty"]


def rank_report(results: dict[str, Any], samples: list[dict]) -> R.Report:
    teachers = results["teachers"]
    rep = R.Report("teacherfit rank", f"{len(teachers)} teachers, {results['n_instructions']} instructions, "
                                      f"student {results['student'].get('model')}")
    rep.add_kv({
        "CAR": f"reward / (1 + beta * student loss), beta = {results['beta']}, variant: {results['car_variant']}",
        "student": results["student"],
        "reference LM": results["reference_lm"] or "none",
        "reward": results["reward"],
    })
    for note in results["notes"]:
        rep.add_note(note)
    rep.add_heading("Teachers, best CAR first")
    rep.add_table(teachers, TEACHER_COLUMNS, caption="Per-teacher means with 95% bootstrap intervals for CAR")
    rep.add_image(R.plot_metric_with_ci(teachers, "car", title="CAR per teacher (95% bootstrap interval)",
                                        ylabel="CAR"), alt="CAR per teacher")
    rep.add_image(R.plot_metric_with_ci(teachers, "reward", title="Reward per teacher", ylabel="reward"),
                  alt="reward per teacher")
    rep.add_image(R.plot_reward_vs_loss(teachers, results["beta"], title="Reward against student loss, iso-CAR curves"),
                  alt="reward against student loss")
    rep.add_heading("Per-sample scores")
    rep.add_paragraph("Every (instruction, teacher) row is in per_sample.parquet; the first rows:")
    rep.add_table(samples[:20], ["teacher", "id", "reward", "loss_student", "car", "length", "ppl_student",
                                 "ifd_student", "ppl_ref", "ifd_ref"], caption="Per-sample scores (first 20)")
    return rep


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
        rep.add_table(log[-10:], ["step", "loss", "ce", "kd", "attn", "lr", "grad_norm", "tokens"],
                      caption="Last logged steps")
    return rep
