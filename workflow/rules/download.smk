# Checkpoint downloads (paper scale): one job per file of config/checkpoints.yaml, resumable, checksum-verified;
# the sha256 seen at a first download is recorded in config/checkpoints.lock.yaml and enforced afterwards.


rule download_checkpoint:
    output:
        PATHS["checkpoint"],
    log:
        log="logs/download_checkpoint/{name}/{file}.log",
        record="logs/download_checkpoint/{name}/{file}.run.json",
    benchmark:
        "benchmarks/download_checkpoint/{name}/{file}.tsv"
    wildcard_constraints:
        name="|".join(sorted(REGISTRY)),
        file="[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*",
    localrule: True
    retries: 1
    conda:
        "../envs/diffrobust.yaml"
    params:
        arguments=fetch_arguments,
        lock=CHECKPOINT_LOCK,
    message:
        "Downloading checkpoint file {wildcards.name}/{wildcards.file}"
    shell:
        "python -m diffrobust fetch {params.arguments} --dest {output} --lock {params.lock}"
        " --lock-key {wildcards.name}/{wildcards.file} --run-record {log.record} 2> {log.log}"
