rule evaluate:
    """Evaluate a trained model with one test protocol (ss, ms, ...) into a metrics JSON."""
    input:
        unpack(pyramid_inputs),
        model="results/runs/{scale}/{dataset}/{paper}/{experiment}/seed{seed}/model.pt",
        dataset=dataset_card,
        code=family_code("evaluate"),
    output:
        "results/metrics/{scale}/{dataset}/{paper}/{experiment}/seed{seed}/{protocol}.json",
    params:
        settings=eval_settings,
    threads: 1
    resources:
        gpu=job_resource("eval", "gpus"),
        cpus_per_task=job_resource("eval", "cpus"),
        mem_mb=job_resource("eval", "mem_mb"),
        runtime=job_resource("eval", "runtime"),
    conda:
        "../envs/segrepro.yaml"
    log:
        "logs/evaluate/{scale}/{dataset}/{paper}/{experiment}/seed{seed}/{protocol}.log",
    shell:
        "segrepro evaluate --paper {wildcards.paper} --experiment {wildcards.experiment}"
        " --scale {wildcards.scale} --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --protocol {wildcards.protocol} --threads {threads} --out {output} > {log} 2>&1"
