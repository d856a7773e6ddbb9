process TRANSFER {
    tag "${meta.id}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    tuple val(meta), path(model), path(cells)

    output:
    tuple val(meta), path('transferred.h5ad'), emit: h5ad
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    // ext.args carries the requested labels (--set k=v) and the guidance; the cells are the input h5ad's
    def args   = task.ext.args ?: ''
    def device = task.accelerator ? 'cuda' : 'cpu'
    """
    sclatent transfer \\
        --model ${model} \\
        --h5ad ${cells} \\
        --out transferred.h5ad \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    """
    touch transferred.h5ad
    """
}
