# Models of the embedded default, trained inside the DAG (source: train). At paper scale the preset names official
# checkpoints instead and these jobs are not needed, except the multi-head fine-tune: no multi-head checkpoint is
# public, so it starts from the official model (models.multihead.init; on CIFAR-10 it distils EDM's conditional
# model on the GPU, training.distill_edm_multihead).
# train_adversarial (RDC's adversarial-training baseline) runs only when an attack job on the `adversarial` defense
# asks for its model file.


rule train_diffusion:
    input:
        **dataset_files(),
    output:
        model=path("model", role="diffusion"),
        losses=path("losses", role="diffusion"),
    log:
        log=f"{LOGS}/train_diffusion.log",
        record=f"{LOGS}/train_diffusion.run.json",
    benchmark:
        f"{BENCHMARKS}/train_diffusion.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        dataset_dir=input_dataset_folder,
        out_dir=output_folder,
        settings=training_settings("diffusion"),
        seed=CFG["seed"],
        device=CFG["device"],
    message:
        "Training the class-conditional pixel diffusion model (label dropout, EMA)"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust train-diffusion --dataset-dir {params.dataset_dir} --out-dir {params.out_dir}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device} --run-record {log.record} 2> {log.log}"


rule finetune_multihead:
    input:
        **dataset_files(),
        init=multihead_init_files,
    output:
        model=path("model", role="multihead"),
        losses=path("losses", role="multihead"),
    log:
        log=f"{LOGS}/finetune_multihead.log",
        record=f"{LOGS}/finetune_multihead.run.json",
    benchmark:
        f"{BENCHMARKS}/finetune_multihead.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        dataset_dir=input_dataset_folder,
        out_dir=output_folder,
        init=multihead_init(),
        settings=json_settings(CFG["models"]["multihead"]["finetune"]),
        seed=CFG["seed"],
        device=CFG["device"],
    message:
        "Fine-tuning RDC's multi-head diffusion model from {params.init} (distilling it when that is an EDM model)"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust finetune-diffusion --variant multihead --init {params.init}"
        " --dataset-dir {params.dataset_dir} --out-dir {params.out_dir} --settings {params.settings:q}"
        " --seed {params.seed} --device {params.device} --run-record {log.record} 2> {log.log}"


rule train_classifier:
    input:
        **dataset_files(),
    output:
        model=path("model", role="classifier"),
        losses=path("losses", role="classifier"),
        metrics=PATHS["classifier_metrics"],
    log:
        log=f"{LOGS}/train_classifier.log",
        record=f"{LOGS}/train_classifier.run.json",
    benchmark:
        f"{BENCHMARKS}/train_classifier.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        dataset_dir=input_dataset_folder,
        out_dir=output_folder,
        settings=training_settings("classifier"),
        seed=CFG["seed"],
        device=CFG["device"],
    message:
        "Training the base classifier"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust train-classifier --dataset-dir {params.dataset_dir} --out-dir {params.out_dir}"
        " --settings {params.settings:q} --seed {params.seed} --device {params.device} --run-record {log.record} 2> {log.log}"


rule train_adversarial:
    input:
        unpack(adversarial_training_inputs),
    output:
        model=path("model", role="adversarial"),
        losses=path("losses", role="adversarial"),
        metrics=PATHS["adversarial_metrics"],
    log:
        log=f"{LOGS}/train_adversarial.log",
        record=f"{LOGS}/train_adversarial.run.json",
    benchmark:
        f"{BENCHMARKS}/train_adversarial.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_request,
        local_gpu=local_gpu_claim,
    conda:
        "../envs/diffrobust.yaml"
    params:
        dataset_dir=input_dataset_folder,
        out_dir=output_folder,
        settings=adversarial_settings(),
        seed=CFG["seed"],
        device=CFG["device"],
    message:
        "Adversarially training the classifier (PGD, Madry et al.): RDC's adversarial-training baseline"
    shell:
        "OMP_NUM_THREADS={threads} python -m diffrobust train-classifier --adversarial --dataset-dir {params.dataset_dir}"
        " --out-dir {params.out_dir} --settings {params.settings:q} --seed {params.seed} --device {params.device}"
        " --run-record {log.record} 2> {log.log}"
