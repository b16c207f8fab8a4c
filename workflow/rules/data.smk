rule download:
    """Fetch one archive of params/archives.yaml into data/raw/ and verify it (size, pinned
    checksums, the lock file). Runs only while the file is missing: a user-placed archive (e.g.
    Cityscapes, behind a login) is verified by the prepare step instead."""
    output:
        str(paths.RAW / "{archive}"),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("download", "{archive}")),
    shell:
        "segrepro download {wildcards.archive} > {log} 2>&1"


rule prepare_dataset:
    """Generate (synthetic), draw (subset), verify, extract and convert (real) or convert (folder)
    a dataset into data/{dataset} (uniform layout). The card is updated, not deleted, by a rerun:
    the step builds the new folder beside the old one and swaps them only when it is complete, and
    a failed rerun leaves the previous dataset, card included (Snakemake restores its backup)."""
    input:
        unpack(dataset_source),
        code=dataset_code("prepare"),
    output:
        update(str(paths.card_path("{dataset}"))),
    params:
        declaration=dataset_declaration,
        source=lambda wildcards: local_source_option(wildcards.dataset),
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("prepare", "{dataset}")),
    shell:
        "segrepro prepare {wildcards.dataset} {params.source} > {log} 2>&1"
