rule prepare_dataset:
    """Generate (synthetic) or convert a dataset into data/{dataset} (uniform layout)."""
    input:
        unpack(dataset_source),
        code=stage_sources("prepare"),
    output:
        "data/{dataset}/dataset.yaml",
    params:
        declaration=dataset_declaration,
    conda:
        "../envs/segrepro.yaml"
    log:
        "logs/prepare/{dataset}.log",
    shell:
        "segrepro prepare {wildcards.dataset} > {log} 2>&1"
