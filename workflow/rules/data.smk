# Data stage: the embedded MNIST digits, the CIFAR-10 tarball, or the user's ImageNet validation folder,
# written as uint8 splits plus metadata under data/datasets/<dataset>/.


rule download_cifar10:
    output:
        tarball="data/downloads/cifar-10-python.tar.gz",
    log:
        log="logs/download_cifar10.log",
        record="logs/download_cifar10.run.json",
    benchmark:
        "benchmarks/download_cifar10.tsv"
    localrule: True
    retries: 1
    conda:
        "../envs/diffrobust.yaml"
    params:
        url=CFG["datasets"]["cifar10"]["url"],
        md5=CFG["datasets"]["cifar10"]["md5"],
        size=CFG["datasets"]["cifar10"]["size"],
    message:
        "Downloading the CIFAR-10 python tarball (md5-verified)"
    shell:
        "python -m diffrobust fetch --url {params.url:q} --md5 {params.md5} --size {params.size} --dest {output.tarball}"
        " --run-record {log.record} 2> {log.log}"


rule prepare_dataset:
    input:
        unpack(dataset_inputs),
    output:
        arrays=PATHS["dataset_arrays"],
        meta=PATHS["dataset_meta"],
        record=PATHS["dataset_record"],
    log:
        "logs/prepare_dataset/{dataset}.log",
    benchmark:
        "benchmarks/prepare_dataset/{dataset}.tsv"
    wildcard_constraints:
        dataset="mnist|cifar10|imagenet",
    conda:
        "../envs/diffrobust.yaml"
    params:
        settings=dataset_settings,
        subsets=dataset_subsets,
        source=dataset_source_flag,
        out_dir=output_folder,
    message:
        "Preparing the {wildcards.dataset} splits"
    shell:
        "python -m diffrobust prepare-dataset --dataset {wildcards.dataset} --out-dir {params.out_dir}"
        " --settings {params.settings:q} --subsets {params.subsets:q} {params.source}"
        " --run-record {output.record} 2> {log}"
