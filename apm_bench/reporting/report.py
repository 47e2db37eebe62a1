"""The human-readable side of a run: a Markdown report and a plot of Δ with its CI per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apm_bench.judging.label_diagnostics import LabelDiagnostics
from apm_bench.judging.metrics import MethodMetrics
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import RunResult
from apm_bench.run.setup import BASELINE, ORACLE, PRIOR

SIM_NOTE = (
    "> These numbers come from the embedded style simulator: they show whether a method infers and "
    "acts on hidden preferences in a controlled world. Claims about real LLMs need a real backend."
)



def metrics_table(metrics: list[MethodMetrics]) -> str:
    lines = [
        "| method | world | n | Δ score | 95 % CI | win | tie | loss | gain | failed ratings |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for m in metrics:
        if m.method == BASELINE:
            continue
        gain = "–" if m.gain is None else f"{m.gain:.2f}"
        lines.append(
            f"| {m.method} | {m.world} | {m.n_users} | {m.delta:+.3f} | [{m.ci_low:+.3f}, {m.ci_high:+.3f}] | "
            f"{m.win:.2f} | {m.tie:.2f} | {m.loss:.2f} | {gain} | {m.failed_ratings} |"
        )
    return "\n".join(lines)


def ci_coverage(config: RunConfig) -> str:
    """Which sources of variance the CI covers, so nobody reads more into it than it holds."""
    split = "the train/test split (drawn per world)" if config.split_per_world else ""
    covered = ", ".join(s for s in ("test users", "the hidden mapping C (worlds are resampled)", split) if s)
    fixed = "the population (attributes, histories, prompts) of data seed " + str(config.data_seed)
    if not config.split_per_world:
        fixed += " and its split"
    return (f"The 95 % CI is a seeded bootstrap over worlds, then users; it covers {covered}. It does not cover "
            f"{fixed}: compare data seeds (`--data-seed`) for that.")


def render_report(result: RunResult, run_id: str, wall_seconds: float) -> str:
    config = result.config
    pooled = [m for m in result.metrics if m.world == "pooled"]
    per_world = [m for m in result.metrics if m.world != "pooled"]
    baseline = next((m for m in pooled if m.method == BASELINE), None)
    costs = "\n".join(
        f"| {stage} | " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()) + " |"
        for stage, values in sorted(result.costs.items())
    )
    sections = [
        f"# apm-bench run `{run_id}`",
        SIM_NOTE if config.model.startswith("sim") else "",
        f"Model **{config.model}** · worlds {config.worlds} · {config.users} users"
        f"{'' if config.train_users is None else f' (training capped at {config.train_users})'} · n_attr {config.n_attr} · "
        f"pool {config.pool} · mapping {config.mapping} (n_perm {config.n_perm}) · history {config.history_len} "
        f"· control {config.control or 'none'} · population {result.population_source} · {wall_seconds:.1f} s",
        f"Baseline mean reward (pooled): {baseline.mean_reward:.3f}" if baseline else "",
        "## Pooled over worlds\n\nΔ = mean over test users of R(method) − R(baseline); gain = Δ / Δ(oracle). "
        "The prior row gives every user the one instruction that scored best over training users and reads no "
        f"history: a method personalizes only as far as it clears the prior. {ci_coverage(config)}\n\n"
        + metrics_table(pooled),
        "![Δ score per method](delta.png)",
        "## Per world\n\n" + metrics_table(per_world),
        routing_section(result.label_diagnostics),
        summaries_section(result.samples),
        context_section(result.samples),
        training_section(result.training),
        "## Cost\n\n| stage | counts |\n|---|---|\n" + costs,
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def routing_section(diagnostics: list[LabelDiagnostics]) -> str:
    """Whether routers chose the label users wanted: the judge's training labels, then the predictions."""
    if not diagnostics:
        return ""
    lines = ["## Routing diagnostics", "",
             "Each router's chosen instruction against the user's true top target (largest |weight|), read "
             "after prediction. *Training labels*: the labels the judge's feedback gave the training users; "
             "*test*: the predictions for test users.", "",
             "| method | world | training label acc. | test label acc. | test principle acc. | test users |",
             "|---|---|---:|---:|---:|---:|"]
    for d in diagnostics:
        train = f"{d.training_label_accuracy:.3f} ({d.training_users})" if d.training_label_accuracy is not None else "–"
        lines.append(f"| {d.method} | {d.world} | {train} | {d.label_accuracy:.3f} | {d.principle_accuracy:.3f} | {d.n_users} |")
    for d in (d for d in diagnostics if d.world == "pooled" and d.method not in ("prior",)):
        predicted = sorted({p for row in d.confusion.values() for p in row})
        lines += ["", f"Confusion of **{d.method}** (pooled; rows: true top principle, columns: chosen):", "",
                  "| true \\ chosen | " + " | ".join(predicted) + " |", "|---|" + "---:|" * len(predicted)]
        lines += [f"| {true} | " + " | ".join(str(row.get(p, 0)) for p in predicted) + " |" for true, row in d.confusion.items()]
    return "\n".join(lines)


def summaries_section(samples) -> str:  # type: ignore[no-untyped-def]
    """Methods that condition on a summary instead of the history: how much context they save."""
    if "summary" not in samples.columns or samples["summary"].isna().all():
        return ""
    lines = ["## Preference summaries", "", "| method | mean history tokens | mean summary tokens | context reduction |", "|---|---:|---:|---:|"]
    for method, rows in samples.dropna(subset=["summary"]).groupby("method", sort=False):
        history = rows["history_tokens"].mean()
        summary = rows["summary"].map(lambda s: len(s.split())).mean()
        lines.append(f"| {method} | {history:.1f} | {summary:.1f} | {history / max(summary, 1e-9):.1f}× |")
    example = samples.dropna(subset=["summary"]).iloc[0]
    lines += ["", f"Example ({example['method']}, user {example['user_id']}): “{example['summary']}”"]
    return "\n".join(lines)


def context_section(samples) -> str:  # type: ignore[no-untyped-def]
    """How often a prompt had to be cut, or could not be sent at all, to fit the generator's context."""
    if "context_trimmed" not in samples.columns:
        return ""
    trimmed = samples["context_trimmed"] > 0
    failed = samples["generation_error"].notna()
    if not trimmed.any() and not failed.any():
        return ""
    lines = ["## Context budget", "",
             "Histories and examples are cut to the generator's context, oldest messages and least similar "
             "examples first; a prompt that still does not fit is not sent, and its user leaves that "
             "method's Δ.", "",
             "| method | prompts | trimmed | items left out | not generated |", "|---|---:|---:|---:|---:|"]
    for method, rows in samples.groupby("method", sort=False):
        cut, lost = rows["context_trimmed"] > 0, rows["generation_error"].notna()
        lines.append(f"| {method} | {len(rows)} | {int(cut.sum())} ({cut.mean():.0%}) | "
                     f"{int(rows['context_trimmed'].sum())} | {int(lost.sum())} ({lost.mean():.0%}) |")
    return "\n".join(lines)


def training_section(training: list[dict[str, Any]]) -> str:
    if not training:
        return ""
    lines = ["## Training", "", "Loss curves: [training.json](training.json); weights: `artifacts/`.", "",
             "| world | method | adapter | steps | examples | seconds | first loss | final loss |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for entry in training:
        losses = entry["losses"]
        first, last = (f"{losses[0]:.4f}", f"{losses[-1]:.4f}") if losses else ("–", "–")
        seconds = "reused" if entry["reused"] else f"{entry['seconds']:.1f}"
        lines.append(f"| {entry['world']} | {entry['method']} | `{entry['name']}` | {entry['steps']} | {entry['examples']} | "
                     f"{seconds} | {first} | {last} |")
    if any(entry["losses"] for entry in training):
        lines += ["", "![training loss](training.png)"]
    return "\n".join(lines)


def plot_training(training: list[dict[str, Any]], path: Path) -> None:
    """Loss per step, one panel per method, one line per adapter and world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(entry["method"] for entry in training if entry["losses"]))
    if not methods:
        return
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.2), dpi=120, squeeze=False)
    for axis, method in zip(axes[0], methods):
        for entry in training:
            if entry["method"] == method and entry["losses"]:
                axis.plot(entry["losses"], linewidth=0.9, alpha=0.8)
        axis.set_title(method)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def plot_deltas(metrics: list[MethodMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = [m for m in metrics if m.world == "pooled" and m.method != BASELINE]
    figure, axis = plt.subplots(figsize=(1.2 + 1.1 * max(len(pooled), 1), 3.4), dpi=120)
    positions = range(len(pooled))
    deltas = [m.delta for m in pooled]
    errors = [[m.delta - m.ci_low for m in pooled], [m.ci_high - m.delta for m in pooled]]
    axis.bar(positions, deltas, color=["#4c72b0" if d >= 0 else "#c44e52" for d in deltas], width=0.6)
    axis.errorbar(positions, deltas, yerr=errors, fmt="none", ecolor="black", capsize=4, linewidth=1)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xticks(list(positions), [m.method for m in pooled], rotation=30, ha="right")
    axis.set_ylabel("Δ score vs baseline (95 % CI)")
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


#: reference rows drawn as such on a curve: the oracle bounds every method from above
CURVE_REFERENCES = {ORACLE: {"color": "#555555", "linestyle": "--", "label": "oracle (upper bound)"},
                    "oracle-router": {"color": "#555555", "linestyle": "-.", "label": "oracle-router (upper bound)"},
                    PRIOR: {"color": "#999999", "linestyle": ":", "label": "prior (reads no history)"}}


def geometric(values: list[int]) -> bool:
    """Three or more positive values growing by a near-constant factor: they belong on a log axis."""
    ordered = sorted(values)
    if len(ordered) < 3 or ordered[0] <= 0:
        return False
    ratios = [b / a for a, b in zip(ordered, ordered[1:])]
    return min(ratios) > 1 and max(ratios) / min(ratios) < 1.15


def plot_curve(field: str, points, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Δ with its 95 % CI band against the varied setting, one line per method; the baseline is the
    zero line (its Δ is 0 by definition), other reference rows are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(points["value"].unique())
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    axis.axhline(0, color="black", linewidth=0.8, label="baseline (Δ = 0)")
    for method, rows in points.groupby("method", sort=False):
        rows = rows.sort_values("value")
        style = CURVE_REFERENCES.get(str(method), {"label": str(method)})
        line = axis.plot(rows["value"], rows["delta"], marker="o", markersize=4, linewidth=1.4, **style)[0]
        axis.fill_between(rows["value"], rows["ci_low"], rows["ci_high"], color=line.get_color(),
                          alpha=0.12 if method in CURVE_REFERENCES else 0.22, linewidth=0)
    if geometric(values):
        axis.set_xscale("log")
        axis.minorticks_off()
    axis.set_xticks(values, [str(v) for v in values])
    axis.set_xlabel(field)
    axis.set_ylabel("Δ score vs baseline (95 % CI)")
    axis.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
