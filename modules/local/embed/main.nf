process EMBED {
    tag "${meta.id}:${h5ad.name}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    // meta.embed_name: the output file's name (the input's, made unique within the dataset by main.nf)
    tuple val(meta), path(h5ad), path(model)

    output:
    tuple val(meta), path("embedded/${meta.embed_name ?: h5ad.name}"), emit: h5ad
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args   = task.ext.args ?: ''
    def device = task.accelerator ? 'cuda' : 'cpu'
    """
    sclatent embed \\
        --model ${model} \\
        --h5ad ${h5ad} \\
        --out embedded/${meta.embed_name ?: h5ad.name} \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    """
    mkdir -p embedded
    touch embedded/${meta.embed_name ?: h5ad.name}
    """
}
