process GATHER {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    tuple val(meta), path(shards, stageAs: 'shards/*')

    output:
    tuple val(meta), path('generated.h5ad'), emit: h5ad
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    sclatent gather shards/*.h5ad --out generated.h5ad ${args}
    """

    stub:
    """
    touch generated.h5ad
    """
}
