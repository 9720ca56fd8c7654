# diffrobust: one Snakemake DAG from data and checkpoints to the rendered paper tables.
# Run `snakemake --cores all` in this folder (profiles/default is applied automatically); see README.md.
# Rules live in workflow/rules/*.smk, config in config/ (validated against workflow/schemas/), logic in src/diffrobust.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# The landing page of `snakemake --report`: it points at the summary of every claim (reports/index.html).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


onstart:
    check_local_device()


rule all:
    default_target: True
    input:
        all_targets(),


include: "workflow/rules/data.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/densepure.smk"
include: "workflow/rules/attacks.smk"
include: "workflow/rules/pixel_barrier.smk"
include: "workflow/rules/reports.smk"
