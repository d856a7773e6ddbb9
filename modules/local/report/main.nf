process REPORT {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    // baseline_names[i] names baselines[i] (metrics.json files of EVALUATE); both may be empty lists
    tuple val(meta), path(prepare_json), path(tokens), path(vae), path(reconstruction), path(prior), path(metrics), path(real), path(generated), val(baseline_names), path(baselines, stageAs: 'baselines/?/*', arity: '0..*')
    // a Nextflow execution trace, or [] for none
    path(trace)

    output:
    tuple val(meta), path('report.html'), emit: html
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    if (baseline_names.size() != baselines.size()) {
        error "REPORT ${meta.id}: ${baseline_names.size()} baseline names for ${baselines.size()} baseline files"
    }
    def baseline_args = [baseline_names, baselines].transpose().collect { name, file -> "--baseline '${name}=${file}'" }.join(' ')
    def trace_arg     = trace ? "--trace ${trace}" : ''
    // vae and prior are [] when the pipeline runs a trained model (--model): no training histories
    def history_args  = [vae ? "--vae-history ${vae}/history.csv" : '', prior ? "--prior-history ${prior}/history.csv" : ''].join(' ')
    """
    export OMP_NUM_THREADS=${task.cpus}
    export NUMBA_CACHE_DIR=\$PWD/.numba_cache
    export MPLCONFIGDIR=\$PWD/.matplotlib
    sclatent report \\
        --out report.html \\
        --dataset ${meta.id} \\
        --prepare ${prepare_json} \\
        --manifest ${tokens}/manifest.json \\
        ${history_args} \\
        --reconstruction ${reconstruction} \\
        --metrics ${metrics} \\
        --real ${real} \\
        --generated ${generated} \\
        ${baseline_args} \\
        ${trace_arg} \\
        ${args}
    """

    stub:
    """
    echo '<!DOCTYPE html><html><head><meta charset="utf-8"><title>sclatent report: ${meta.id} (stub)</title></head><body></body></html>' > report.html
    """
}
