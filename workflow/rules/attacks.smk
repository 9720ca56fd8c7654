# Empirical robustness (DiffPure's and RDC's tables): adversarial sets as sharded, resumable jobs (one per defense,
# attack, threat and shard; each keeps its finished batches in a work folder between attempts), and the transfer
# check that replays the set made against the undefended classifier on a defense. The stage (diffpure, rdc) whose
# config block, models and subset a job uses follows from the attack's name. Tables: notebooks/diffpure_table,
# notebooks/rdc_table; the RDC sigma-point sweep is the rule below.


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
        defense="undefended|diffpure|adversarial|dc|rdc|dc_multihead|rdc_multihead",
        threat="linf|l2",
        attack="[A-Za-z0-9_-]+",
        shard="[0-9]+",
    threads: attack_threads
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        stage=attack_params("stage"),
        settings=attack_params("settings"),
        subset=attack_params("subset"),
        models=attack_params("models"),
        dataset_dir=input_dataset_folder,
        work_dir=PATHS["attack_work"],
        device=CFG["device"],
    message:
        "Attacking {wildcards.defense} with {wildcards.attack} ({wildcards.threat}), shard {wildcards.shard}"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust attack-shard --stage {params.stage} --defense {wildcards.defense}"
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
        defense="undefended|diffpure|adversarial|dc|rdc|dc_multihead|rdc_multihead",
        source="undefended|diffpure|adversarial|dc|rdc|dc_multihead|rdc_multihead",
        threat="linf|l2",
    threads: attack_threads
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        stage=attack_params("stage"),
        settings=attack_params("settings"),
        models=attack_params("models"),
        dataset_dir=input_dataset_folder,
        device=CFG["device"],
    message:
        "Scoring {wildcards.defense} on the {wildcards.attack} set made against {wildcards.source} ({wildcards.threat})"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust evaluate-set --stage {params.stage} --defense {wildcards.defense}"
        " --threat {wildcards.threat} --sets {input.sets} --settings {params.settings:q} --models {params.models:q}"
        " --dataset-dir {params.dataset_dir} --device {params.device} --out {output.npz}"
        " --run-record {log.record} 2> {log.log}"


rule sigma_sweep:
    input:
        unpack(sweep_inputs),
    output:
        tsv=PATHS["sigma_sweep"],
    log:
        log=f"{LOGS}/sigma_sweep/{{threat}}.log",
        record=f"{LOGS}/sigma_sweep/{{threat}}.run.json",
    benchmark:
        f"{BENCHMARKS}/sigma_sweep/{{threat}}.tsv"
    wildcard_constraints:
        threat="linf|l2",
    threads: attack_threads_of("rdc")
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=json_settings(RDC),
        models=json_settings(stage_models("rdc")),
        subset=json_settings(CFG["subsets"]["rdc"]),
        dataset_dir=input_dataset_folder,
        device=CFG["device"],
    message:
        "RDC: accuracy against the number of sigma points, single- and multi-head ({wildcards.threat} set)"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust sigma-sweep --threat {wildcards.threat}"
        " --settings {params.settings:q} --subset {params.subset:q} --models {params.models:q}"
        " --sets {input.sets} --dataset-dir {params.dataset_dir} --device {params.device} --out {output.tsv}"
        " --run-record {log.record} 2> {log.log}"
