"""From the runs' stored predictions to the report: scores per row and seed, every row's paired difference
to FedAvg with its interval and verdict (result_stat.comparison.statistics), compare.json, compare.md, the
validation curves and the forest plot.

Primary metric, declared before any run: pooled balanced accuracy; for rows of per-hospital models
(a method's personalized row, local-only) the mean of the hospitals' balanced accuracies, since pooled
over hospitals whose majority classes differ, models that each call everything their hospital's
majority class score well. The other statistic is reported beside it, unadjusted and without a verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedxvit.errors import FedXViTError
from result_stat.comparison import statistics
from result_stat.comparison.plan import CENTRALIZED, LOCAL_ONLY, REFERENCE, START, describe, personalized
from result_stat.comparison.runs import HELDOUT, SPLITS
from result_stat.comparison.scores import METRICS, PRIMARY_METRIC, curve_band, mean_std, score_sites, summarize_method

VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "inconclusive": "tab:gray"}


def primary_statistic(row: str) -> str:
    """Pooled balanced accuracy, or the mean of hospitals for rows of per-hospital models."""
    return statistics.HOSPITAL_MEAN if row == LOCAL_ONLY or row.endswith(personalized("")) else statistics.POOLED


def row_predictions(results: dict, methods: list, seeds: list, sites: list, split: str) -> dict:
    """{row: {seed: {site: predictions}}} of every row: each method's global model, its personalized models
    where its runs kept some, centralized, local-only (each hospital's own model on its own split) and the
    start (one value, seed "-")."""
    stale = sorted(
        {
            name
            for (name, _), result in results.items()
            if split not in result or ("personalized_test" in result and f"personalized_{split}" not in result)
        }
    )
    if stale:
        raise FedXViTError(
            f"--split {split}: the runs of {', '.join(stale)} predate validation scores; remove them from the workspace"
        )
    rows = {}
    for name in [*methods, CENTRALIZED]:
        rows[name] = {seed: results[(name, seed)][split] for seed in seeds if (name, seed) in results}
    for name in methods:
        personal = {
            seed: results[(name, seed)].get(f"personalized_{split}") for seed in seeds if (name, seed) in results
        }
        if any(personal.values()):
            rows[personalized(name)] = {seed: p for seed, p in personal.items() if p}
    rows[LOCAL_ONLY] = {
        seed: {site: results[(f"{LOCAL_ONLY} {site}", seed)][split][site] for site in sites}
        for seed in seeds
        if all((f"{LOCAL_ONLY} {site}", seed) in results for site in sites)
    }
    if (START, None) in results:
        rows[START] = {"-": results[(START, None)][split]}
    return rows


def differences(rows: dict, replicates: int = statistics.REPLICATES) -> dict:
    """{row: {"primary": paired difference to FedAvg with its verdict, "secondary": the other statistic's}} for
    every row but FedAvg and the start, on the seeds both have; Holm over the primary differences."""
    reference = rows.get(REFERENCE) or {}
    resamplers: dict = {}
    primary, secondary = {}, {}
    for name, per_seed in rows.items():
        common = [seed for seed in per_seed if seed in reference]
        if name in (START, REFERENCE) or not common:
            continue
        if tuple(common) not in resamplers:
            labels = {site: p["labels"] for site, p in reference[common[0]].items()}
            resamplers[tuple(common)] = statistics.Resampler(labels, common, replicates)
        resampler = resamplers[tuple(common)]
        first = primary_statistic(name)
        other = statistics.HOSPITAL_MEAN if first == statistics.POOLED else statistics.POOLED
        for family, statistic in ((primary, first), (secondary, other)):
            family[name] = statistics.paired_difference(resampler, per_seed, reference, statistic, (name, REFERENCE))
    statistics.verdicts(primary)
    return {name: {"primary": primary[name], "secondary": secondary[name]} for name in primary}


def heldout_rows(results: dict, methods: list, seeds: list, split: str) -> dict:
    """{row: {seed: {"heldout": predictions}}} of every global model (each method's, centralized, the start) on
    the held-out hospital; {} when the scenario has none."""
    rows = {}
    for name in [*methods, CENTRALIZED]:
        per_seed = {
            seed: results[(name, seed)][HELDOUT][split] for seed in seeds if HELDOUT in results.get((name, seed), {})
        }
        if per_seed:
            rows[name] = per_seed
    if rows and HELDOUT in results.get((START, None), {}):
        rows[START] = {"-": results[(START, None)][HELDOUT][split]}
    return rows


def heldout_table(rows: dict, replicates: int) -> dict:
    """The held-out hospital's balanced accuracy per row (mean +- std over seeds) and each row's paired difference
    to FedAvg there, Holm-adjusted within this family of its own."""
    versus = differences(rows, replicates)
    table = {}
    for name, per_seed in rows.items():
        table[name] = {
            "balanced_accuracy": mean_std(score_sites(p)["pooled"][PRIMARY_METRIC] for p in per_seed.values())
        }
        if name in versus:
            table[name]["vs_fedavg"] = statistics.without_replicates(versus[name]["primary"])
    return {"rows": table, "family": sorted(versus)}


def aggregate(
    results: dict, methods: list, seeds: list, sites: list, split: str = "test", replicates=statistics.REPLICATES
) -> dict:
    """Per row: scores per seed, mean +- std over seeds, the paired difference to FedAvg (primary statistic, its
    95% interval, Holm-adjusted p and verdict; the other statistic beside it), the share of the
    FedAvg->centralized gap it closes, and the validation curves.

    `results`: {(run name, seed): result.json}. `split`: "test" (the report), or "validation" (calibrating a
    scenario or tuning a method: FedSM's super-model is then scored with the threshold chosen on that same
    split, an optimistic score)."""
    if split not in SPLITS:
        raise FedXViTError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    rows = row_predictions(results, methods, seeds, sites, split)
    scores = {name: {seed: score_sites(p) for seed, p in per_seed.items()} for name, per_seed in rows.items()}
    versus = differences(rows, replicates)
    central = versus.get(CENTRALIZED, {}).get("primary", {})

    table = {}
    for name, per_seed in scores.items():
        row = (
            {"per_seed": {str(seed): s for seed, s in per_seed.items()}, **summarize_method(per_seed)}
            if per_seed
            else {}
        )
        if name in versus:
            first, second = versus[name]["primary"], versus[name]["secondary"]
            pooled = first if first["statistic"] == statistics.POOLED else second
            row["vs_fedavg"] = statistics.without_replicates(first)
            row["vs_fedavg_other"] = statistics.without_replicates(second)
            if name != CENTRALIZED and central:
                row["gap_share"] = statistics.gap_share(pooled, central)
        if name != START and per_seed:
            curves = [
                results[(name, seed)]["val_curve"] for seed in per_seed if "val_curve" in results.get((name, seed), {})
            ]
            if curves:
                row["val_curve"] = {"per_seed": curves, **curve_band(curves)}
            elif name == CENTRALIZED:
                row["final_val_accuracy"] = mean_std(results[(name, seed)]["final_val_accuracy"] for seed in per_seed)
        table[name] = row
    if START in table and (START, None) in results:
        table[START]["final_val_accuracy"] = results[(START, None)]["final_val_accuracy"]
    order = [START, *[row for name in methods for row in (name, personalized(name)) if row in table]]
    heldout = heldout_rows(results, methods, seeds, split)
    return {
        **({"heldout": heldout_table(heldout, replicates)} if heldout else {}),
        "primary_metric": PRIMARY_METRIC,
        "statistics": {
            "method": "paired hierarchical bootstrap: training seeds, then test images within hospital and class",
            "replicates": replicates,
            "confidence": statistics.CONFIDENCE,
            "alpha": statistics.ALPHA,
            "equivalence_margin": statistics.MARGIN,
            "adjustment": "Holm, over every row's primary difference to FedAvg",
            "family": sorted(versus),
        },
        "methods": table,
        "order": [*order, CENTRALIZED, LOCAL_ONLY],
    }


# ---- outputs ----


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _cell(summary: dict | None) -> str:
    """A fraction's mean +- std as percent points, e.g. "81.2 ± 1.3"; n/a when there is no value."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    text = f"{100 * summary['mean']:.1f}"
    return text + (f" ± {100 * summary['std']:.1f}" if summary.get("std") is not None else "")


def _difference(d: dict | None) -> str:
    """+3.1 [+0.8, +5.4] (percent points)."""
    if not d:
        return "—"
    low, high = d["ci"]
    return f"{100 * d['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _statistic_name(statistic: str) -> str:
    return "mean of hospitals" if statistic == statistics.HOSPITAL_MEAN else "pooled"


def _gap(share: dict | None) -> str:
    if not share:
        return "—"
    if share["status"] != "ok":
        return "n/a"
    low, high = share["ci"]
    return f"{100 * share['share']:.0f}%" + (f" [{100 * low:.0f}, {100 * high:.0f}]" if low is not None else "")


def _role(name: str) -> str:
    """What a row without a difference is: FedAvg, the reference; the start, not compared."""
    return "reference" if name == REFERENCE else "not compared (the untrained start)"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def verdict_lines(report: dict) -> list:
    """One sentence per verdict, naming the rows that earned it: what the report's prose may say."""
    table, names = report["methods"], [n for n in report["order"] if report["methods"].get(n, {}).get("vs_fedavg")]
    lines = []
    for verdict, text in (
        ("better", "Better than FedAvg"),
        ("worse", "Worse than FedAvg"),
        ("equivalent", "Equivalent to FedAvg (within ±2 points)"),
        ("inconclusive", "Inconclusive against FedAvg (this data cannot tell)"),
    ):
        chosen = [n for n in names if table[n]["vs_fedavg"]["verdict"] == verdict]
        if chosen:
            lines.append(f"- **{text}:** {', '.join(chosen)}.")
    return lines


def distinct_runs(runs: list) -> list:
    """Each run folder once, as first listed: seed 0's evaluation run of a tuned method is its chosen tuning run,
    listed again (reused), and must not count twice in what the comparison cost."""
    first: dict = {}
    for run in runs:
        first.setdefault(run["folder"], run)
    return list(first.values())


def run_costs(runs: list) -> dict:
    """{what ran (a method, its tuning runs, centralized, local-only): runs, reused, compute seconds} from the
    report's run list: what each part of the comparison costs when run from scratch (each run once)."""
    costs: dict = {}
    for run in distinct_runs(runs):
        name = LOCAL_ONLY if run["method"].startswith(LOCAL_ONLY) else run["method"]
        row = costs.setdefault(name, {"runs": 0, "reused": 0, "compute_s": 0.0})
        row["runs"] += 1
        row["reused"] += int(run["reused"])
        row["compute_s"] += float(run["wall_s"])
    return costs


def compare_markdown(report: dict) -> str:
    s, table, stats = report["settings"], report["methods"], report["statistics"]
    names = [n for n in report["order"] if table.get(n)]
    split = SPLITS[s.get("split", "test")]
    cohort = (s.get("cohorts") or {}).get(s.get("split", "test"))  # reports written before cohorts were recorded: none
    lines = [
        "# Choosing an algorithm\n",
        f"Scenario `{s['data']}` ({', '.join(s['sites'])}), initial model `{s['initial']}` (preset {s['preset']}), "
        f"budget {s['rounds']} rounds x {s['local_epochs']} local epoch(s) for every method (from "
        f"{s.get('budget_source', 'the FedAvg job')}); baselines train {s['rounds'] * s['local_epochs']} epochs from "
        f"the same start. Seeds {', '.join(map(str, s['seeds']))}.\n",
        f"Scores: each final model on every hospital's **{split}** split (nothing was tuned or selected on test). "
        "Local-only: each hospital's own model on its own split. `<method> (personalized)`: Ditto: each hospital's "
        "personalized model on its own split; FedSM: the super-model (the selector routes each image; threshold "
        "chosen on validation). Start: the initial model, untrained.\n",
        *(
            [
                f"The scored cohort: {cohort['images']:,} {split} images, SHA-256 `{cohort['sha256']}` (every scored "
                "hospital's images by content, with their labels).\n"
            ]
            if cohort
            else []
        ),
        "**Primary metric** (declared before the runs): pooled balanced accuracy; the mean of hospitals' balanced "
        "accuracies for rows of per-hospital models (personalized, local-only). **Every difference to FedAvg** is "
        f"paired: {stats['method']} ({stats['replicates']} replicates, the same draws for every row), "
        f"{100 * stats['confidence']:.0f}% percentile interval, two-sided bootstrap p, Holm-adjusted over the "
        f"{len(stats['family'])} rows. **better / worse**: adjusted p < {stats['alpha']}; **equivalent**: the "
        f"interval lies inside ±{100 * stats['equivalence_margin']:.0f} points; **inconclusive** otherwise.\n",
        f"## Verdicts ({split} split)\n",
        "| method | primary statistic | value (mean ± std over seeds) | vs FedAvg: difference [95% CI], points | "
        "adjusted p | verdict | FedAvg→centralized gap closed [95% CI] |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name in names:
        row = table[name]
        statistic = primary_statistic(name)
        value = row["pooled" if statistic == statistics.POOLED else "hospital_mean"][PRIMARY_METRIC]
        d = row.get("vs_fedavg")
        lines.append(
            f"| {name} | {_statistic_name(statistic)} | {_cell(value)} | "
            + (f"{_difference(d)} | {_p(d['p_adjusted'])} | **{d['verdict']}**" if d else f"— | — | {_role(name)}")
            + f" | {_gap(row.get('gap_share'))} |"
        )
    lines.append("")
    lines += verdict_lines(report)
    widths = [table[n]["vs_fedavg"]["half_width"] for n in names if table[n].get("vs_fedavg")]
    if widths:
        lines.append(
            f"\nThe intervals' half-widths run from {100 * min(widths):.1f} to {100 * max(widths):.1f} points: a "
            "smaller difference cannot be resolved with these test images and seeds. Gap closed: (row − FedAvg) / "
            "(centralized − FedAvg) on pooled balanced accuracy, n/a unless centralized is better than FedAvg."
        )
    heldout = report.get("heldout")
    if heldout:
        lines += [
            "\n## A hospital that joins later (held out: never trained on, a scanner no training hospital has)\n",
            "| model | balanced accuracy (mean ± std over seeds) | vs FedAvg: difference [95% CI], points | "
            "adjusted p | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for name in [n for n in report["order"] if n in heldout["rows"]]:
            row = heldout["rows"][name]
            d = row.get("vs_fedavg")
            lines.append(
                f"| {name} | {_cell(row['balanced_accuracy'])} | "
                + (
                    f"{_difference(d)} | {_p(d['p_adjusted'])} | **{d['verdict']}** |"
                    if d
                    else f"— | — | {_role(name)} |"
                )
            )
        lines.append(
            f"\nHolm-adjusted within these {len(heldout['family'])} rows (a family of its own); intervals as above."
        )
    if s.get("tuning"):
        lines += [
            "\n## Tuned on validation\n",
            f"Each grid ran once (seed {s['seeds'][0]}, the same budget); the value set scoring best on the sites' "
            "validation splits (primary statistic) was used for every seed.\n",
            "| method | value sets (validation score, points) | chosen |",
            "|---|---|---|",
        ]
        for name, tuned in s["tuning"].items():
            tried = "; ".join(
                f"{', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in values.items())} "
                f"({_points(score)})"
                for values, score in zip(tuned["grid"], tuned["validation_scores"])
            )
            lines.append(f"| {name} | {tried} | {describe(tuned['chosen']) if tuned['chosen'] else 'none'} |")
    lines += [
        f"\n## Pooled {split} set, every metric\n",
        "| method | accuracy | balanced accuracy | macro-F1 | ROC-AUC | worst hospital (balanced accuracy) | "
        "mean of hospitals (balanced accuracy) | vs FedAvg, the other statistic (unadjusted p) |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for name in names:
        row = table[name]
        other = row.get("vs_fedavg_other")
        other_text = (
            f"{_statistic_name(other['statistic'])}: {_difference(other)} (p {_p(other['p'])})" if other else "—"
        )
        worst = ", ".join(sorted(set(row["worst_site"]["sites"])))
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(row["pooled"][m]) for m in METRICS)
            + f" | {_cell(row['worst_site']['balanced_accuracy'])} ({worst})"
            + f" | {_cell(row['hospital_mean']['balanced_accuracy'])} | {other_text} |"
        )
    classes = s.get("class_names") or [str(c) for c in range(len(table[names[0]].get("pooled_recall", [])))]
    if names and table[names[0]].get("pooled_recall"):
        lines += [
            f"\n## Pooled {split} set: recall per class\n",
            "| method | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * len(classes),
        ]
        lines += [f"| {n} | " + " | ".join(_cell(r) for r in table[n].get("pooled_recall", [])) + " |" for n in names]
    for metric in METRICS:
        lines += [
            f"\n## Per hospital: {metric.replace('_', ' ')}\n",
            "| method | " + " | ".join(s["sites"]) + " |",
            "|---|" + "---:|" * len(s["sites"]),
        ]
        lines += [
            f"| {n} | " + " | ".join(_cell(table[n]["sites"][site][metric]) for site in s["sites"]) + " |"
            for n in names
        ]
    lines.append("\n## Runs and their cost\n")
    lines.append(
        f"{len(distinct_runs(report['runs']))} runs, {report['compute_s']:.0f} s of compute when run from scratch "
        "(seed 0's evaluation run of a tuned method is its chosen tuning run, counted once); this call "
        f"took {report['wall_s']:.0f} s. Differences to FedAvg: compare_forest.png; pooled validation accuracy per "
        "round: compare_curves.png.\n"
    )
    lines += ["| runs of | runs | reused now | compute, s (all) | per run, s |", "|---|---:|---:|---:|---:|"]
    for name, row in run_costs(report["runs"]).items():
        per_run = row["compute_s"] / row["runs"]
        lines.append(f"| {name} | {row['runs']} | {row['reused']} | {row['compute_s']:.0f} | {per_run:.0f} |")
    for failure in report["failures"]:
        lines.append(f"- FAILED {failure['method']} seed {failure['seed']}: {failure['error']}")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend beside the axes included
    plt.close(fig)
    return path


def save_forest_png(report: dict, path: Path) -> Path:
    """Each row's paired difference to FedAvg on its primary statistic with its 95% interval, coloured by
    verdict; zero and the equivalence margin drawn."""
    table = report["methods"]
    names = [n for n in report["order"] if table.get(n, {}).get("vs_fedavg")]
    plt, fig, ax = _figure(7.5, 0.45 * max(len(names), 2) + 1.4)
    margin = 100 * report["statistics"]["equivalence_margin"]
    ax.axvspan(-margin, margin, color="tab:blue", alpha=0.08, label=f"±{margin:.0f} points (equivalence)")
    ax.axvline(0, color="black", lw=0.8)
    for y, name in enumerate(reversed(names)):
        d = table[name]["vs_fedavg"]
        low, high = (100 * v for v in d["ci"])
        color = VERDICT_COLORS[d["verdict"]]
        ax.plot([low, high], [y, y], color=color, lw=2)
        ax.plot(100 * d["difference"], y, "o", color=color)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{n} ({_statistic_name(primary_statistic(n))})" for n in reversed(names)], fontsize=8)
    ax.set_xlabel("difference to FedAvg, balanced accuracy points (95% CI)")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=v) for v, c in VERDICT_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: never on a row
    ax.set_title(f"Paired differences to FedAvg ({SPLITS[report['settings'].get('split', 'test')]} split)", fontsize=9)
    return _save(plt, fig, path)


def save_curves_png(report: dict, path: Path) -> Path:
    """Pooled global validation accuracy per round, one line per federated method (mean over seeds, band
    min..max), on the whole 0..1 axis; the centralized baseline's final value as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    plt, fig, ax = _figure(6.5, 4)
    for name in report["order"]:
        row = report["methods"].get(name) or {}
        if "val_curve" in row:
            band = row["val_curve"]
            xs = [i for i, v in enumerate(band["mean"]) if v is not None]
            (line,) = ax.plot(xs, [band["mean"][i] for i in xs], marker="o", label=name)
            ax.fill_between(
                xs, [band["min"][i] for i in xs], [band["max"][i] for i in xs], color=line.get_color(), alpha=0.2
            )
        elif name == CENTRALIZED and row.get("final_val_accuracy", {}).get("mean") is not None:
            ax.axhline(row["final_val_accuracy"]["mean"], ls="--", color="black", label="centralized (final)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.set_xlabel("rounds trained")
    ax.set_ylabel("pooled validation accuracy")
    ax.set_title(
        f"Global validation per round, seeds {', '.join(map(str, report['settings']['seeds']))} (band: min..max)"
    )
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def write_outputs(report: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "compare.json",
        "markdown": out / "compare.md",
        "curves": out / "compare_curves.png",
        "forest": out / "compare_forest.png",
    }
    files["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    files["markdown"].write_text(compare_markdown(report))
    save_curves_png(report, files["curves"])
    save_forest_png(report, files["forest"])
    return files


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
