rule evaluate:
    """Evaluate a trained model with one test protocol (ss, ms, ...) on the val split into a
    metrics JSON (evaluate_split below: any other split)."""
    input:
        unpack(pyramid_inputs),
        model=MODEL,
        dataset=dataset_card,
        code=family_code("evaluate"),
    output:
        str(paths.metrics_path(*RUN, "{protocol}")),
    params:
        settings=eval_settings,
        split=job_split,
    threads: 1
    resources:
        gpu=job_resource("eval", "gpus"),
        cpus_per_task=job_resource("eval", "cpus"),
        mem_mb=job_resource("eval", "mem_mb"),
        runtime=job_resource("eval", "runtime"),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.run_log_path("evaluate", *RUN, "{protocol}")),
    shell:
        "segrepro evaluate --paper {wildcards.paper} --experiment {wildcards.experiment}"
        " --scale {wildcards.scale} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --protocol {wildcards.protocol} --split {params.split} --threads {threads} --out {output} > {log} 2>&1"


use rule evaluate as evaluate_split with:
    output:
        str(paths.metrics_path(*RUN, "{protocol}", "{split}")),
    wildcard_constraints:
        split=r"(?!val\b)[A-Za-z_][A-Za-z0-9_]*",  # val's file is PROTOCOL.json (rule evaluate)
    log:
        str(paths.run_log_path("evaluate", *RUN, "{protocol}.{split}")),
