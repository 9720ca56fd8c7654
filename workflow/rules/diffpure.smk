# DiffPure under adaptive attack: adversarial sets as sharded, resumable jobs (one per defense, attack, threat and
# shard; each keeps its finished batches in a work folder between attempts), and the transfer check that replays
# the set made against the undefended classifier on DiffPure. The table is notebooks/diffpure_table.


rule attack:
    input:
        unpack(attack_inputs),
    output:
        npz=PATHS["attack_set"],
    log:
        log=f"{LOGS}/attack/{{defense}}/{{attack}}/{{threat}}/shard{{shard}}.log",
        record=f"{LOGS}/attack/{{defense}}/{{attack}}/{{threat}}/shard{{shard}}.run.json",
    benchmark:
        f"{BENCHMARKS}/attack/{{defense}}/{{attack}}/{{threat}}/shard{{shard}}.tsv"
    wildcard_constraints:
        defense="undefended|diffpure",
        threat="linf|l2",
        attack="[A-Za-z0-9_-]+",
        shard="[0-9]+",
    threads: diffpure_threads
    resources:
        gpu=GPU_PER_JOB,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=json_settings(DIFFPURE),
        subset=json_settings(CFG["subsets"]["diffpure"]),
        models=json_settings(diffpure_models()),
        dataset_dir=input_dataset_folder,
        work_dir=PATHS["attack_work"],
        device=CFG["device"],
    message:
        "Attacking {wildcards.defense} with {wildcards.attack} ({wildcards.threat}), shard {wildcards.shard}"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust attack-shard --defense {wildcards.defense}"
        " --attack {wildcards.attack} --threat {wildcards.threat} --shard {wildcards.shard}"
        " --settings {params.settings:q} --subset {params.subset:q} --models {params.models:q}"
        " --dataset-dir {params.dataset_dir} --work-dir {params.work_dir} --device {params.device}"
        " --out {output.npz} --run-record {log.record} 2> {log.log}"


rule evaluate:
    input:
        unpack(transfer_inputs),
    output:
        npz=PATHS["transfer_eval"],
    log:
        log=f"{LOGS}/evaluate/{{defense}}/from-{{source}}/{{attack}}/{{threat}}.log",
        record=f"{LOGS}/evaluate/{{defense}}/from-{{source}}/{{attack}}/{{threat}}.run.json",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{defense}}/from-{{source}}/{{attack}}/{{threat}}.tsv"
    wildcard_constraints:
        defense="undefended|diffpure",
        source="undefended|diffpure",
        threat="linf|l2",
    threads: diffpure_threads
    resources:
        gpu=GPU_PER_JOB,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=json_settings(DIFFPURE),
        models=json_settings(diffpure_models()),
        dataset_dir=input_dataset_folder,
        device=CFG["device"],
    message:
        "Scoring {wildcards.defense} on the {wildcards.attack} set made against {wildcards.source} ({wildcards.threat})"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust evaluate-set --defense {wildcards.defense}"
        " --threat {wildcards.threat} --sets {input.sets} --settings {params.settings:q} --models {params.models:q}"
        " --dataset-dir {params.dataset_dir} --device {params.device} --out {output.npz}"
        " --run-record {log.record} 2> {log.log}"
