rule table:
    """A paper table (Markdown + CSV) from the metrics files of its rows and seeds."""
    input:
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
