rule figure:
    """A paper figure (PNG) drawn from one trained and evaluated run."""
    input:
        unpack(figure_inputs),
        # Its paper's model code only: editing another family's model leaves the figure alone.
        code=family_code("figure", paper_of=lambda wildcards: PARAMS.figure(wildcards.figure)[0]),
    output:
        str(paths.figure_path("{figure}")),
    params:
        dataset_option=f"--dataset {DATASET}" if DATASET else "",
        seed=SEEDS[0],
        scale=SCALE,
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("figures", "{figure}")),
    shell:
        "segrepro figure {wildcards.figure} --scale {params.scale} {params.dataset_option}"
        " --seed {params.seed} --out {output} > {log} 2>&1"
