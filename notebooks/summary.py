# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Summary: every published claim of the three papers, judged on this preset
# One row per claim of DensePure (with Carlini et al.'s DDS, its baseline), RDC (with DiffPure, its strongest
# purification baseline) and Pixel is a Barrier (PDM-Pure): the claim as tested here, the **published** value of
# what we measure and its **provenance** (`config/published_values.yaml`, copied from the project's reference
# notes with tags P-text = a paper sentence, P-artifact = the authors' repository, S = secondary, A = read off a
# chart, RB = RobustBench, D = derived; a value that is not known there is shown as *not known*, never filled in),
# **ours** with its 95% interval, the **verdict** and the report that shows the numbers.
#
# Verdicts: *holds* when the whole interval supports the claim, *fails* when the whole interval contradicts it,
# *inconclusive* otherwise, and *inconclusive* with the reason when a claim about robust (or certified) accuracy
# rests on no image that a defense it compares classifies correctly clean (0 = 0 is no evidence) or a check against
# gradient masking has nothing to check; a published number reproduces (*holds*) when it lies inside our interval.
# *Not run at this preset*: the papers' headline numbers, which are measured only at paper scale (their dataset,
# models and protocol), or a report this preset does not render. The numbers of this page and of the paper reports
# are computed by the same functions (`diffrobust.claims` and the `claims` functions of `diffrobust.stages`).
#
# Where this code departs from the official code, and by how much: `docs/fidelity.md` in the project
# ([on disk](../../../docs/fidelity.md) from this report's folder).

# %% tags=["parameters"]
preset = "mini"
dataset = "mnist"
published = "config/published_values.yaml"
pages = []
reports = {}

# %%
import yaml
from IPython.display import HTML, Markdown, display

from diffrobust import claims
from diffrobust.stages import densepure, diffpure, pixel_barrier, rdc

known = yaml.safe_load(open(published))
PAPERS = [(densepure, "densepure_table1"), (diffpure, "diffpure_table"), (rdc, "rdc_table"),
          (pixel_barrier, "pixel_barrier")]
rows = []
for module, name in PAPERS:
    if name in reports:
        rows += module.report_claims(reports[name], known)
    else:
        rows.append(claims.not_run(module.PAPER, f"every claim of {module.PAPER}", claims.NOT_KNOWN, "",
                                   f"this preset's reports do not include {name}", headline=False))
display(Markdown(f"Preset `{preset}` on `{dataset}`: {len(rows)} claims. Reports of this preset: "
                 + ", ".join(f"[{page}]({page}.html)" for page in pages) + "."))

# %% [markdown]
# ## Verdicts per paper

# %%
claims.counts(rows)

# %% [markdown]
# ## Every claim
# Rows marked *(headline, paper scale)* are the papers' headline numbers; the report column links to the section
# that shows the numbers.

# %%
display(HTML("<style>.claims td, .claims th {text-align: left; vertical-align: top; font-size: 0.85em}"
             " .verdict-holds {color: #1a7f37} .verdict-fails {color: #cf222e}"
             " .verdict-inconclusive {color: #9a6700} .verdict-not {color: #6e7781}</style>"))
for paper in dict.fromkeys(row.paper for row in rows):
    display(Markdown(f"### {paper}"))
    display(HTML(claims.html_table([row for row in rows if row.paper == paper])))
