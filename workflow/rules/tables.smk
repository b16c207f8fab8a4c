rule table:
    """A paper table (Markdown + CSV + its claims as data) from the metrics files of its rows and seeds."""
    input:
        unpack(table_flops),
        unpack(table_efficiency),
        metrics=table_metrics,
        code=stage_sources("table"),
    output:
        md=str(paths.table_path("{table}")),
        csv=str(paths.table_path("{table}").with_suffix(".csv")),
        claims=str(paths.claims_path(paths.table_path("{table}"))),
    params:
        spec=table_spec,
        dataset_option=f"--dataset {DATASET}" if DATASET else "",
        split_option=f"--split {SPLIT}" if SPLIT else "",
        seeds=" ".join(str(seed) for seed in SEEDS),
        scale=SCALE,
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("tables", "{table}")),
    shell:
        "segrepro table {wildcards.table} --scale {params.scale} {params.dataset_option} {params.split_option}"
        " --seeds {params.seeds} --out {output.md} > {log} 2>&1"


rule flops:
    """The multiply-adds of a table's models on one image (HFGD Table 9); nothing is trained."""
    input:
        code=family_code("flops", paper_of=lambda wildcards: PARAMS.table(wildcards.table)[0]),
    output:
        str(paths.flops_path("{table}")),
    params:
        models=table_models,
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("flops", "{table}")),
    shell:
        "segrepro flops {wildcards.table} --out {output} > {log} 2>&1"


rule efficiency:
    """The cost of an efficiency table's models on this machine (SaF Tables 5, B): testing FPS,
    training it/s and memory, each row in a process of its own; nothing is trained."""
    input:
        code=family_code("efficiency", paper_of=lambda wildcards: PARAMS.table(wildcards.table)[0]),
    output:
        str(paths.efficiency_path("{table}")),
    params:
        models=efficiency_models,
        scale=SCALE,
    threads: machine_cores()
    resources:
        gpu=efficiency_resource("gpus"),
        cpus_per_task=efficiency_resource("cpus"),
        mem_mb=efficiency_resource("mem_mb"),
        runtime=efficiency_resource("runtime"),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("efficiency", "{table}")),
    shell:
        "segrepro efficiency {wildcards.table} --scale {params.scale} --threads {threads}"
        " --out {output} > {log} 2>&1"
