rule submit:
    """A test-server submission: the model's predictions on the dataset's unlabelled test split (the
    val images stand in where there is none), one PNG per image in the server's format, zipped."""
    input:
        model=MODEL,
        dataset=dataset_card,
        code=family_code("submit"),
    output:
        zip=str(paths.submission_path(*RUN, "{protocol}")),
        readme=str(paths.submission_readme_path(paths.submission_path(*RUN, "{protocol}"))),
    params:
        settings=eval_settings,
        server=submission_server,
    threads: 1
    resources:
        gpu=job_resource("eval", "gpus"),
        cpus_per_task=job_resource("eval", "cpus"),
        mem_mb=job_resource("eval", "mem_mb"),
        runtime=job_resource("eval", "runtime"),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.run_log_path("submit", *RUN, "{protocol}")),
    shell:
        "segrepro submit --paper {wildcards.paper} --experiment {wildcards.experiment}"
        " --scale {wildcards.scale} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --protocol {wildcards.protocol} --server {params.server} --threads {threads} --out {output.zip} > {log} 2>&1"
