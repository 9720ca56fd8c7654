"""The papers' claims as rows: the common row type of the paper reports and of the summary (notebooks/summary.py).

A `Claim` is one published claim judged on one preset: the claim in words, the published value and its provenance
(config/published_values.yaml; a value that is not known there stays "not known"), ours with its 95% interval, the
verdict and the report that shows the numbers (a relative link). The stage modules compute the rows
(`stages.densepure.claims`, `stages.diffpure.claims`, `stages.rdc.claims`, `stages.pixel_barrier.claim_rows`);
this module holds what every paper shares: the verdict rules, the row, and the summary's HTML table.

Verdicts (`VERDICTS`): *holds* when the whole interval supports the claim, *fails* when the whole interval
contradicts it, *inconclusive* otherwise, and *inconclusive* whatever the interval when a claim about robust
accuracy rests on no evidence (`on_evidence`: a defense it compares classifies no image correctly clean, so its
robust accuracy is 0 whatever the attack); *not run at this preset* for a number measured at another scale (the
papers' headline numbers at paper scale) or a report this preset does not render.
"""

import html
import math
from dataclasses import asdict, dataclass
from urllib.parse import quote

import numpy as np

HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "fails", "inconclusive", "not run at this preset"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_RUN)
NOT_KNOWN = "not known"


@dataclass(frozen=True)
class Claim:
    """One published claim and its verdict on this preset's numbers."""
    paper: str                    # e.g. "DensePure / DDS"
    claim: str                    # the claim in words, as tested here
    published: str                # the published value of what `ours` measures, or NOT_KNOWN
    provenance: str               # tag and source of the claim and of the published value (or why it is unknown)
    ours: str                     # our number in words ("" when not run)
    estimate: float | None        # our number, its 95% interval (None where there is none)
    low: float | None
    high: float | None
    verdict: str                  # one of VERDICTS
    report: str                   # relative link to the report (and section) that shows the numbers; "" if none
    headline: bool = False        # a paper's headline number at paper scale

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {VERDICTS}")

    def row(self):
        return asdict(self)


def _undefined(low, high):
    return low is None or high is None or math.isnan(low) or math.isnan(high)


def at_least(low, high, bound=0.0):
    """Verdict on "the quantity is >= bound" from its interval: holds when low >= bound, fails when high < bound."""
    if _undefined(low, high):
        return INCONCLUSIVE
    return HOLDS if low >= bound else FAILS if high < bound else INCONCLUSIVE


def above(low, high, bound=0.0):
    """Verdict on "the quantity is > bound" from its interval: holds when low > bound, fails when high <= bound."""
    if _undefined(low, high):
        return INCONCLUSIVE
    return HOLDS if low > bound else FAILS if high <= bound else INCONCLUSIVE


def reproduces(published, low, high):
    """Verdict on "we reproduce the published value": holds when it lies inside our interval, fails otherwise."""
    if _undefined(low, high):
        return INCONCLUSIVE
    return HOLDS if low <= published <= high else FAILS


def no_evidence(clean_correct):
    """Why a claim about the robust accuracy of the defenses in `clean_correct` ({name: per-image clean correctness})
    rests on no evidence, or "" when it does not: a defense that classifies no image correctly clean is "robust" on
    none whatever the attack, so a comparison with it, or a published value read into its interval, says nothing."""
    empty = [f"{name} (0 of {np.size(correct)} images)" for name, correct in clean_correct.items()
             if not np.any(correct)]
    return f"no image is correctly classified clean by {' or '.join(empty)}" if empty else ""


def on_evidence(verdict, ours, clean_correct):
    """(verdict, ours) of a claim about the robust accuracy of the defenses in `clean_correct` (see `no_evidence`):
    unchanged when it has evidence, else INCONCLUSIVE with the reason added to `ours`."""
    reason = no_evidence(clean_correct)
    return (INCONCLUSIVE, f"{ours}; inconclusive: {reason}") if reason else (verdict, ours)


def interval_text(estimate, low, high, signed=False):
    """"0.406 [0.24, 0.59]" (signed: "+0.075 [-0.054, +0.204]"), as the paper reports print their cells."""
    if signed:
        return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{estimate:.3f} [{low:.2f}, {high:.2f}]"


def provenance(entry):
    """"tag: source" of a published_values.yaml entry."""
    return f"{entry['tag']}: {entry['source']}"


def anchor(report, heading):
    """Relative link to the section `heading` of the rendered report `report` (nbconvert's heading ids: spaces
    become '-', other characters outside ASCII are percent-encoded)."""
    ident = "".join(c if ord(c) < 128 else quote(c) for c in heading.replace(" ", "-"))
    return f"{report}.html#{ident}"


def not_run(paper, claim, published, provenance, why, report="", headline=True):
    """A claim whose number is not measured at this preset; `why` says where it is (e.g. the paper-scale preset)."""
    return Claim(paper, claim, published, provenance, f"not measured at this preset: {why}", None, None, None,
                 NOT_RUN, report, headline)


def frame(claims):
    """The rows as a DataFrame, one column per Claim field."""
    import pandas as pd

    return pd.DataFrame([c.row() for c in claims], columns=list(Claim.__dataclass_fields__))


def counts(claims):
    """Verdict counts per paper: DataFrame indexed by paper (in order of appearance), one column per verdict."""
    table = frame(claims)
    papers = list(dict.fromkeys(table["paper"]))
    result = table.groupby("paper")["verdict"].value_counts().unstack(fill_value=0)
    return result.reindex(index=papers, columns=list(VERDICTS), fill_value=0)


COLUMNS = (("claim", "claim"), ("published", "published"), ("provenance", "provenance"), ("ours", "ours"),
           ("interval", "95% interval"), ("verdict", "verdict"), ("report", "report"))


def html_table(claims):
    """The rows as one HTML table (escaped), a verdict's cell classed `verdict-<word>` and a link to its report."""
    head = "".join(f"<th>{title}</th>" for _, title in COLUMNS)
    body = []
    for c in claims:
        interval = "" if c.low is None else f"[{c.low:.3f}, {c.high:.3f}]"
        link = (f'<a href="{html.escape(c.report, quote=True)}">{html.escape(c.report.split("#")[0])}</a>'
                if c.report else "")
        cells = {"claim": html.escape(c.claim) + (" <em>(headline, paper scale)</em>" if c.headline else ""),
                 "published": html.escape(c.published), "provenance": html.escape(c.provenance),
                 "ours": html.escape(c.ours), "interval": interval,
                 "verdict": f'<b class="verdict-{c.verdict.split()[0]}">{html.escape(c.verdict)}</b>',
                 "report": link}
        body.append("<tr>" + "".join(f"<td>{cells[key]}</td>" for key, _ in COLUMNS) + "</tr>")
    return (f'<table class="claims"><thead><tr>{head}</tr></thead><tbody>' + "".join(body) + "</tbody></table>")
