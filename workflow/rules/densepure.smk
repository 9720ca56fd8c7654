# DensePure Table 1 and the Carlini et al. DDS baseline: randomized-smoothing certification of denoise-then-classify,
# split into shards of images (one job each, resumable through a work folder the job keeps between attempts), then
# a cheap merge that re-certifies every image from its stored per-draw labels with K votes.
# OMP_NUM_THREADS: torch gets as many threads as the job reserved cores (oversubscribed threads on a busy CPU run
# many times slower, measured with `diffrobust bench`).



rule certify_shard:
    input:
        unpack(certify_inputs),
    output:
        tsv=PATHS["shard_tsv"],
        labels=PATHS["shard_labels"],
    log:
        log=f"{LOGS}/certify_shard/{{method}}/sigma{{sigma}}/shard{{shard}}.log",
        record=f"{LOGS}/certify_shard/{{method}}/sigma{{sigma}}/shard{{shard}}.run.json",
    benchmark:
        f"{BENCHMARKS}/certify_shard/{{method}}/sigma{{sigma}}/shard{{shard}}.tsv"
    wildcard_constraints:
        method="dds|densepure",
        sigma="[0-9.]+",
        shard="[0-9]+",
    threads: certify_threads
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=json_settings(DENSEPURE),
        subset=json_settings(CFG["subsets"]["densepure"]),
        dataset_dir=input_dataset_folder,
        diffusion=model_source("diffusion"),
        classifier=model_source("classifier"),
        work_dir=PATHS["shard_work"],
        device=CFG["device"],
        diffusion_precision=CFG["models"]["diffusion"]["precision"],
        classifier_precision=CFG["models"]["classifier"]["precision"],
        diffusion_compile=CFG["models"]["diffusion"]["compile"],
        classifier_compile=CFG["models"]["classifier"]["compile"],
    message:
        "Certifying {wildcards.method} shard {wildcards.shard} at sigma {wildcards.sigma}"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust certify-shard --method {wildcards.method} --sigma {wildcards.sigma}"
        " --shard {wildcards.shard} --settings {params.settings:q} --subset {params.subset:q}"
        " --dataset-dir {params.dataset_dir} --diffusion {params.diffusion} --classifier {params.classifier}"
        " --work-dir {params.work_dir} --out-tsv {output.tsv} --out-labels {output.labels}"
        " --device {params.device} --diffusion-precision {params.diffusion_precision}"
        " --classifier-precision {params.classifier_precision}"
        " --diffusion-compile {params.diffusion_compile} --classifier-compile {params.classifier_compile}"
        " --run-record {log.record} 2> {log.log}"


rule merge_votes:
    input:
        bundles=shard_bundles,
        meta=dataset_files()["meta"],
    output:
        tsv=PATHS["votes_tsv"],
    log:
        log=f"{LOGS}/merge_votes/{{method}}/sigma{{sigma}}/votes{{votes}}.log",
        record=f"{LOGS}/merge_votes/{{method}}/sigma{{sigma}}/votes{{votes}}.run.json",
    benchmark:
        f"{BENCHMARKS}/merge_votes/{{method}}/sigma{{sigma}}/votes{{votes}}.tsv"
    wildcard_constraints:
        method="dds|densepure",
        sigma="[0-9.]+",
        votes="[0-9]+",
    conda:
        "../envs/diffrobust.yaml"
    params:
        alpha=DENSEPURE["alpha"],
        dataset_dir=input_dataset_folder,
    message:
        "Merging {wildcards.method} at sigma {wildcards.sigma} with {wildcards.votes} votes"
    shell:
        "python -m diffrobust merge-votes --bundles {input.bundles} --votes {wildcards.votes}"
        " --sigma {wildcards.sigma} --alpha {params.alpha} --method {wildcards.method} --dataset-dir {params.dataset_dir}"
        " --out-tsv {output.tsv} --run-record {log.record} 2> {log.log}"
