# The report: one self-contained HTML page of everything built so far (tables, figures, claims,
# runs). It reads what exists when the workflow starts and is rebuilt whenever any of it changes;
# it never builds a table itself (`segrepro plan results/report.html` shows what all would cost).


rule report:
    """results/report.html from what results/ holds (no server needed to open it)."""
    input:
        built=built_results,
        code=stage_sources("report"),
    output:
        str(paths.REPORT),
    params:
        scale=SCALE,
        seeds=" ".join(str(seed) for seed in SEEDS),
    localrule: True
    conda:
        "../envs/segrepro.yaml"
    log:
        str(paths.log_path("report")),
    shell:
        "segrepro report --scale {params.scale} --seeds {params.seeds} --out {output} > {log} 2>&1"
