"""``reports/evaluate/index.html``: the evaluate stage's tables and pictures on one page, per domain, so a
person deciding whether to deploy to a domain reads its weak classes, its calibration and its operating
point together. Static HTML (images beside it, relative links): opens from disk or a CI artifact."""
from __future__ import annotations

import math
from pathlib import Path

from jinja2 import Environment

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mdpipe evaluation</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}
tr.worst td{background:#fde8e8}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
nav a{margin-right:.8em}.note{color:#555;font-size:.9em}
section{border-top:2px solid #ddd;margin-top:1.5em}
</style></head><body>
<h1>Evaluation of <code>{{ model }}</code></h1>
<p class="note">Seen domains: their test split, scored with their domain id. Held-out domains: all their images,
scored as an unknown domain (routed). Temperatures and abstain thresholds were fitted on the validation split
(seen domains on their own images; the unknown-domain ones on every validation image without its domain id);
test and held-out figures only report what those choices give. Target precision: {{ target }}.</p>
<nav>{% for d in domains %}<a href="#{{ d.anchor }}">{{ d.name }}</a>{% endfor %}
<a href="per_class.csv">per_class.csv</a><a href="confusion.csv">confusion.csv</a>
<a href="calibration.csv">calibration.csv</a><a href="calibration.json">calibration.json</a>
<a href="per_domain.csv">per_domain.csv</a><a href="class_balance.csv">class_balance.csv</a>
{% if issues %}<a href="#label-issues">label issues</a><a href="{{ issues.folder }}/label_issues.csv">label_issues.csv</a>{% endif %}
{% if cams %}<a href="cam_samples.csv">cam_samples.csv</a>{% endif %}</nav>

<h2>Per domain</h2>
<img src="accuracy.png" alt="accuracy per domain, with and without the domain id">
<table><tr><th class="l">domain</th><th class="l">kind</th><th>images</th><th>accuracy</th>
<th>accuracy, unknown domain</th><th>macro-F1</th><th>balanced acc.</th><th class="l">worst class (recall)</th></tr>
{% for d in domains %}<tr><td class="l"><a href="#{{ d.anchor }}">{{ d.name }}</a></td><td class="l">{{ d.kind }}</td>
<td>{{ d.images }}</td><td>{{ d.acc|f3 }}</td><td>{{ d.acc_unknown|f3 }}</td><td>{{ d.s.macro_f1|f3 }}</td>
<td>{{ d.s.balanced_acc|f3 }}</td><td class="l">{{ d.s.worst_class }} ({{ d.s.worst_class_recall|f3 }})</td></tr>
{% endfor %}</table>

<h2>Calibration and selective prediction</h2>
<p class="note">ECE: expected calibration error ({{ bins }} equal-width bins); NLL: mean negative log-likelihood.
Temperature scaling divides the logits by T (per domain), so accuracy is unchanged. "Abstain below": the
calibrated confidence under which the model should not answer to reach the target precision (chosen on
validation; "never reached" = no threshold did); coverage and precision: what it gives here; coverage at
target: the widest coverage reaching the target on these very images (a bound, not a choice).</p>
<table><tr><th class="l">domain</th><th>T</th><th>ECE before</th><th>ECE after</th><th>NLL before</th>
<th>NLL after</th><th>acc. before</th><th>acc. after</th><th>abstain below</th><th>coverage</th>
<th>precision</th><th>coverage at target</th></tr>
{% for d in domains %}<tr><td class="l">{{ d.name }}</td><td>{{ d.c.temperature|f3 }}</td>
<td>{{ d.c.ece_before|f3 }}</td><td>{{ d.c.ece_after|f3 }}</td><td>{{ d.c.nll_before|f3 }}</td>
<td>{{ d.c.nll_after|f3 }}</td><td>{{ d.c.acc_before|f3 }}</td><td>{{ d.c.acc_after|f3 }}</td>
<td>{{ d.sel.threshold|f3("never reached") }}</td><td>{{ d.sel.coverage|f3 }}</td>
<td>{{ d.sel.precision|f3 }}</td><td>{{ d.sel.coverage_at_target|f3 }}</td></tr>
{% endfor %}</table>
<p class="note">Mean ECE, seen domains: {{ means.seen_before|f3 }} before, {{ means.seen_after|f3 }} after;
held-out domains: {{ means.held_before|f3 }} before, {{ means.held_after|f3 }} after.</p>

<h2>Class balance</h2>
<p class="note">Images per class: seen domains on their training split, real and synthetic rows (what the loss
sees), held-out domains on all their images. Imbalance ratio: largest class / smallest class (– when a class has none).
<code>finetune.class_balance</code> re-weights the loss or adjusts the logits by each domain's class frequencies.</p>
<table><tr><th class="l">domain</th><th class="l">rows</th>{% for c in classes %}<th>{{ c }}</th>{% endfor %}<th>imbalance ratio</th></tr>
{% for b in balance %}<tr><td class="l">{{ b.domain }}</td><td class="l">{{ b.rows }}</td>
{% for c in classes %}<td>{{ b.class_counts[c] }}</td>{% endfor %}<td>{{ b.imbalance_ratio|f3 }}</td></tr>
{% endfor %}</table>

{% if issues %}<section id="label-issues"><h2>Label issues (training split, the label_issues stage; a warning: nothing was removed)</h2>
<p class="note">Out-of-fold probabilities ({{ issues.folds }} folds) of a logistic regression on features of the
{{ issues.features }} backbone, judged by cleanlab: a flagged image's given label is unlikely under a model that
never saw it. Swapped pairs: two classes whose images, in this domain, mostly carry each other's names,
by the votes of classifiers fitted on each other domain (two domains that disagree are both named: nothing
tells which annotators were right). Check the images in <a href="{{ issues.folder }}/label_issues.csv">label_issues.csv</a>
(the quarantine file's columns, plus the suggested label and its quality) and relabel or remove them at the source.</p>
<table><tr><th class="l">domain</th><th>training images</th><th>flagged</th><th>share</th>
<th class="l">swapped pairs (votes)</th><th class="l">largest confusions (given → looks like)</th></tr>
{% for d, r in issues.per_domain.items() %}<tr><td class="l">{{ d }}</td><td>{{ r.images }}</td><td>{{ r.issues }}</td>
<td>{{ r.issue_share|f3 }}</td><td class="l">{% for p in r.swapped_pairs %}<b>{{ p.classes[0] }} ↔ {{ p.classes[1] }}</b>
({{ p.votes }}/{{ p.witnesses }}{% if p.also_named_in %}, also {{ p.also_named_in|join(", ") }}{% endif %}) {% else %}none{% endfor %}</td>
<td class="l">{% for c in r.top_confusions %}{{ c.given }} → {{ c.looks_like }} ({{ c.count }}) {% endfor %}</td></tr>
{% endfor %}</table>
{% if issues.sheet %}<img src="{{ issues.folder }}/{{ issues.sheet }}" alt="the most suspect training images with their given and suggested labels">{% endif %}
<table><tr><th class="l">path</th><th class="l">domain</th><th class="l">given</th><th class="l">suggested</th><th>label quality</th></tr>
{% for r in issues.top %}<tr><td class="l">{{ r.path }}</td><td class="l">{{ r.domain }}</td><td class="l">{{ r.label }}</td>
<td class="l">{{ r.suggested }}</td><td>{{ r.label_quality|f3 }}</td></tr>
{% endfor %}</table>{% if issues.more %}<p class="note">… and {{ issues.more }} more in label_issues.csv.</p>{% endif %}
</section>{% endif %}

{% for d in domains %}<section id="{{ d.anchor }}"><h2>{{ d.name }} <small>({{ d.kind }}, {{ d.images }} images)</small></h2>
<table><tr><th class="l">class</th><th>images</th><th>precision</th><th>recall</th><th>F1</th></tr>
{% for r in d.rows %}<tr{% if r['class'] == d.s.worst_class %} class="worst"{% endif %}><td class="l">{{ r['class'] }}</td>
<td>{{ r.support }}</td><td>{{ r.precision|f3 }}</td><td>{{ r.recall|f3 }}</td><td>{{ r.f1|f3 }}</td></tr>
{% endfor %}</table>
<img src="{{ d.confusion_png }}" alt="{{ d.name }}: confusion matrices">
<img src="{{ d.calibration_png }}" alt="{{ d.name }}: reliability diagram and precision against coverage">
{% if d.cam_png %}<h3>Where the model looks (Grad-CAM)</h3>
<p class="note">A fixed, seeded sample of correct and wrong predictions; red = the regions that pushed the
predicted class up the most ({{ "its domain id" if d.kind == "seen" else "no domain id: routed, as a new site" }}).
A model that looks at the background, the paper or the noise instead of the object shows it here.</p>
<img src="{{ d.cam_png }}" alt="{{ d.name }}: Grad-CAM of correct and wrong predictions">{% endif %}
</section>
{% endfor %}
</body></html>
"""


def f3(value, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render(out: str | Path, *, model: str, target: float, bins: int, domains: list[dict], means: dict,
           classes: list[str] = (), balance: list[dict] = (), issues: dict | None = None) -> None:
    """Write the page; ``domains``: per domain its name, anchor, kind, images, accuracies, summary ``s``,
    calibration ``c``, selective ``sel``, per-class ``rows``, the picture file names (``cam_png`` may be
    None); ``balance``: class counts per domain; ``issues``: the label-issue section (None = off)."""
    env = Environment(autoescape=True)
    env.filters["f3"] = f3
    html = env.from_string(TEMPLATE).render(model=model, target=target, bins=bins, domains=domains, means=means,
                                            classes=list(classes), balance=list(balance), issues=issues)
    Path(out).write_text(html)


def write_report(folder: str | Path, accuracy: dict[str, dict], figures: dict, temps, *, model: str,
                 target: float, bins: int, classes: list[str] = (), balance: list[dict] = (),
                 cams: dict[str, str] | None = None, issues: dict | None = None) -> list[str]:
    """Everything beside ``accuracy.png`` and ``per_domain.csv`` in the evaluate folder: per-class and
    confusion CSVs, calibration CSV and JSON (the temperatures deployment reads), the two pictures per
    domain and ``index.html``. ``accuracy``: per domain its images, acc and acc_unknown_domain;
    ``figures``: ``mdcore.eval.explain.explain``'s; ``cams``: domain -> Grad-CAM sheet file (written
    already); ``balance`` and ``issues``: see :func:`render`. Returns the file names written."""
    import pandas as pd

    from mdcore.eval.calibration import CALIBRATION_FILE
    from mdcore.eval.explain import mean_of
    from mdcore.eval.plots import file_stem, plot_calibration, plot_confusion

    folder = Path(folder)
    class_rows, confusion_rows, calibration_rows, domains = [], [], [], []
    for name, f in figures.items():
        rows = f.classes.rows(f.kind)
        class_rows += rows
        c = f.classes
        confusion_rows += [{"domain": name, "true": c.classes[i], "predicted": c.classes[j], "count": int(c.confusion[i, j])}
                           for i in range(len(c.classes)) for j in range(len(c.classes)) if c.confusion[i, j]]
        calibration_rows.append({"domain": name, "kind": f.kind, **f.calibration, **f.selective})
        stem = file_stem(name)
        plot_confusion(c, folder / f"confusion_{stem}.png", f.kind)
        plot_calibration(name, f.reliability_before, f.reliability_after, *f.curve, target, f.selective,
                         folder / f"calibration_{stem}.png")
        acc = accuracy[name]
        domains.append({"name": name, "anchor": f"d-{stem}", "kind": f.kind, "images": acc["images"],
                        "acc": acc["acc"], "acc_unknown": acc["acc_unknown_domain"], "s": c.summary(),
                        "c": f.calibration, "sel": f.selective, "rows": rows,
                        "confusion_png": f"confusion_{stem}.png", "calibration_png": f"calibration_{stem}.png",
                        "cam_png": (cams or {}).get(name)})
    pd.DataFrame(class_rows).to_csv(folder / "per_class.csv", index=False, float_format="%.4f")
    pd.DataFrame(confusion_rows, columns=["domain", "true", "predicted", "count"]).to_csv(folder / "confusion.csv",
                                                                                        index=False)
    pd.DataFrame(calibration_rows).to_csv(folder / "calibration.csv", index=False, float_format="%.4f")
    temps.save(folder / CALIBRATION_FILE)
    means = {"seen_before": mean_of(figures, "seen", "ece_before"), "seen_after": mean_of(figures, "seen", "ece_after"),
             "held_before": mean_of(figures, "held-out", "ece_before"),
             "held_after": mean_of(figures, "held-out", "ece_after")}
    render(folder / "index.html", model=model, target=target, bins=bins, domains=domains, means=means,
           classes=classes, balance=balance, issues=issues)
    return sorted(p.name for p in folder.iterdir())
