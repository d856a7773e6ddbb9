process REPORT {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    // One item per dataset on each of the four channels, in step: the caller joins them by meta, then multiMaps.
    // data:    PREPARE's prepare.json, TOKENIZE's tokens/ folder
    tuple val(meta), path(prepare_json), path(tokens)
    // models:  TRAIN_VAE's and TRAIN_PRIOR's run folders, ENCODE's reconstruction.json
    tuple val(meta_models), path(vae), path(prior), path(reconstruction)
    // cells:   EVALUATE's metrics.json, the real test cells (PREPARE's test.h5ad), the generated cells (GATHER)
    tuple val(meta_cells), path(metrics), path(real), path(generated)
    // context: the run's Nextflow execution trace or [] for none; baseline_names[i] names baselines[i] (EVALUATE
    //          metrics.json files), both may be empty lists
    tuple val(meta_context), path(trace, arity: '0..*'), val(baseline_names), path(baselines, stageAs: 'baselines/?/*', arity: '0..*')

    output:
    tuple val(meta), path('report.html'), emit: html
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def ids  = [meta, meta_models, meta_cells, meta_context].collect { m -> m.id }
    if (ids.unique(false).size() != 1) {
        error "REPORT: the four inputs belong to different datasets (${ids.join(', ')}); join them by meta first"
    }
    if (trace.size() > 1) {
        error "REPORT ${meta.id}: ${trace.size()} trace files given, at most one"
    }
    if (baseline_names.size() != baselines.size()) {
        error "REPORT ${meta.id}: ${baseline_names.size()} baseline names for ${baselines.size()} baseline files"
    }
    def baseline_args = [baseline_names, baselines].transpose().collect { name, file -> "--baseline '${name}=${file}'" }.join(' ')
    def trace_arg     = trace ? "--trace ${trace[0]}" : ''
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
