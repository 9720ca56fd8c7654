# Pixel is a Barrier (Xue & Chen): the mini latent diffusion model (trained here; Stable Diffusion at paper scale),
# one protect job and one edit job per protective attack (each over every budget), and the pseudo-attacks `none`
# (clean images) and `random` (the ±eps sign-noise control). Report: notebooks/pixel_barrier.
# Mist's target image file (pixel_barrier.target.file) is an input of the protect jobs that read it, and its sha256 a
# param of their protect and edit jobs (common.smk: pixel_barrier_target_argument), so other pixels rerun them.


rule train_ldm:
    input:
        **dataset_files(),
    output:
        model=directory(PATHS["ldm_model"]),
        losses=PATHS["ldm_losses"],
    log:
        log=f"{LOGS}/train_ldm.log",
        record=f"{LOGS}/train_ldm.run.json",
    benchmark:
        f"{BENCHMARKS}/train_ldm.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        dataset_dir=input_dataset_folder,
        out_dir=output_folder,
        settings=json_settings(CFG["models"]["ldm"]),
        seed=CFG["seed"],
        device=CFG["device"],
    message:
        "Training the mini latent diffusion model (VAE, then the latent UNet with class prompts)"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust train-ldm --dataset-dir {params.dataset_dir} --out-dir {params.out_dir}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device} --run-record {log.record} 2> {log.log}"


rule protect:
    input:
        unpack(pixel_barrier_model_files),
        unpack(pixel_barrier_target_input),
        **dataset_files(),
    output:
        npz=PATHS["protected_set"],
    log:
        log=f"{LOGS}/protect/{{attack}}.log",
        record=f"{LOGS}/protect/{{attack}}.run.json",
    benchmark:
        f"{BENCHMARKS}/protect/{{attack}}.tsv"
    wildcard_constraints:
        attack="|".join(PIXEL_BARRIER_SETS),
    threads: attack_threads_of("pixel_barrier")
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=pixel_barrier_job_settings("protect"),
        subset=as_json(CFG["subsets"]["pdm_pure"]),
        models=as_json(pixel_barrier_models()),
        dataset_dir=input_dataset_folder,
        device=CFG["device"],
        target=pixel_barrier_target_argument,
    message:
        "Protecting the images with {wildcards.attack} (every budget)"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust protect --attack {wildcards.attack} --settings {params.settings:q}"
        " --subset {params.subset:q} --models {params.models:q} --dataset-dir {params.dataset_dir}"
        " --device {params.device} --out {output.npz} {params.target} --run-record {log.record} 2> {log.log}"


rule edit_protected:
    input:
        unpack(pixel_barrier_model_files),
        set=PATHS["protected_set"],
    output:
        tsv=PATHS["edit_table"],
        grid=PATHS["edit_grid"],
    log:
        log=f"{LOGS}/edit_protected/{{attack}}.log",
        record=f"{LOGS}/edit_protected/{{attack}}.run.json",
    benchmark:
        f"{BENCHMARKS}/edit_protected/{{attack}}.tsv"
    wildcard_constraints:
        attack="|".join(PIXEL_BARRIER_SETS),
    threads: attack_threads_of("pixel_barrier")
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=pixel_barrier_job_settings("edit"),
        models=as_json(pixel_barrier_models()),
        device=CFG["device"],
        target=pixel_barrier_target_argument,
    message:
        "Editing (LDM, PDM) and purifying the {wildcards.attack} sets"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust edit-protected --attack {wildcards.attack} --settings {params.settings:q}"
        " --models {params.models:q} --set {input.set} --device {params.device} --out-tsv {output.tsv}"
        " --out-grid {output.grid} {params.target} --run-record {log.record} 2> {log.log}"
