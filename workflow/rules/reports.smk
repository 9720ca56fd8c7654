# Reports: every paper table is a notebook in notebooks/ (jupytext percent script), executed with papermill with
# parameters from the config, rendered to HTML without code, and registered for `snakemake --report`. The summary of
# every claim (notebooks/summary.py) is rendered the same way to index.html, the first page of the folder and of the
# report bundle (category "0 Summary" sorts before "Reports").
# The HTML is flagged update(): Snakemake otherwise deletes a job's outputs before it runs, so a failed render would
# leave no report at all. With the flag it keeps the previous report (and restores its backup if the job fails), and
# render-notebook replaces it only once the new one is complete (temporary file, then rename). The executed .ipynb
# is not flagged: a failed job loses it, and the missing file makes the next run render again (the restored HTML
# has a fresh modification time and would look up to date on its own).
# Each report lists the sha256 of every input at its end and in its run record; an input that changes during the
# render fails the job (render-notebook names it; the previous HTML is restored as for any failed render, and the
# missing .ipynb renders it again). The params' input_digests are the inputs' fingerprints (common.smk): an input
# now holding other bytes reruns the report even when its modification time is older than the report's.


rule render_report:
    input:
        unpack(report_inputs),
    output:
        html=update(
            report(
                PATHS["report_html"],
                category="Reports",
                labels={"preset": PRESET, "notebook": "{notebook}"},
            )
        ),
        ipynb=PATHS["report_ipynb"],
    log:
        log=f"{LOGS}/render_report/{{notebook}}.log",
        record=f"{LOGS}/render_report/{{notebook}}.run.json",
    benchmark:
        f"{BENCHMARKS}/render_report/{{notebook}}.tsv"
    wildcard_constraints:
        notebook="|".join(NOTEBOOK_REPORTS),
    conda:
        "../envs/diffrobust.yaml"
    params:
        parameters=report_parameters,
        input_digests=report_input_fingerprints,
    message:
        f"Rendering notebooks/{{wildcards.notebook}}.py for preset {PRESET}"
    shell:
        "python -m diffrobust render-notebook --notebook {input.notebook} --parameters {params.parameters:q}"
        " --ipynb {output.ipynb} --html {output.html} --inputs {input:q} --run-record {log.record} 2> {log.log}"


rule render_summary:
    input:
        unpack(summary_inputs),
    output:
        html=update(
            report(
                PATHS["summary_html"],
                category="0 Summary",
                labels={"preset": PRESET, "notebook": "summary"},
            )
        ),
        ipynb=PATHS["summary_ipynb"],
    log:
        log=f"{LOGS}/render_report/summary.log",
        record=f"{LOGS}/render_report/summary.run.json",
    benchmark:
        f"{BENCHMARKS}/render_report/summary.tsv"
    conda:
        "../envs/diffrobust.yaml"
    params:
        parameters=summary_parameters,
        input_digests=summary_input_fingerprints,
    message:
        f"Rendering notebooks/summary.py (every claim) for preset {PRESET}"
    shell:
        "python -m diffrobust render-notebook --notebook {input.notebook} --parameters {params.parameters:q}"
        " --ipynb {output.ipynb} --html {output.html} --inputs {input:q} --run-record {log.record} 2> {log.log}"
