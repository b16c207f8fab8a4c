rule table:
    """A paper table (Markdown + CSV) from the metrics files of its rows and seeds."""
    input:
        unpack(table_flops),
        metrics=table_metrics,
        code=stage_sources("table"),
    output:
        md="results/tables/{table}.md",
        csv="results/tables/{table}.csv",
    params:
        spec=table_spec,
        dataset_option=f"--dataset {DATASET}" if DATASET else "",
        seeds=" ".join(str(seed) for seed in SEEDS),
        scale=SCALE,
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        "logs/tables/{table}.log",
    shell:
        "segrepro table {wildcards.table} --scale {params.scale} {params.dataset_option}"
        " --seeds {params.seeds} --out {output.md} > {log} 2>&1"


rule flops:
    """The multiply-adds of a table's models on one image (HFGD Table 9); nothing is trained."""
    input:
        code=family_code("flops", paper_of=lambda wildcards: PARAMS.table(wildcards.table)[0]),
    output:
        "results/flops/{table}.json",
    params:
        models=table_models,
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        "logs/flops/{table}.log",
    shell:
        "segrepro flops {wildcards.table} --out {output} > {log} 2>&1"
