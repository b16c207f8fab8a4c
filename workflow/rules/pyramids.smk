rule pyramids:
    """Pyramidal ground truth of an evaluation split (SaF Sec. 3.1, App. B): one .npz per image."""
    input:
        dataset=dataset_card,
        code=dataset_code("pyramids"),
    output:
        directory(str(paths.pyramid_dir("{dataset}", "{split}"))),
    params:
        base_size=eval_base_size(),
        scale=SCALE,
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("pyramids", "{dataset}", "{split}")),
    shell:
        "segrepro pyramids {wildcards.dataset} --split {wildcards.split} --scale {params.scale}"
        " --out {output} > {log} 2>&1"


rule pyramid_stats:
    """How many cells of each level are unity, mix or ignore, and where each class is settled."""
    input:
        pyramids=paths.pyramid_dir(PYRAMID_STATS_DATASET, "val"),
        dataset=paths.card_path(PYRAMID_STATS_DATASET),
        code=dataset_code("pyramid_stats", dataset_of=lambda wildcards: PYRAMID_STATS_DATASET),
    output:
        str(paths.pyramid_stats_path()),
    params:
        dataset=PYRAMID_STATS_DATASET,
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("tables", "pyramid_stats")),
    shell:
        "segrepro pyramid-stats {params.dataset} --split val --out {output} > {log} 2>&1"
