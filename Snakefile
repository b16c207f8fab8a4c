# Reproduce the tables of PSPNet, Specialize-and-Fuse and HFGD from raw data.
#   snakemake results/tables/table6.md --cores all                     (demo scale, CPU)
#   snakemake results/tables/table6.md --cores all --config scale=tiny seeds=[0,1]
# Stages: dataset -> pyramidal ground truth -> training -> evaluation -> tables and figures -> report;
# every rule calls the `segrepro` CLI.

configfile: "params/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pyramids.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/submit.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
