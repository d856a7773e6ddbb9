process SAMPLE {
    tag "${meta.id}:r${replicate}:${start}-${stop}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    tuple val(meta), path(model), path(reference), val(request), val(replicate), val(start), val(stop)

    output:
    tuple val(meta), path("generated_r${replicate}_${start}.h5ad"), emit: h5ad
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args   = task.ext.args ?: ''
    def device = task.accelerator ? 'cuda' : 'cpu'
    // request: [like: true] (one cell per reference cell) or [n_cells: N, conditions: 'k=v,k2=v2;k=v3']
    def what   = request.like ? "--like ${reference}" : "--n-cells ${request.n_cells} --conditions '${request.conditions}'"
    """
    sclatent sample \\
        --model ${model} \\
        ${what} \\
        --shard ${start}:${stop} \\
        --replicate ${replicate} \\
        --out generated_r${replicate}_${start}.h5ad \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    """
    touch generated_r${replicate}_${start}.h5ad
    """
}
