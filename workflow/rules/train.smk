rule train:
    """Train one experiment (a GPU job at paper scale; resumes from its last checkpoint)."""
    input:
        dataset=dataset_card,
        code=family_code("train"),
    output:
        MODEL,
    params:
        config=train_config_hash,
    threads: 1
    resources:
        gpu=job_resource("train", "gpus"),
        cpus_per_task=job_resource("train", "cpus"),
        mem_mb=job_resource("train", "mem_mb"),
        runtime=job_resource("train", "runtime"),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.run_log_path("train", *RUN)),
    shell:
        "segrepro train --paper {wildcards.paper} --experiment {wildcards.experiment}"
        " --scale {wildcards.scale} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --threads {threads} --out {output} > {log} 2>&1"
