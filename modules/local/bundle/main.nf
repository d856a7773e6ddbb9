process BUNDLE {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    tuple val(meta), path(vae), path(prior)

    output:
    tuple val(meta), path('model.pt'), emit: model
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    sclatent bundle \\
        --vae ${vae} \\
        --prior ${prior} \\
        --out model.pt \\
        ${args}
    """

    stub:
    """
    touch model.pt
    """
}
