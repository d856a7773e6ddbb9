process EVALUATE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    tuple val(meta), path(real), path(generated), path(reconstruction)

    output:
    tuple val(meta), path('metrics.json')    , emit: json
    tuple val(meta), path('metrics_mqc.tsv') , emit: mqc
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    export OMP_NUM_THREADS=${task.cpus}
    sclatent evaluate \\
        --real ${real} \\
        --generated ${generated} \\
        --reconstruction ${reconstruction} \\
        --dataset ${meta.id} \\
        --outdir . \\
        ${args}
    """

    stub:
    """
    echo '{}' > metrics.json
    touch metrics_mqc.tsv
    """
}
